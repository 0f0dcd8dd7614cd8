// qkv attention explorer: plain JavaScript and SVG written for qkv; talks to the JSON API of `qkv serve`.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// Everything the page shows follows from this state (exposed for tests as window.qkvState).
const state = {
  info: null,        // /api/info
  data: null,        // /api/attention for the current text
  text: "", target: null,
  kind: null, layer: 0, head: 0,
  visibleHeads: new Set(),
  threshold: 0.05,
  explainToken: null,
};
window.qkvState = state;

// ---------------------------------------------------------------------------------------------------------------
// API and errors
// ---------------------------------------------------------------------------------------------------------------

// The page is opened with the server's token in its URL (/?token=…, as `qkv serve` prints it). The page keeps it in
// sessionStorage (this tab, this server: a reload keeps it) and takes it out of the address bar at once, so that it
// is not left in the history or on the screen; every API call sends it as `Authorization: Bearer`, the header
// OpenAI clients send too (the /v1 routes take it the same way).
const TOKEN_KEY = "qkv-token";

function takeTokenFromUrl() {
  const url = new URL(window.location.href);
  if (!url.searchParams.has("token")) return;
  const token = url.searchParams.get("token");
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  url.searchParams.delete("token");
  history.replaceState(history.state, "", url.pathname + url.search + url.hash);
}

function authorization() {
  return { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` };
}

// Without a token, or with one the server refuses (401), the page asks for it.
function askForToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  $("token-form").hidden = false;
  $("load-form").hidden = true;
  document.querySelector("main").hidden = true;
  $("token").focus();
}

async function api(path, body) {
  const options = body === undefined ? { headers: authorization() } :
    { method: "POST", headers: { ...authorization(), "Content-Type": "application/json" },
      body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("the qkv server does not answer; is `qkv serve` still running?");
  }
  return answerOf(response);
}

async function answerOf(response) {
  const answer = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
  if (response.status === 401) askForToken();
  // /api answers {error: message}; /v1 answers OpenAI's {error: {message, type, param, code}}
  const error = answer.error && typeof answer.error === "object" ? answer.error.message : answer.error;
  if (!response.ok) throw new Error(error || `the server answered ${response.status}`);
  return answer;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function guarded(action) {
  try {
    showError("");
    await action();
  } catch (err) {
    showError(err.message);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

function el(name, attrs = {}, parent = null, text = null) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function html(name, attrs = {}, parent = null, text = null) {
  const node = document.createElement(name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

// Whitespace made visible, as in the PNG pictures.
const visible = (t) => (t.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5") || "\u2205");

function headColour(h, n) {
  return `hsl(${Math.round((h * 360) / Math.max(n, 1) + 8) % 360}, 78%, 42%)`;
}

const fmt = (x, d = 3) => (x === null || x === undefined ? "" : Number(x).toFixed(d));
const vec = (v, n = 6) => "[" + v.slice(0, n).map((x) => fmt(x, 3)).join(", ") + (v.length > n ? ", …]" : "]");

function currentMaps() {
  return state.data.maps[state.kind][state.layer]; // (heads, queries, keys)
}

function labels() {
  return state.data.labels[state.kind]; // {queries, keys}
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function fillSelect(select, values, chosen, text = (v) => String(v)) {
  clear(select);
  for (const v of values) {
    const option = html("option", { value: v }, select, text(v));
    if (v === chosen) option.selected = true;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Model info and loading
// ---------------------------------------------------------------------------------------------------------------

function showInfo(info) {
  state.info = info;
  $("text").title = `the explorer draws the attention of at most ${info.max_drawn_tokens} tokens`;
  const list = $("checkpoint-list");
  clear(list);
  for (const c of info.checkpoints || []) html("option", { value: c }, list);
  if (!info.loaded) {
    $("model-info").textContent = "no model loaded: pick a checkpoint";
    return;
  }
  $("model-info").textContent =
    `${info.source}: ${info.model_type}, ${info.n_heads} heads of d_k=${info.d_k}, context ` +
    `${info.max_seq_len} tokens, ${info.positional} positions, ${info.tokenizer} tokenizer`;
  $("target").hidden = info.model_type !== "seq2seq";
  $("generate").disabled = !info.can_generate;
  $("generate").title = info.can_generate ? "" : `a ${info.model_type} model does not continue text`;
  $("max-new").max = info.max_new_tokens;
  $("chat-send").disabled = !info.can_generate;
  $("chat-send").title = $("generate").title;
  $("chat-max").max = info.max_new_tokens;
}

// ---------------------------------------------------------------------------------------------------------------
// Attention for a text
// ---------------------------------------------------------------------------------------------------------------

async function showAttention() {
  const text = $("text").value;
  const target = $("target").hidden || !$("target").value.trim() ? null : $("target").value;
  const body = { text };
  if (target !== null) body.target = target;
  const data = await api("/api/attention", body);
  Object.assign(state, { data, text, target, explainToken: null });
  if (!data.kinds.includes(state.kind)) state.kind = data.kinds[0];
  setupControls();
  render();
  $("explain").textContent = "click a token in the heatmap (or a query token in the lines view)";
  $("explain").className = "muted";
}

function setupControls() {
  const d = state.data;
  $("controls").hidden = false;
  fillSelect($("kind"), d.kinds, state.kind);
  $("kind").parentElement.hidden = d.kinds.length < 2;
  const nLayers = d.n_layers[state.kind], nHeads = d.n_heads[state.kind];
  state.layer = Math.min(state.layer, nLayers - 1);
  state.head = Math.min(state.head, nHeads - 1);
  fillSelect($("layer"), [...Array(nLayers).keys()], state.layer);
  fillSelect($("head"), [...Array(nHeads).keys()], state.head);
  if (state.visibleHeads.size === 0 || [...state.visibleHeads].some((h) => h >= nHeads)) {
    state.visibleHeads = new Set([...Array(nHeads).keys()]);
  }
  const heads = $("heads");
  clear(heads);
  for (let h = 0; h < nHeads; h++) {
    const label = html("label", { style: `--c: ${headColour(h, nHeads)}`, title: `head ${h}` }, heads);
    const box = html("input", { type: "checkbox", "data-head": h }, label);
    box.checked = state.visibleHeads.has(h);
    box.addEventListener("change", () => {
      if (box.checked) state.visibleHeads.add(h); else state.visibleHeads.delete(h);
      renderLines();
    });
    label.appendChild(document.createTextNode(`h${h}`));
  }
}

function render() {
  renderLines();
  renderHeatmap();
}

// The lines view: queries on the left, keys on the right, one line per (query, key, visible head) whose weight
// reaches the threshold.
function renderLines() {
  const svg = $("lines");
  clear(svg);
  const maps = currentMaps(), { queries, keys } = labels();
  const nHeads = maps.length, rowH = 20, labelW = 120, gap = 180, top = 14;
  const rows = Math.max(queries.length, keys.length);
  const width = 2 * labelW + gap;
  svg.setAttribute("viewBox", `0 0 ${width} ${rows * rowH + top}`);
  svg.setAttribute("height", rows * rowH + top);
  const xLeft = labelW, xRight = labelW + gap, y = (i) => top + i * rowH;
  const lines = el("g", { id: "line-group" }, svg);
  for (let h = 0; h < nHeads; h++) {
    if (!state.visibleHeads.has(h)) continue;
    const colour = headColour(h, nHeads);
    maps[h].forEach((row, i) => row.forEach((w, j) => {
      if (w < state.threshold || w <= 0) return;
      el("line", {
        class: "att", x1: xLeft + 4, y1: y(i) - 4, x2: xRight - 4, y2: y(j) - 4, stroke: colour,
        "stroke-opacity": w.toFixed(4), "stroke-width": 2, "data-q": i, "data-k": j, "data-h": h,
        "data-w": w,
      }, lines);
    }));
  }
  const tokens = el("g", {}, svg);
  queries.forEach((t, i) => {
    const node = el("text", { class: "tok q", x: xLeft - 4, y: y(i), "text-anchor": "end", "data-i": i }, tokens,
      visible(t));
    node.addEventListener("mouseenter", () => highlight("q", i));
    node.addEventListener("mouseleave", unhighlight);
    node.addEventListener("click", () => guarded(() => explain(i)));
  });
  keys.forEach((t, j) => {
    const node = el("text", { class: "tok k", x: xRight + 4, y: y(j), "data-j": j }, tokens, visible(t));
    node.addEventListener("mouseenter", () => highlight("k", j));
    node.addEventListener("mouseleave", unhighlight);
  });
}

// Hovering a query shows what it attends to; hovering a key shows what attends to it.
function highlight(side, index) {
  const svg = $("lines");
  svg.classList.add("hovering");
  const other = side === "q" ? "k" : "q";
  svg.querySelector(`text.tok.${side}[data-${side === "q" ? "i" : "j"}="${index}"]`).classList.add("hl");
  for (const line of svg.querySelectorAll(`line.att[data-${side}="${index}"]`)) {
    line.classList.add("hl");
    const end = line.getAttribute(`data-${other}`);
    svg.querySelector(`text.tok.${other}[data-${other === "q" ? "i" : "j"}="${end}"]`).classList.add("hl");
  }
}

function unhighlight() {
  const svg = $("lines");
  svg.classList.remove("hovering");
  for (const node of svg.querySelectorAll(".hl")) node.classList.remove("hl");
}

// A sequential colour scale from white to deep blue.
function cellColour(w) {
  const t = Math.max(0, Math.min(1, w));
  const lerp = (a, b) => Math.round(a + (b - a) * Math.sqrt(t));
  return `rgb(${lerp(255, 8)}, ${lerp(255, 48)}, ${lerp(255, 140)})`;
}

function renderHeatmap() {
  const svg = $("heatmap");
  clear(svg);
  const weights = currentMaps()[state.head], { queries, keys } = labels();
  const cell = Math.max(8, Math.min(22, Math.floor(460 / Math.max(keys.length, 1))));
  const left = 110, top = 100, font = `font-size: ${Math.min(12, Math.round(cell * 0.9))}px`;
  const width = left + keys.length * cell + 10, height = top + queries.length * cell + 10;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("height", height);
  el("text", { x: left, y: 14 }, svg, `layer ${state.layer}, head ${state.head}: row = query, column = key`);
  const grid = el("g", {}, svg);
  weights.forEach((row, i) => row.forEach((w, j) => {
    const rect = el("rect", {
      class: "cell", x: left + j * cell, y: top + i * cell, width: cell, height: cell, fill: cellColour(w),
      "data-q": i, "data-k": j, "data-w": w,
    }, grid);
    el("title", {}, rect, `${visible(queries[i])} → ${visible(keys[j])}: ${fmt(w, 4)}`);
    rect.addEventListener("click", () => guarded(() => explain(i)));
  }));
  queries.forEach((t, i) => {
    const node = el("text", { class: "q", x: left - 4, y: top + i * cell + cell * 0.7, "text-anchor": "end",
      "data-i": i, style: font }, svg, visible(t));
    node.addEventListener("click", () => guarded(() => explain(i)));
  });
  keys.forEach((t, j) => {
    const x = left + j * cell + cell * 0.7, yy = top - 4;
    el("text", { x, y: yy, transform: `rotate(-60 ${x} ${yy})`, style: font }, svg, visible(t));
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The anatomy of one head for one query token
// ---------------------------------------------------------------------------------------------------------------

async function explain(token) {
  state.explainToken = token;
  const body = { text: state.text, layer: state.layer, head: state.head, token, kind: state.kind };
  if (state.target !== null) body.target = state.target;
  const e = await api("/api/explain", body);
  const box = $("explain");
  box.className = "";
  clear(box);
  html("p", {}, box,
    `${e.kind} attention, layer ${e.layer}, head ${e.head}: query token ${e.token} "${visible(e.query_label)}"` +
    `${e.rotary ? " (queries and keys rotated by RoPE)" : ""}. d_k = ${e.d_k}, √d_k = ${fmt(e.sqrt_d_k)}.`);
  html("p", { class: "vec" }, box, `1. query q = x W_Q = ${vec(e.query)}`);
  const table = html("table", {}, box);
  const head = html("tr", {}, html("thead", {}, table));
  const columns = ["j", "key token", "2. key k_j", "3. q·k_j", "4. ÷ √d_k"];
  if (e.bias) columns.push("+ ALiBi bias");
  columns.push("5. softmax a_j", "", "6. a_j v_j");
  columns.forEach((c, n) => html("th", { class: n === 1 ? "tok" : "" }, head, c));
  const body2 = html("tbody", {}, table);
  const best = e.weights.indexOf(Math.max(...e.weights));
  e.key_labels.forEach((label, j) => {
    const row = html("tr", { class: !e.visible[j] ? "masked" : j === best ? "top" : "" }, body2);
    html("td", {}, row, String(j));
    html("td", { class: "tok" }, row, visible(label));
    html("td", { class: "vec" }, row, vec(e.keys[j], 3));
    html("td", {}, row, fmt(e.dots[j]));
    html("td", {}, row, fmt(e.scaled[j]));
    if (e.bias) html("td", {}, row, fmt(e.bias[j]));
    html("td", {}, row, e.visible[j] ? fmt(e.weights[j], 4) : "masked");
    const bar = html("td", { class: "tok" }, row);
    html("span", { class: "bar", style: `width: ${Math.round(e.weights[j] * 80)}px` }, bar);
    html("td", { class: "vec" }, row, vec(e.weighted[j], 3));
  });
  const foot = html("tr", {}, html("tfoot", {}, table));
  html("td", { colspan: e.bias ? 6 : 5, class: "tok" }, foot, "sum of the weights");
  html("td", {}, foot, fmt(e.weights_sum, 6));
  html("p", { class: "vec" }, box, `7. output z = Σ_j a_j v_j = ${vec(e.output, 8)}`);
  html("p", { class: "vec" }, box, `   the model's own head output = ${vec(e.model_output, 8)}`);
  html("p", { class: e.matches_model ? "ok" : "bad" }, box,
    `${e.matches_model ? "✓ equal" : "✗ different"}: max |z − model| = ${e.max_error.toExponential(2)} ` +
    `(tolerance ${e.tolerance})`);
}

// ---------------------------------------------------------------------------------------------------------------
// Generation, streamed token by token (Server-Sent Events read with fetch, so 4xx messages reach the page)
// ---------------------------------------------------------------------------------------------------------------

async function generate() {
  const prompt = $("prompt").value;
  const params = new URLSearchParams({ text: prompt, max_new_tokens: $("max-new").value,
    temperature: $("temperature").value });
  const out = $("generated-new");
  $("generate").disabled = true;
  try {
    const response = await fetch(`/api/generate?${params}`, { headers: authorization() });
    if (!response.ok) await answerOf(response);
    $("generated-prompt").textContent = prompt;
    clear(out);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const name = (frame.match(/^event: (.*)$/m) || [null, "message"])[1];
        const data = JSON.parse((frame.match(/^data: (.*)$/m) || [null, "{}"])[1]);
        if (name === "error") throw new Error(data.error);
        if (name === "done") out.dataset.done = "true";
        else html("span", { "data-n": out.childElementCount }, out, data.text);
      }
    }
  } finally {
    $("generate").disabled = !(state.info && state.info.can_generate);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Chat: the reply streamed from /v1/chat/completions (OpenAI's Server-Sent Events), then the conversation's tokens
// from /api/chat/attention; a click on a token fetches its one attention row per layer and head.
// ---------------------------------------------------------------------------------------------------------------

const chat = {
  model: null,      // the id /v1/models gives the loaded model
  messages: [],     // the conversation, as /v1/chat/completions takes it
  tokens: null,     // /api/chat/attention without token_index: labels, message, markup, roles
  query: null,      // the clicked token's index
  weights: null,    // its row: weights[layer][head][key]
  layer: 0, head: 0,
};
window.qkvChat = chat;

function renderChatLog(streaming = null) {
  const log = $("chat-log");
  clear(log);
  chat.messages.forEach((m, k) => {
    const box = html("div", { class: "msg", "data-role": m.role, "data-k": k }, log);
    html("span", { class: "role" }, box, m.role);
    const tokens = chat.tokens;
    if (!tokens || tokens.roles.length !== chat.messages.length) {
      box.appendChild(document.createTextNode(m.content));
      return;
    }
    tokens.labels.forEach((label, i) => {  // the message's own text, token by token (the markup is not shown)
      if (tokens.message[i] !== k || tokens.markup[i]) return;
      const tok = html("span", { class: "tok", "data-i": i, title: `token ${i}: click to see what it attended to` },
        box, label);
      if (i === chat.query) tok.classList.add("chosen");
      tok.addEventListener("click", () => guarded(() => showChatAttention(i)));
    });
  });
  if (streaming) {
    const box = html("div", { class: "msg", "data-role": "assistant" }, log);
    html("span", { class: "role" }, box, "assistant");
    streaming.node = html("span", { class: "reply" }, box);
  }
}

async function modelId() {
  if (chat.model === null) chat.model = (await api("/v1/models")).data[0].id;
  return chat.model;
}

async function sendChat() {
  const text = $("chat-input").value;
  if (!text.trim()) throw new Error("the message is empty; type a message");
  const log = $("chat-log");
  if (chat.messages.length === 0 && $("chat-system").value.trim()) {
    chat.messages.push({ role: "system", content: $("chat-system").value });
  }
  chat.messages.push({ role: "user", content: text });
  $("chat-input").value = "";
  $("chat-send").disabled = true;
  log.dataset.state = "streaming";
  const live = {};
  renderChatLog(live);
  let reply = "";
  try {
    const body = { model: await modelId(), messages: chat.messages, stream: true,
      max_tokens: Number($("chat-max").value), temperature: Number($("chat-temperature").value) };
    let response;
    try {
      response = await fetch("/v1/chat/completions", { method: "POST",
        headers: { ...authorization(), "Content-Type": "application/json" }, body: JSON.stringify(body) });
    } catch (err) {
      throw new Error("the qkv server does not answer; is `qkv serve` still running?");
    }
    if (!response.ok) await answerOf(response);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end).replace(/^data: /, "");
        buffer = buffer.slice(end + 2);
        if (frame === "[DONE]") { finished = true; break; }
        const chunk = JSON.parse(frame);
        if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
        const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (!piece) continue;
        reply += piece;
        html("span", { class: "chunk", "data-n": live.node.childElementCount }, live.node, piece);
      }
    }
    chat.messages.push({ role: "assistant", content: reply });
    chat.tokens = await api("/api/chat/attention", { messages: chat.messages });
  } catch (err) {
    if (chat.messages[chat.messages.length - 1].role === "user") chat.messages.pop();  // send it again
    $("chat-input").value = text;
    throw err;
  } finally {
    renderChatLog();
    log.dataset.state = chat.messages.length ? "ready" : "empty";
    $("chat-send").disabled = !(state.info && state.info.can_generate);
  }
}

function resetChat() {
  Object.assign(chat, { messages: [], tokens: null, query: null, weights: null });
  $("chat-attention").hidden = true;
  renderChatLog();
  $("chat-log").dataset.state = "empty";
}

async function showChatAttention(i) {
  const answer = await api("/api/chat/attention", { messages: chat.messages, token_index: i });
  Object.assign(chat, { tokens: answer, query: i, weights: answer.weights });
  const nLayers = answer.weights.length, nHeads = answer.weights[0].length;
  chat.layer = Math.min(chat.layer, nLayers - 1);
  chat.head = Math.min(chat.head, nHeads - 1);
  fillSelect($("chat-layer"), [...Array(nLayers).keys()], chat.layer);
  fillSelect($("chat-head"), [...Array(nHeads).keys()], chat.head);
  const k = answer.message[i], role = k === null ? "markup" : answer.roles[k];
  $("chat-caption").textContent = `What token ${i} "${visible(answer.labels[i])}" (${role}) attended to: its query ` +
    `row over the ${i + 1} tokens up to it, in every layer and head (${nLayers} × ${nHeads} rows fetched, ` +
    "not whole maps).";
  $("chat-attention").hidden = false;
  $("chat-attention").dataset.query = i;
  renderChatLog();
  renderChatRow();
  renderChatHeatmap();
}

// The conversation as text, each token shaded by the weight the chosen head gives it.
function renderChatRow() {
  const box = $("chat-row"), t = chat.tokens, row = chat.weights[chat.layer][chat.head];
  clear(box);
  let sum = 0;
  t.labels.forEach((label, j) => {
    const k = t.message[j];
    const span = html("span", { class: "key", "data-k": j, "data-message": k === null ? "" : k,
      "data-role": k === null ? "" : t.roles[k] }, box, label);
    if (t.markup[j]) span.classList.add("markup");
    if (j === chat.query) span.classList.add("query");
    if (j < row.length) {
      span.dataset.w = row[j];
      span.style.background = cellColour(row[j]);
      if (row[j] > 0.45) span.style.color = "#fff";
      span.title = `${visible(label)}: ${fmt(row[j], 4)}`;
      sum += row[j];
    } else {
      span.classList.add("later");
    }
  });
  $("chat-sum").dataset.sum = sum;
  $("chat-sum").textContent = `layer ${chat.layer}, head ${chat.head}: the row sums to ${fmt(sum, 4)}`;
}

// Rows: every (layer, head); columns: the keys up to the token; markup keys ticked in grey underneath.
function renderChatHeatmap() {
  const svg = $("chat-heatmap"), w = chat.weights, t = chat.tokens;
  clear(svg);
  const nKeys = w[0][0].length, nHeads = w[0].length;
  const rows = w.length * nHeads, thin = rows > 64;  // a big model: thin rows, one label per layer
  const cell = Math.max(3, Math.min(16, Math.floor(760 / Math.max(nKeys, 1)))), rowH = thin ? 4 : 12;
  const left = 60, top = 4;
  const width = left + nKeys * cell + 10, height = top + rows * rowH + 12;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("height", height);
  const grid = el("g", {}, svg);
  w.forEach((heads, layer) => heads.forEach((row, head) => {
    const r = layer * nHeads + head, y = top + r * rowH;
    const choose = () => {
      Object.assign(chat, { layer, head });
      $("chat-layer").value = layer;
      $("chat-head").value = head;
      renderChatRow();
      renderChatHeatmap();
    };
    if (!thin || head === 0) {
      const label = el("text", { x: left - 4, y: thin ? y + 10 : y + rowH - 2, "text-anchor": "end",
        style: "font-size: 10px", class: "q" }, svg, thin ? `layer ${layer}` : `L${layer} h${head}`);
      label.addEventListener("click", choose);
    }
    row.forEach((v, j) => {
      const rect = el("rect", { class: "cell", x: left + j * cell, y, width: cell, height: rowH,
        fill: cellColour(v), "data-layer": layer, "data-head": head, "data-k": j, "data-w": v }, grid);
      el("title", {}, rect, `layer ${layer}, head ${head} → ${visible(t.labels[j])}: ${fmt(v, 4)}`);
      rect.addEventListener("click", choose);
    });
  }));
  t.markup.slice(0, nKeys).forEach((m, j) => {
    if (m) el("rect", { class: "tick", x: left + j * cell, y: top + rows * rowH + 3, width: cell, height: 5 }, svg);
  });
  el("rect", { class: "sel", x: left, y: top + (chat.layer * nHeads + chat.head) * rowH, width: nKeys * cell,
    height: rowH }, svg);
}

// ---------------------------------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------------------------------

$("load-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  guarded(async () => {
    showInfo(await api("/api/load", { checkpoint: $("checkpoint").value }));
    chat.model = null;  // another model: a new chat
    resetChat();
    state.data = null;
    state.visibleHeads = new Set();
    await showAttention();
  });
});
$("text-form").addEventListener("submit", (ev) => { ev.preventDefault(); guarded(showAttention); });
$("generate-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  $("generated-new").dataset.done = "false";
  guarded(generate);
});
$("kind").addEventListener("change", () => {
  state.kind = $("kind").value;
  state.visibleHeads = new Set();
  setupControls();
  render();
});
$("layer").addEventListener("change", () => {
  state.layer = Number($("layer").value);
  render();
  if (state.explainToken !== null) guarded(() => explain(state.explainToken));
});
$("head").addEventListener("change", () => {
  state.head = Number($("head").value);
  renderHeatmap();
  if (state.explainToken !== null) guarded(() => explain(state.explainToken));
});
$("threshold").addEventListener("change", () => {
  state.threshold = Math.max(0, Number($("threshold").value) || 0);
  renderLines();
});

$("chat-form").addEventListener("submit", (ev) => { ev.preventDefault(); guarded(sendChat); });
$("chat-reset").addEventListener("click", resetChat);
$("chat-layer").addEventListener("change", () => {
  chat.layer = Number($("chat-layer").value);
  renderChatRow();
  renderChatHeatmap();
});
$("chat-head").addEventListener("change", () => {
  chat.head = Number($("chat-head").value);
  renderChatRow();
  renderChatHeatmap();
});

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").hidden = true;
  $("load-form").hidden = false;
  document.querySelector("main").hidden = false;
  start();
});

function start() {
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    askForToken();
    return;
  }
  guarded(async () => {
    showInfo(await api("/api/info"));
    if (state.info.loaded) await showAttention();
  });
}

takeTokenFromUrl();
start();
