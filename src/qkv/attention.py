"""Scaled dot-product attention, its masks, multi-head attention and the key/value cache.

Mask convention, everywhere in qkv: a boolean tensor where **True means "may attend"** (the same sign as
``torch.nn.functional.scaled_dot_product_attention``). ``nn.MultiheadAttention`` uses the opposite sign; the one
place that converts is :func:`to_torch_mha_mask`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "scaled_dot_product_attention",
    "attention",
    "causal_mask",
    "padding_mask",
    "check_mask",
    "to_torch_mha_mask",
    "MultiHeadAttention",
    "KVCache",
]


# --------------------------------------------------------------------------------------------------------------
# Masks: built here and nowhere else.
# --------------------------------------------------------------------------------------------------------------


def causal_mask(n_queries: int, n_keys: int | None = None, *, device: torch.device | str | None = None) -> Tensor:
    """mask[i, j] = (j <= i + n_keys - n_queries): query i sees keys up to its own position, never the future.

    When there are more keys than queries (decoding with a cache) the queries are the *last* positions, so the
    mask is aligned to the bottom-right corner.
    """
    n_keys = n_queries if n_keys is None else n_keys
    q = torch.arange(n_queries, device=device).unsqueeze(1)
    k = torch.arange(n_keys, device=device).unsqueeze(0)
    return k <= q + (n_keys - n_queries)


def check_mask(mask: Tensor, name: str = "mask") -> Tensor:
    """A mask as qkv reads it: boolean, True = may attend (a real token). → the boolean mask.

    Accepted: a bool tensor, or an integer tensor of 1/0 (Hugging Face's ``attention_mask``), converted here.
    Refused: every float mask. Float masks follow two opposite conventions (PyTorch's and Hugging Face's
    *additive* masks hold 0 = keep and -inf or -10000 = masked; others hold 1.0 = keep), so reading one as
    ``mask != 0`` silently inverts the first kind; the caller must say which it holds.

    Raises TypeError (not a tensor, or a float or complex dtype) and ValueError (an integer mask holding values
    other than 0 and 1).
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool, True = may attend), got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"{name} has dtype {mask.dtype}; qkv masks are bool, True = may attend (a real token), or integer "
            "1/0: float masks are not accepted, convert an additive one (0 = keep, -inf = masked) with "
            "`mask == 0` and a 1.0/0.0 one with `mask.bool()`"
        )
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} holds integers other than 0 and 1; pass 1 (or True) at real tokens and 0 "
                         "(or False) at padding")
    return mask != 0  # Hugging Face's 1/0 integers


def padding_mask(attention_mask: Tensor) -> Tensor:
    """(batch, keys) with True at real tokens → (batch, 1, 1, keys), broadcastable over heads and queries.

    Integer 1/0 masks convert; float masks are refused (see :func:`check_mask`)."""
    attention_mask = check_mask(attention_mask, "attention_mask")
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must have shape (batch, seq), got {tuple(attention_mask.shape)}; "
            "pass True at real tokens and False at padding"
        )
    return attention_mask[:, None, None, :]


def to_torch_mha_mask(mask: Tensor) -> Tensor:
    """qkv's "True = may attend" → ``nn.MultiheadAttention``'s "True = must not attend"."""
    return ~mask


# --------------------------------------------------------------------------------------------------------------
# The formula.
# --------------------------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, bias: Tensor | None = None,
              scale: float | None = None) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d_k) + bias, masked) V, line by line → (output, weights): the reference.

    The kernels below must give its result; the tests hold them to it. ``mask`` is boolean, True = may attend,
    broadcastable to the scores ``(..., queries, keys)``; ``bias`` an additive term (ALiBi).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (..., queries, keys): q_i · k_j / sqrt(d_k)
    if bias is not None:
        scores = scores + bias  # ALiBi: -m · |i - j|
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # a key the query may not see gets weight 0
    weights = torch.softmax(scores, dim=-1)  # each row sums to 1 ...
    if mask is not None:  # ... except a query that may see no key at all: zeros, not the NaN of softmax(-inf)
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return torch.matmul(weights, v), weights  # (..., queries, d_v): the weighted sum of the values


# --------------------------------------------------------------------------------------------------------------
# The public function: its inputs checked, then computed by a kernel.
# --------------------------------------------------------------------------------------------------------------


def _broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape the given shapes broadcast to, or None when they do not (plain Python: a decoding step calls
    this every layer, and ``torch.broadcast_shapes`` costs tens of microseconds)."""
    n = max(len(s) for s in shapes)
    out = []
    for dims in zip(*((1,) * (n - len(s)) + tuple(s) for s in shapes), strict=True):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """Raise on inputs the formula cannot take; → the mask as a bool tensor (or None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., seq, d), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"queries and keys need the same size d_k: q has {q.shape[-1]}, k has {k.shape[-1]}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"keys and values need the same number of positions: k has {k.shape[-2]}, v has {v.shape[-2]}"
        )
    batch = _broadcast(q.shape[:-2], k.shape[:-2])
    if batch is None:
        raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} need broadcastable leading "
                         "(batch, heads) dimensions")
    scores_shape = (*batch, q.shape[-2], k.shape[-2])
    if mask is not None:
        mask = check_mask(mask)
        if _broadcast(mask.shape, scores_shape) is None:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the attention scores "
                f"(batch, heads, queries, keys) = {scores_shape}"
            )
    if bias is not None and _broadcast(bias.shape, scores_shape) is None:
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} does not broadcast to the attention scores {scores_shape}"
        )
    return mask


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = True,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + bias, masked) V.

    Shapes: q ``(..., n_queries, d_k)``, k ``(..., n_keys, d_k)``, v ``(..., n_keys, d_v)``; ``mask`` boolean,
    True = may attend, broadcastable to ``(..., n_queries, n_keys)``; ``bias`` an additive float term (ALiBi).
    ``causal=True`` lets each query see only keys at or before its own position (aligned bottom-right when
    there are more keys than queries, as when decoding with a cache).

    Why divide by sqrt(d_k): if the entries of q and k have unit variance, q·k has variance d_k. With d_k = 512
    the raw dot products are about ±22, and softmax of numbers that far apart puts nearly all its weight on one
    key: the distribution saturates, gradients through it vanish and training stalls or, in low precision,
    overflows to NaN. Dividing by sqrt(d_k) brings the scores back to unit variance.

    With ``need_weights=False`` the fused kernel (``F.scaled_dot_product_attention``, flash attention on a GPU)
    does the work and the weights are not returned; otherwise the formula is computed explicitly and the weights
    (before dropout) come back too. A query that may attend to no key at all gets an output of zeros.
    """
    mask = _check_inputs(q, k, v, mask, bias)
    return _dispatch(q, k, v, mask, causal, scale, dropout_p, need_weights, bias)


# --------------------------------------------------------------------------------------------------------------
# The kernels, and the rules that choose one. Each computes `attention` above; each rule is there for a measured
# reason.
# --------------------------------------------------------------------------------------------------------------

# On the CPU in bf16, PyTorch's fused kernel is slower than the explicit formula for short sequences: training
# steps of the benchmark's shapes ran 1.4x (context 64) and 1.1x (context 256) faster explicitly (fp32: no
# difference). Up to this many keys the (queries, keys) scores are small enough to materialise there.
# ``MultiHeadAttention`` takes that choice; the function ``scaled_dot_product_attention`` keeps its contract
# (``need_weights=False`` is the fused kernel).
CPU_BF16_EXPLICIT_MAX_KEYS = 1024

# PyTorch >= 2.5 lets the fused kernel share each key/value head among a group of query heads (enable_gqa), so
# grouped-query attention need not copy the keys and values once per query head: a decoding step of SmolLM2's
# attention (9 query heads, 3 key/value heads) against 1,024 cached keys took 139 µs instead of 260, against
# 4,096 keys 428 µs instead of 2,170.
SDPA_GROUPS = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _explicit_is_faster(q: Tensor, n_keys: int) -> bool:
    return q.dtype == torch.bfloat16 and n_keys <= CPU_BF16_EXPLICIT_MAX_KEYS and q.device.type == "cpu"


def _dispatch(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float | None,
              dropout_p: float, need_weights: bool, bias: Tensor | None, *,
              speed_rules: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`attention` (with ``causal`` and dropout) by the fastest kernel that gives its result; inputs are
    not checked (``MultiHeadAttention`` built q, k, v itself: the checks would cost a decoding step about 8%).

    ``speed_rules``: also apply the rules measured on the model's shapes (the CPU-bf16 one); k and v may then
    hold fewer heads than q, each serving a group of query heads (grouped-query attention).
    """
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # Rule 1: only the explicit kernel returns the weights. Rule 2: on the CPU in bf16 it is also the faster one.
    explicit = need_weights or (speed_rules and _explicit_is_faster(q, n_keys))
    # Rule 3: grouped-query attention shares key/value heads inside the fused kernel; elsewhere they are copied.
    groups = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3] else 1
    if groups > 1 and (explicit or not SDPA_GROUPS):
        k, v, groups = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3), 1
    # A query may end up with no key at all only through a caller's mask, or a causal mask with more queries
    # than keys; only then do its weights need zeroing after the softmax.
    rows_may_be_empty = mask is not None or (causal and n_queries > n_keys)
    # Rule 4: causal never materialises a (queries, keys) mask when the fused kernel's is_causal can do it.
    if causal and n_queries == 1 and n_keys >= 1:
        causal = False  # the one (last) query may see every key
    if causal and (mask is not None or bias is not None or explicit or n_queries != n_keys):
        cm = causal_mask(n_queries, n_keys, device=q.device)
        mask = cm if mask is None else mask & cm
        causal = False
    if explicit:
        out, weights = _explicit(q, k, v, mask, bias, scale, dropout_p, rows_may_be_empty)
        return out, weights if need_weights else None
    return _fused(q, k, v, mask, causal, bias, scale, dropout_p, groups > 1), None


def _fused(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, bias: Tensor | None, scale: float,
           dropout_p: float, grouped: bool) -> Tensor:
    """PyTorch's fused kernel (flash attention on a GPU): the (queries, keys) weights are never stored."""
    attn_mask = mask
    if bias is not None:  # the kernel takes one float mask: the bias, with -inf where the bool mask hides
        attn_mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    if attn_mask is not None and attn_mask.dim() < 2:  # the kernel wants (queries, keys) at least
        attn_mask = attn_mask.expand(q.shape[-2], k.shape[-2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal,
                                         scale=scale, **({"enable_gqa": True} if grouped else {}))
    if mask is not None:  # a query that may see no key: zeros (the kernel gives NaN)
        out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return out


def _explicit(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, scale: float,
              dropout_p: float, rows_may_be_empty: bool) -> tuple[Tensor, Tensor]:
    """:func:`attention` with two measured changes, and dropout on the weights → (output, weights before dropout)."""
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # scaling q (queries x d_k) is cheaper than the scores
    if bias is not None:
        scores = scores + bias
    hidden = None if mask is None else ~mask
    if hidden is not None:
        # Rule 5, the additive mask: added, not filled in. The mask-sized (0 | minimum) tensor costs the backward
        # pass nothing, where masked_fill would mask the (..., queries, keys) gradient once more (bf16 training
        # steps 3-4% faster at context 256). A finite minimum (not -inf) keeps a fully masked row finite; such a
        # row is zeroed below.
        minimum = torch.finfo(scores.dtype).min
        scores = scores + torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(hidden, minimum)
    weights = torch.softmax(scores, dim=-1)
    if hidden is not None and rows_may_be_empty:
        weights = weights.masked_fill(hidden, 0.0)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return torch.matmul(dropped, v), weights


# --------------------------------------------------------------------------------------------------------------
# The key/value cache used for decoding one token at a time.
# --------------------------------------------------------------------------------------------------------------


class KVCache:
    """The keys and values one attention layer has already computed, so each new token costs O(1) projections.

    ``(batch, kv_heads, max_len, d_k)`` keys and values, allocated on the first write in the dtype and on the
    device of the keys written (autocast's bf16 included: a cache never takes its dtype from a weight), then
    written in place at *slot indices given as a tensor*, so a decoding step has the same shapes and the same
    graph every step (what ``torch.compile`` needs). Which slot holds which token is the decode state's business
    (``qkv.decode_state``); ``static=True`` marks a cache filled once and then only read (the encoder's keys and
    values in cross-attention).
    """

    def __init__(self, max_len: int = 0):
        self.max_len = max_len  # slots
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.static = False

    def write(self, slots: Tensor, keys: Tensor, values: Tensor) -> None:
        """Store ``(batch, heads, t, d_k)`` keys/values at the ``t`` slots ``slots`` (a LongTensor (t,))."""
        if self.keys is None:
            b, h, _, d = keys.shape
            self.keys = keys.new_zeros(b, h, self.max_len, d)
            self.values = values.new_zeros(b, h, self.max_len, values.shape[-1])
        self.keys.index_copy_(2, slots, keys)
        self.values.index_copy_(2, slots, values)

    def drop_oldest(self, n: int, length: int) -> None:
        """Forget the ``n`` oldest of the first ``length`` slots, in place: the rest move to the front (a window
        that is re-encoded later; eager decoding only)."""
        keep = length - n
        if n > 0 and keep > 0 and self.keys is not None:  # clone: source and destination overlap
            self.keys[:, :, :keep] = self.keys[:, :, n:length].clone()
            self.values[:, :, :keep] = self.values[:, :, n:length].clone()

    def set_static(self, keys: Tensor, values: Tensor) -> None:
        """Fill once with keys/values that never change (cross-attention over the encoder output)."""
        self.keys, self.values, self.max_len, self.static = keys, values, keys.shape[-2], True

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search reorders hypotheses every step); a cache of the same batch size
        keeps its memory (rows are copied in place)."""
        if self.keys is None:
            return
        if not self.static and len(index) == self.keys.shape[0]:
            self.keys.copy_(self.keys.index_select(0, index))
            self.values.copy_(self.values.index_select(0, index))
        else:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)


# --------------------------------------------------------------------------------------------------------------
# Multi-head attention.
# --------------------------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W_O, head_i = Attention(X W_Q^i, C W_K^i, C W_V^i).

    C = X for self-attention; C = the encoder output (``context``) for cross-attention. ``n_kv_heads < n_heads``
    gives grouped-query attention (heads share keys and values in groups). The properties ``W_Q``, ``W_K``,
    ``W_V`` and ``W_O`` show the paper's matrices.

    Every projection is an ``nn.Linear`` module, called as a module, so an adapter (peft's LoRA) or a quantized
    layer can stand in for any of them. How the three input projections are stored, ``layout``:

    - ``"qkv"`` (self-attention's default): one module ``qkv`` = [W_Q | W_K | W_V], one matrix multiply;
    - ``"q_kv"`` (cross-attention's default): ``q`` = W_Q on the decoder's x, ``kv`` = [W_K | W_V] on the
      encoder output, each called once on its own input;
    - ``"q_k_v"``: three modules ``q``, ``k``, ``v``: the seam for adapting or quantizing one *part* (LoRA on
      W_Q and W_V only, as in the LoRA paper: ``target_modules=["q", "v"]``). ``ModelConfig.fused_qkv=False``
      builds it; :meth:`set_layout` converts a model in place. The function and the weights are the same in
      every layout (a checkpoint of one loads into another).
    """

    LAYOUTS = ("qkv", "q_kv", "q_k_v")

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        layout: str = "qkv",
    ):
        super().__init__()
        if n_heads < 1 or d_model % n_heads != 0:
            fix = f"pick d_model a multiple of {n_heads}" if n_heads >= 1 else "n_heads must be at least 1"
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; {fix} "
                             "(d_k = d_model / n_heads)")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        if layout not in self.LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(self.LAYOUTS)}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.d_k = d_model // n_heads
        self.dropout = dropout
        self.has_bias = bias
        self.layout = layout
        self._build(layout)
        self.out = nn.Linear(d_model, d_model, bias=bias)  # W_O

    def _build(self, layout: str) -> None:
        kv = self.n_kv_heads * self.d_k
        for name in ("qkv", "q", "kv", "k", "v"):
            if name in self._modules:
                del self._modules[name]
        if layout == "qkv":
            self.qkv = nn.Linear(self.d_model, self.d_model + 2 * kv, bias=self.has_bias)  # [W_Q | W_K | W_V]
        else:
            self.q = nn.Linear(self.d_model, self.d_model, bias=self.has_bias)  # W_Q
            if layout == "q_kv":
                self.kv = nn.Linear(self.d_model, 2 * kv, bias=self.has_bias)  # [W_K | W_V]
            else:
                self.k = nn.Linear(self.d_model, kv, bias=self.has_bias)  # W_K
                self.v = nn.Linear(self.d_model, kv, bias=self.has_bias)  # W_V
        self.layout = layout

    # -- the paper's matrices, as views of the stored weights (nn.Linear keeps W^T: y = x W^T + b) ---------------
    def _projection_weight(self, part: str) -> Tensor:
        """The stored (out, d_model) rows of W_Q, W_K or W_V ("q", "k", "v") in any layout."""
        kv = self.n_kv_heads * self.d_k
        module, rows = {
            "qkv": {"q": ("qkv", slice(0, self.d_model)), "k": ("qkv", slice(self.d_model, self.d_model + kv)),
                    "v": ("qkv", slice(self.d_model + kv, None))},
            "q_kv": {"q": ("q", slice(None)), "k": ("kv", slice(0, kv)), "v": ("kv", slice(kv, None))},
            "q_k_v": {"q": ("q", slice(None)), "k": ("k", slice(None)), "v": ("v", slice(None))},
        }[self.layout][part]
        return _plain_weight(getattr(self, module), f"W_{part.upper()}")[rows]

    @property
    def W_Q(self) -> Tensor:  # noqa: N802 - the paper's name
        return self._projection_weight("q").T

    @property
    def W_K(self) -> Tensor:  # noqa: N802
        return self._projection_weight("k").T

    @property
    def W_V(self) -> Tensor:  # noqa: N802
        return self._projection_weight("v").T

    @property
    def W_O(self) -> Tensor:  # noqa: N802
        return _plain_weight(self.out, "W_O").T

    def set_layout(self, layout: str) -> None:
        """Store the input projections as ``layout`` ("qkv", "q_kv" or "q_k_v"), in place, the weights copied
        exactly (the function does not change). Raises ValueError for a projection that is not a plain nn.Linear
        (merge an adapter, or dequantize, first)."""
        if layout not in self.LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(self.LAYOUTS)}")
        if layout == self.layout:
            return
        for name in ("qkv", "q", "kv", "k", "v"):
            if name in self._modules:
                _plain_weight(self._modules[name], f"the {name} projection")
        state = self.state_dict()
        self._build(layout)
        reference = state["out.weight"] if "out.weight" in state else next(iter(state.values()))
        self.to(device=reference.device, dtype=reference.dtype)
        self.load_state_dict(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint written in another layout (every qkv checkpoint written before cross-attention had W_Q
        # and [W_K | W_V] modules of its own stored it as one qkv matrix): the same rows, regrouped by name.
        kv = self.n_kv_heads * self.d_k
        for end in ("weight", "bias"):
            names = {n for n in ("qkv", "q", "kv", "k", "v") if f"{prefix}{n}.{end}" in state_dict}
            wanted = {"qkv": {"qkv"}, "q_kv": {"q", "kv"}, "q_k_v": {"q", "k", "v"}}[self.layout]
            parts = _split_projection(state_dict, prefix, end, self.d_model, kv)
            if parts is None or names == wanted:
                continue
            for name in names:
                del state_dict[f"{prefix}{name}.{end}"]
            q, k, v = parts
            regrouped = {"qkv": {"qkv": torch.cat([q, k, v])}, "q_kv": {"q": q, "kv": torch.cat([k, v])},
                         "q_k_v": {"q": q, "k": k, "v": v}}[self.layout]
            state_dict.update({f"{prefix}{name}.{end}": value for name, value in regrouped.items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- the computation -------------------------------------------------------------------------------------
    def split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        """(batch, seq, n_heads * d_k) → (batch, n_heads, seq, d_k)."""
        b, t, _ = x.shape
        return x.view(b, t, n_heads, self.d_k).transpose(1, 2)

    def project_queries(self, x: Tensor) -> Tensor:
        """Q = X W_Q, split into heads (batch, heads, seq, d_k): cross-attention's step once K, V are cached."""
        if self.layout == "qkv":  # the fused module computes all three; keep Q (a layout for self-attention)
            return self.split_heads(self.qkv(x)[..., : self.d_model], self.n_heads)
        return self.split_heads(self.q(x), self.n_heads)

    def project_keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """K = C W_K, V = C W_V, split into heads: each (batch, kv_heads, src_seq, d_k)."""
        kv = self.n_kv_heads * self.d_k
        if self.layout == "q_k_v":
            k, v = self.k(context), self.v(context)
        else:
            k, v = (self.kv(context) if self.layout == "q_kv" else self.qkv(context)[..., self.d_model :]).split(kv, -1)
        return self.split_heads(k, self.n_kv_heads), self.split_heads(v, self.n_kv_heads)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Q = X W_Q, K = C W_K, V = C W_V, split into heads: each (batch, heads, seq, d_k)."""
        if context is None and self.layout == "qkv":  # one view splits all heads: the outputs are head-major
            b, t, _ = x.shape
            heads = self.qkv(x).view(b, t, self.n_heads + 2 * self.n_kv_heads, self.d_k)
            # Split before transposing: backward then joins the three gradients straight into the
            # (batch, seq, 3·d_model) layout the projection needs, with no extra copy.
            q, k, v = heads.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = self.project_keys_values(x if context is None else context)
        return self.project_queries(x), k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
        rotate=None,
        bias: Tensor | None = None,
        cache: KVCache | None = None,
        slots: Tensor | None = None,
        n_keys: int | None = None,
        checked: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (batch, seq, d_model); context: (batch, src_seq, d_model) or None → (output, weights or None).

        ``rotate`` (a callable on (batch, heads, seq, d_k)) is how rotary position embeddings act on queries
        and keys. Decoding with a ``cache``: the new keys/values are written at ``slots`` (a LongTensor (seq,))
        and attention reads the cache's first ``n_keys`` slots (all of them when None); ``mask`` then covers
        those keys. ``checked=True``: the caller (a model) built ``mask`` and ``bias`` itself, so they are not
        checked again (the input checks would cost each decoding step several percent).
        """
        if not checked:
            if x.dim() != 3 or x.shape[-1] != self.d_model:
                raise ValueError(f"expected input of shape (batch, seq, {self.d_model}), got {tuple(x.shape)}")
            if context is not None and (context.dim() != 3 or context.shape[-1] != self.d_model):
                raise ValueError(
                    f"expected context of shape (batch, src_seq, {self.d_model}), got {tuple(context.shape)}"
                )
        if cache is not None and cache.static:  # cross-attention keys/values computed once
            q, k, v = self.project_queries(x), cache.keys, cache.values
        else:
            q, k, v = self.project(x, context)
            if rotate is not None:
                q, k = rotate(q), rotate(k)
            if cache is not None:
                if context is not None:
                    cache.set_static(k, v)
                else:
                    cache.write(slots, k, v)
                    k, v = cache.keys, cache.values
                    if n_keys is not None and n_keys != k.shape[-2]:
                        k, v = k[:, :, :n_keys], v[:, :, :n_keys]
        if not checked and (mask is not None or bias is not None):  # only what callers pass needs checks
            every_head = k if self.n_kv_heads == self.n_heads else k[:, :1].expand(-1, self.n_heads, -1, -1)
            mask = _check_inputs(q, every_head, every_head, mask, bias)
        out, weights = _dispatch(q, k, v, mask, causal, None, self.dropout if self.training else 0.0,
                                 need_weights, bias, speed_rules=True)
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.d_model)  # Concat(head_1..head_h)
        return self.out(out), weights


def _plain_weight(module: nn.Module, name: str) -> Tensor:
    """The weight of a plain nn.Linear, for the W_Q..W_O views; one line for anything else."""
    if type(module) is not nn.Linear:
        raise ValueError(f"{name} is a view of a plain nn.Linear, but this projection is a {type(module).__name__} "
                         "(an adapter or a quantized layer): merge the adapter (merge_and_unload) or dequantize "
                         "first")
    return module.weight


def _split_projection(state: dict[str, Tensor], prefix: str, end: str, d_model: int, kv: int
                      ) -> tuple[Tensor, Tensor, Tensor] | None:
    """(W_Q, W_K, W_V) rows (or biases) from a state dict in any layout; None when it holds none."""
    def get(name: str) -> Tensor | None:
        return state.get(f"{prefix}{name}.{end}")

    if get("qkv") is not None:
        fused = get("qkv")
        return fused[:d_model], fused[d_model : d_model + kv], fused[d_model + kv :]
    if get("q") is not None and get("kv") is not None:
        return get("q"), get("kv")[:kv], get("kv")[kv:]
    if get("q") is not None and get("k") is not None and get("v") is not None:
        return get("q"), get("k"), get("v")
    return None
