"""The explorer page in a real browser (headless Chromium driven by Playwright): lines, layers, hovering, heatmap,
explain panel, streamed generation and error messages, checked against the numbers the model computes.

Needs Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it). Without it the test is
skipped locally, and fails when ``CI`` is set.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch

from qkv import ModelConfig
from qkv.generate import generate_text
from qkv.models import build_model
from qkv.serve import Explorer, make_server
from qkv.tokenizers import Tokenizer
from qkv.viz import attention_maps

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SENTENCE = "the cat sat on the mat"
THRESHOLD = 0.05  # the page's default
SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "test_browser" / "explorer.png"


def _browser_or_skip():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install 'qkv[dev]')"
    if reason is None and not CHROMIUM.is_file():
        reason = f"no Chromium at {CHROMIUM}; install Debian's package: apt-get install -y chromium"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    return sync_playwright


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    tokenizer = Tokenizer.char("the cat sat on a mat, the dog ran.")
    model = build_model(ModelConfig.preset("tiny-decoder", vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():  # larger weights than the init: attention rows far from uniform, layers that differ
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model, tokenizer


class PacedExplorer(Explorer):
    """The real explorer, except that after its first streamed token it waits until the test lets it go on, so
    the test can see the page while the continuation is still arriving."""

    go_on = threading.Event()

    def generate(self, request):
        for n, piece in enumerate(super().generate(request)):
            yield piece
            if n == 0:  # the event is cleared by the test just before it asks for text
                assert self.go_on.wait(timeout=60), "the test never let generation go on"


@pytest.fixture(scope="module")
def served(model_and_tokenizer):
    """The explorer on a loopback port, with a random token; ``server.url`` is the page with the token."""
    with make_server(PacedExplorer(*model_and_tokenizer, max_new_tokens=40)) as server:
        yield server


def expected_lines(maps: torch.Tensor, layer: int, heads: set[int]) -> set[tuple[int, int, int]]:
    """(query, key, head) of every weight at or above the threshold in the visible heads of a layer."""
    return {(q, k, h) for h in heads for q, k in (maps[layer, h] >= THRESHOLD).nonzero().tolist()}


def drawn_lines(page) -> set[tuple[int, int, int]]:
    found = page.eval_on_selector_all(
        "line.att", "ls => ls.map(l => [+l.dataset.q, +l.dataset.k, +l.dataset.h])")
    assert len(found) == len({tuple(x) for x in found})  # never two lines for the same (query, key, head)
    return {tuple(x) for x in found}


def test_explorer_in_a_real_browser(served, model_and_tokenizer):
    sync_playwright = _browser_or_skip()
    model, tokenizer = model_and_tokenizer
    page_url = served.url.split("?")[0]
    # the numbers the page receives: the model's maps rounded for JSON, so a weight at the threshold is decided alike
    maps = torch.tensor(attention_maps(model, tokenizer, SENTENCE).to_dict()["maps"]["decoder_self"])
    n_layers, n_heads = maps.shape[:2]
    all_heads = set(range(n_heads))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url} {req.failure}"))
            external: list[str] = []
            page.on("request", lambda req: None if req.url.startswith(page_url) or req.url.startswith("data:")
                    else external.append(req.url))
            api_calls: list[tuple[str, str | None]] = []
            page.on("request", lambda req: api_calls.append((req.url, req.headers.get("authorization")))
                    if "/api/" in req.url else None)
            # opened at the URL qkv serve prints: the token moves to sessionStorage, out of the address bar, and
            # every API call sends it as Authorization: Bearer (a reload too, its URL now without the token)
            assert parse_qs(urlparse(served.url).query)["token"] == [served.api_key]
            assert page.goto(served.url).status == 200
            page.wait_for_function("window.qkvState.info !== null")
            assert page.url == page_url and "token" not in page.evaluate("window.location.href")
            assert page.evaluate("sessionStorage.getItem('qkv-token')") == served.api_key
            assert page.is_hidden("#token-form") and page.is_visible("#show")
            page.wait_for_load_state("networkidle")  # the first map's request answered: a reload aborts none
            page.reload()
            page.wait_for_function("window.qkvState.info !== null")
            assert page.url == page_url and page.is_hidden("#token-form")

            # another tab has no token: the page asks for it; a wrong one is refused and asked again
            other = browser.new_page()
            other.goto(page_url)
            assert other.is_visible("#token-form") and other.is_hidden("#show") and other.is_hidden("#load-form")
            other.fill("#token", "wrong")
            other.click("#token-form button")
            other.wait_for_function("document.getElementById('error').textContent.includes('wrong token')")
            assert other.is_visible("#token-form") and other.evaluate("sessionStorage.getItem('qkv-token')") is None
            other.fill("#token", served.api_key)
            other.click("#token-form button")
            other.wait_for_function("window.qkvState.info !== null")
            assert other.is_hidden("#token-form") and other.is_visible("#show") and other.url == page_url
            other.close()

            # type a sentence: one line per (query, key, visible head) above the threshold
            page.fill("#text", SENTENCE)
            page.click("#show")
            page.wait_for_function(f"window.qkvState.data && window.qkvState.text === {SENTENCE!r}")
            labels = page.eval_on_selector_all("text.tok.q", "ts => ts.map(t => t.textContent)")
            assert labels == [t.replace(" ", "␣") for t in tokenizer.pieces(SENTENCE)]
            first = drawn_lines(page)
            assert first == expected_lines(maps, 0, all_heads) and len(first) > 0
            opacities = page.eval_on_selector_all(
                "line.att", "ls => ls.map(l => [+l.dataset.q, +l.dataset.k, +l.dataset.h, +l.getAttribute("
                            "'stroke-opacity')])")
            for q, k, h, opacity in opacities:  # opacity = weight
                assert opacity == pytest.approx(float(maps[0, h, q, k]), abs=1e-4)

            # heads toggle on and off
            page.uncheck("#heads input[data-head='1']")
            assert drawn_lines(page) == expected_lines(maps, 0, all_heads - {1})
            page.check("#heads input[data-head='1']")

            # switching the layer changes the lines to that layer's
            page.select_option("#layer", str(n_layers - 1))
            last = drawn_lines(page)
            assert last == expected_lines(maps, n_layers - 1, all_heads) and last != first

            # hovering a query highlights what it attends to; hovering a key, what attends to it
            query = 8
            page.hover(f"text.tok.q[data-i='{query}']")
            lit = page.eval_on_selector_all("line.att.hl", "ls => ls.map(l => +l.dataset.q)")
            assert lit and set(lit) == {query} and len(lit) == len([x for x in last if x[0] == query])
            keys_lit = page.eval_on_selector_all("text.tok.k.hl", "ts => ts.map(t => +t.dataset.j)")
            assert set(keys_lit) == {k for q, k, _ in last if q == query}
            dim = page.eval_on_selector("line.att:not(.hl)", "l => getComputedStyle(l).opacity")
            assert float(dim) < 0.1
            page.hover("text.tok.k[data-j='0']")
            lit = page.eval_on_selector_all("line.att.hl", "ls => ls.map(l => +l.dataset.k)")
            assert set(lit) == {0} and len(lit) == len([x for x in last if x[1] == 0])
            page.mouse.move(0, 0)
            assert page.locator("line.att.hl").count() == 0

            # the heatmap shows the chosen head; a click explains that query, equal to the model's numbers
            page.select_option("#head", "2")
            cells = page.eval_on_selector_all("rect.cell", "rs => rs.map(r => [+r.dataset.q, +r.dataset.k, "
                                                             "+r.dataset.w])")
            assert len(cells) == maps.shape[2] * maps.shape[3]
            for q, k, w in cells:
                assert w == pytest.approx(float(maps[n_layers - 1, 2, q, k]), abs=1e-4)
            page.click("rect.cell[data-q='6'][data-k='2']")
            page.wait_for_selector("#explain table")
            assert "✓ equal" in page.inner_text("#explain")

            # generated text streams in, token by token
            prompt, n_new = "the cat", 24
            page.fill("#prompt", prompt)
            page.fill("#max-new", str(n_new))
            PacedExplorer.go_on.clear()
            page.click("#generate")
            # the first token is on the page while the server still holds the rest
            page.wait_for_function("document.querySelectorAll('#generated-new span').length === 1")
            assert page.get_attribute("#generated-new", "data-done") == "false"
            first_piece = page.inner_text("#generated-new")
            PacedExplorer.go_on.set()
            page.wait_for_selector("#generated-new[data-done='true']", state="attached")
            spans = page.eval_on_selector_all("#generated-new span", "ss => ss.map(s => s.textContent)")
            assert "".join(spans) == generate_text(model, tokenizer, prompt, n_new, temperature=0)
            assert len(spans) == n_new and spans[0] == first_piece  # one span per token, in order
            assert page.inner_text("#generated-prompt") == prompt
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # bad input: a clear message in the page, not a stack trace
            page.fill("#text", "   ")
            page.click("#show")
            page.wait_for_selector("#error:not([hidden])")
            message = page.inner_text("#error")
            assert "empty" in message and "Traceback" not in message
            page.fill("#text", "the zebra")
            page.click("#show")
            page.wait_for_function("document.getElementById('error').textContent.includes('lacks')")
            page.fill("#prompt", "the cat " * 17)  # 136 tokens: longer than the context of 128
            page.fill("#max-new", "20")
            page.click("#generate")
            page.wait_for_function("document.getElementById('error').textContent.includes('longer than max_seq_len')")
            page.fill("#checkpoint", "/no/such/checkpoint")
            page.click("#load-form button")
            page.wait_for_function("document.getElementById('error').textContent.includes('does not exist')")
            assert errors == [] and external == []
            assert len(api_calls) > 10  # info (twice), attention, explain, generate, load, ...
            for url, authorization in api_calls:
                assert served.api_key not in url and "token" not in parse_qs(urlparse(url).query), url
                assert authorization == f"Bearer {served.api_key}", url
        finally:
            browser.close()


def test_a_missing_browser_skips_locally_and_fails_in_ci(monkeypatch, tmp_path):
    import sys

    module = sys.modules[__name__]
    monkeypatch.setattr(module, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        _browser_or_skip()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="must run in CI"):
        _browser_or_skip()


# -- the Chat panel -------------------------------------------------------------------------------------------------
class GatedLock:
    """The explorer's model lock (a real one, taken per token by the /v1 worker), which once armed lets ``n`` more
    acquisitions through and holds the next until the test lets it go on: the page is seen while the reply is
    still arriving."""

    def __init__(self):
        self._lock = threading.Lock()
        self.left: int | None = None
        self.paused, self.go_on = threading.Event(), threading.Event()

    def pause_after(self, n: int) -> None:
        self.paused.clear()
        self.go_on.clear()
        self.left = n

    def __enter__(self):
        if self.left == 0:
            self.left = None
            self.paused.set()
            assert self.go_on.wait(timeout=60), "the test never let the reply go on"
        elif self.left is not None:
            self.left -= 1
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


@pytest.fixture(scope="module")
def chat_served():
    """The tiny ChatML model of the OpenAI tests behind a page; its lock paces the replies."""
    from test_openai_api import tiny_chat_model

    model, tokenizer = tiny_chat_model()
    with torch.no_grad():  # larger weights than the init, as above: rows far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    explorer = Explorer(model, tokenizer, max_new_tokens=40)
    explorer.lock = GatedLock()
    with make_server(explorer) as server:
        yield server, model, tokenizer, explorer.lock


def test_the_chat_panel_streams_a_reply_and_shows_what_a_reply_token_attended_to(chat_served):
    sync_playwright = _browser_or_skip()
    import openai
    from test_openai_api import greedy

    from qkv.chat_template import ChatTemplate

    server, model, tokenizer, lock = chat_served
    system, question, n_new = "You are a helpful assistant.", "Tell me a story about a cat.", 24
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            calls: list[tuple[str, str | None]] = []
            page.on("request", lambda req: calls.append((req.url, req.headers.get("authorization")))
                    if "/api/" in req.url or "/v1/" in req.url else None)
            page.goto(server.url)
            page.wait_for_function("window.qkvState.info !== null")
            page.fill("#chat-system", system)
            page.fill("#chat-input", question)
            page.fill("#chat-max", str(n_new))
            # the worker takes the lock once for the conversation, then once per token: 5 tokens, then it waits
            lock.pause_after(6)
            page.click("#chat-send")
            assert lock.paused.wait(timeout=30)
            page.wait_for_function("document.querySelectorAll('#chat-log .reply .chunk').length >= 2")
            so_far = page.eval_on_selector_all("#chat-log .reply .chunk", "cs => cs.map(c => c.textContent)")
            assert page.get_attribute("#chat-log", "data-state") == "streaming"  # several chunks, not the end
            lock.go_on.set()
            page.wait_for_selector("#chat-log[data-state='ready']", state="attached")
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            # the streamed text is the route's answer given at once, the greedy continuation of the prompt
            answered = openai.OpenAI(base_url=server.api_base, api_key=server.api_key, max_retries=0).chat \
                .completions.create(model="in-process-model", messages=messages, temperature=0, max_tokens=n_new)
            reply = answered.choices[0].message.content
            assert greedy(model, tokenizer, messages, n_new)[2].startswith(reply)
            assert "".join(so_far) == reply[:len("".join(so_far))] and len("".join(so_far)) < len(reply)
            shown = page.eval_on_selector_all("#chat-log .msg", "ms => ms.map(m => [m.dataset.role, "
                                              "[...m.querySelectorAll('.tok')].map(t => t.textContent).join('')])")
            assert shown == [["system", system], ["user", question], ["assistant", reply]]

            # a click on a reply token: its row in every layer and head, equal to the model's own last row
            messages.append({"role": "assistant", "content": reply})
            ids = ChatTemplate(tokenizer).render(messages).ids
            token = page.eval_on_selector_all("#chat-log .msg[data-role='assistant'] .tok",
                                              "ts => +ts[3].dataset.i")
            page.click(f"#chat-log .tok[data-i='{token}']")
            page.wait_for_selector(f"#chat-attention[data-query='{token}']")
            with torch.no_grad():
                _, maps = model(torch.tensor([ids[:token + 1]]), return_attention=True)
            n_layers, n_heads = len(maps), maps[0].shape[1]
            for layer, head in [(0, 0), (n_layers - 1, n_heads - 1)]:
                page.select_option("#chat-layer", str(layer))
                page.select_option("#chat-head", str(head))
                row = page.eval_on_selector_all("#chat-row .key[data-w]", "ks => ks.map(k => +k.dataset.w)")
                assert len(row) == token + 1  # the conversation up to the token, system and user turns included
                assert row == pytest.approx(maps[layer][0, head, -1].tolist(), abs=1e-5)
                assert sum(row) == pytest.approx(1, abs=1e-4)
                assert float(page.get_attribute("#chat-sum", "data-sum")) == pytest.approx(1, abs=1e-4)
            cells = page.locator("#chat-heatmap rect.cell").count()
            assert cells == n_layers * n_heads * (token + 1)  # one row per layer and head, never a T x T map
            later = page.locator("#chat-row .key.later").count()
            assert later == len(ids) - token - 1

            # the template's markup is marked (and greyed), the messages' own text is not
            keys = page.eval_on_selector_all("#chat-row .key", "ks => ks.map(k => [k.textContent, "
                                             "k.classList.contains('markup'), getComputedStyle(k).fontStyle])")
            markup = {text for text, is_markup, _ in keys if is_markup}
            assert {"<|im_start|>", "<|im_end|>"} <= markup
            assert all(style == "italic" for _, is_markup, style in keys if is_markup)
            content = "".join(text for text, is_markup, _ in keys if not is_markup)
            assert content == system + question + reply
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.locator("#chat-panel").screenshot(path=str(SCREENSHOT.parent / "chat.png"))

            # refusals reach the page in one line, the /v1 ones (OpenAI's shape) too; the message is kept to resend
            page.fill("#chat-input", "  ")
            page.click("#chat-send")
            page.wait_for_function("document.getElementById('error').textContent.includes('message is empty')")
            page.fill("#chat-input", "And then?")
            page.fill("#chat-max", "1000")  # the form refuses it; the server too, had the page not known its cap
            page.eval_on_selector("#chat-max", "e => e.removeAttribute('max')")
            page.click("#chat-send")
            page.wait_for_function("document.getElementById('error').textContent.includes('max_tokens=1000')")
            assert page.input_value("#chat-input") == "And then?"
            assert page.locator("#chat-log .msg").count() == 3 and "[object" not in page.inner_text("#error")
            page.click("#chat-reset")
            assert page.locator("#chat-log .msg").count() == 0 and page.is_hidden("#chat-attention")
            assert errors == []
            assert calls and all(auth == f"Bearer {server.api_key}" for _, auth in calls)
            assert any("/v1/chat/completions" in url for url, _ in calls)
        finally:
            browser.close()
