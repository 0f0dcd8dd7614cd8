"""The anatomy of one attention head for one query token, with the model's real numbers.

The steps the explanations teach, computed from what the model's own forward pass fed that layer:

1. the query vector of token i:           q = x_i W_Q^h (+ b)                     (RoPE: rotated to position i)
2. the key of every token j:               k_j = c_j W_K^h (+ b)
3. the dot products:                       s_j = q · k_j
4. divided by sqrt(d_k):                   s_j / sqrt(d_k)                         (ALiBi adds -m_h·|i - j| here)
5. the softmax over the keys i may see:    a_j = exp(s_j') / Σ exp(s_l')           (Σ_j a_j = 1)
6. each value scaled by its weight:        a_j v_j
7. their sum:                              z = Σ_j a_j v_j

and z is checked against the head's slice of Concat(head_1, …, head_h) that the model itself fed to W_O.
The layer's input is captured with forward hooks, so the model's code is not touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import MultiHeadAttention, causal_mask
from .models import unwrap
from .tokenizers import Tokenizer
from .viz.maps import attention_kinds, check_index, encode_input, run_model

__all__ = ["HeadExplanation", "explain_head", "attention_module", "find_token", "TOLERANCE"]

TOLERANCE = 1e-5  # |z - the model's head output| must stay below this


@dataclass
class HeadExplanation:
    kind: str
    layer: int
    head: int
    token: int
    query_label: str
    key_labels: list[str]
    d_k: int
    query: Tensor  # (d_k,)
    keys: Tensor  # (n_keys, d_k)
    dots: Tensor  # (n_keys,) q · k_j
    scaled: Tensor  # (n_keys,) q · k_j / sqrt(d_k)
    bias: Tensor | None  # (n_keys,) ALiBi's additive term, or None
    visible: Tensor  # (n_keys,) bool: may this query attend to key j (causal mask, padding)
    weights: Tensor  # (n_keys,) softmax, zero where not visible; sums to 1
    values: Tensor  # (n_keys, d_k)
    weighted: Tensor  # (n_keys, d_k) a_j v_j
    output: Tensor  # (d_k,) Σ_j a_j v_j
    model_output: Tensor  # (d_k,) the same head's output taken from the model's forward pass
    model_weights: Tensor  # (n_keys,) the attention row the model returned
    rotary: bool  # queries and keys were rotated by RoPE

    @property
    def max_error(self) -> float:
        """max |z - the model's own head output|."""
        return float((self.output - self.model_output).abs().max())

    @property
    def matches_model(self) -> bool:
        return self.max_error <= TOLERANCE

    def to_dict(self) -> dict:
        def plain(t: Tensor | None):
            return None if t is None else t.tolist()

        return {
            "kind": self.kind, "layer": self.layer, "head": self.head, "token": self.token,
            "query_label": self.query_label, "key_labels": self.key_labels, "d_k": self.d_k,
            "sqrt_d_k": math.sqrt(self.d_k), "rotary": self.rotary,
            "query": plain(self.query), "keys": plain(self.keys), "dots": plain(self.dots),
            "scaled": plain(self.scaled), "bias": plain(self.bias), "visible": plain(self.visible),
            "weights": plain(self.weights), "weights_sum": float(self.weights.sum()),
            "values": plain(self.values), "weighted": plain(self.weighted), "output": plain(self.output),
            "model_output": plain(self.model_output), "max_error": self.max_error,
            "tolerance": TOLERANCE, "matches_model": self.matches_model,
        }


def _bare(label: str) -> str:
    return label.strip().lower().removeprefix("##")


def find_token(labels: list[str], spec: int | str) -> int:
    """A token index from an index ("3", "-1") or a word ("it"): the token that is that word, else the first token
    of the first run of tokens spelling it at a word boundary (a character model spells "it" as "i", "t")."""
    if isinstance(spec, int) or str(spec).lstrip("-").isdigit():
        return check_index("token", int(spec), len(labels))
    wanted = str(spec).strip().lower()
    for i, label in enumerate(labels):
        if _bare(label) == wanted:
            return i
    for i in range(len(labels)):
        if not _bare(labels[i]):
            continue
        at_boundary = i == 0 or not labels[i - 1].strip() or labels[i][:1].isspace()
        spelled = ""
        for j in range(i, len(labels)):
            spelled += _bare(labels[j])
            if spelled == wanted and at_boundary and (j + 1 == len(labels) or not labels[j + 1][:1].isalnum()):
                return i
            if not wanted.startswith(spelled):
                break
    shown = ", ".join(f"{i}:{t!r}" for i, t in enumerate(labels[:40]))
    raise ValueError(f"no token {spec!r} in the text; pass an index or one of the tokens: {shown}")


def attention_module(model: nn.Module, kind: str, layer: int) -> MultiHeadAttention:
    """The MultiHeadAttention that computes ``kind`` ("encoder", "decoder_self", "cross") in ``layer``."""
    if kind not in attention_kinds(model):
        raise ValueError(f"a {type(unwrap(model)).__name__} has no {kind!r} attention; choose one of "
                         f"{', '.join(attention_kinds(model))}")
    stack = _stack_of(model, kind)
    block = stack.layers[check_index("layer", layer, len(stack.layers))]
    return block.cross_attn if kind == "cross" else block.self_attn


def _visible_keys(mask: Tensor | None, causal: bool, token: int, n_queries: int, n_keys: int) -> Tensor:
    """Which keys query ``token`` may see: the padding mask it was given and, for a decoder, the causal rule."""
    visible = torch.ones(n_keys, dtype=torch.bool)
    if mask is not None:
        visible &= mask.expand(*mask.shape[:-2], n_queries, n_keys).reshape(-1, n_queries, n_keys)[0, token].cpu()
    if causal:
        visible &= causal_mask(n_queries, n_keys)[token]
    return visible


@torch.no_grad()
def explain_head(model: nn.Module, tokenizer: Tokenizer, text: str, *, layer: int, head: int, token: int,
                 kind: str | None = None, target: str | None = None) -> HeadExplanation:
    """Recompute head ``head`` of ``layer`` for query ``token`` step by step, and check it against the model.

    ``kind`` picks the attention of an encoder-decoder ("encoder", "decoder_self" or "cross"; default: the
    model's first kind); ``target`` is its decoder text. Negative layer, head and token count from the end.
    """
    kind = kind or attention_kinds(model)[0]
    module = attention_module(model, kind, layer)
    layer = check_index("layer", layer, len(_stack_of(model, kind).layers))  # a negative layer, counted
    head = check_index("head", head, module.n_heads)
    inputs = encode_input(model, tokenizer, text, target)
    query_labels, key_labels = inputs.labels_for(kind)
    token = check_index("token", token, len(query_labels))

    seen: dict = {}

    def take_input(_module, args, kwargs):  # what the model fed this attention layer
        seen["x"] = args[0]
        seen["context"] = args[1] if len(args) > 1 else kwargs.get("context")
        seen["kwargs"] = kwargs

    def take_heads(_module, args):  # Concat(head_1, …, head_h), just before W_O
        seen["heads"] = args[0]

    hooks = [module.register_forward_pre_hook(take_input, with_kwargs=True),
             module.out.register_forward_pre_hook(take_heads)]
    try:
        _, attentions = run_model(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    returned = attentions[kind] if isinstance(attentions, dict) else attentions
    model_weights = returned[layer][0, head, token].double().cpu()

    kwargs = seen["kwargs"]
    q, k, v = module.project(seen["x"], seen["context"])  # each (batch, heads, seq, d_k)
    rotate = kwargs.get("rotate")
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    kv_head = head // (module.n_heads // module.n_kv_heads)  # grouped-query attention shares keys/values
    query = q[0, head, token].double().cpu()
    keys = k[0, kv_head].double().cpu()
    values = v[0, kv_head].double().cpu()
    n_queries, n_keys = q.shape[-2], keys.shape[0]

    dots = keys @ query  # q · k_j
    scaled = dots / math.sqrt(module.d_k)
    bias = kwargs.get("bias")
    if bias is not None:
        bias = bias.expand(bias.shape[0], module.n_heads, n_queries, n_keys)[0, head, token].double().cpu()
    logits = scaled if bias is None else scaled + bias
    visible = _visible_keys(kwargs.get("mask"), bool(kwargs.get("causal")), token, n_queries, n_keys)
    weights = torch.zeros(n_keys, dtype=torch.float64)
    if visible.any():
        weights[visible] = torch.softmax(logits[visible], dim=0)
    weighted = weights[:, None] * values
    output = weighted.sum(dim=0)
    model_output = seen["heads"][0, token, head * module.d_k:(head + 1) * module.d_k].double().cpu()
    return HeadExplanation(kind, layer, head, token, query_labels[token], key_labels, module.d_k, query, keys,
                           dots, scaled, bias, visible, weights, values, weighted, output, model_output,
                           model_weights, rotate is not None)


def _stack_of(model: nn.Module, kind: str):
    """The stack of blocks that computes ``kind``, inside the qkv model a wrapper may hold (see ``unwrap``)."""
    core = unwrap(model)
    if core.model_type == "seq2seq":
        return core.encoder if kind == "encoder" else core.decoder
    return core.layers
