"""The layers a Transformer stacks: feed-forward, norms, residual sublayers, encoder and decoder blocks.

What one forward pass gives every block (masks, positions acting inside attention, caches) travels as one frozen
:class:`AttentionInputs`, built once by the model: Stack → block → attention, no loose keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache, MultiHeadAttention
from .config import ModelConfig

__all__ = ["AttentionInputs", "FeedForward", "RMSNorm", "make_norm", "EncoderBlock", "DecoderBlock", "Stack"]


@dataclass(frozen=True, slots=True)
class AttentionInputs:
    """The per-forward inputs every block's attention reads, built once per forward pass by the model.

    - ``mask``: bool, True = may attend, broadcastable to (batch, heads, queries, keys) (padding: (batch, 1, 1, keys));
    - ``causal``: each query sees only keys at or before its own position (aligned bottom-right with a cache);
    - ``rotate``: RoPE's rotation of queries and keys (batch, heads, seq, d_k), or None;
    - ``bias``: an additive score term, ALiBi's (1, heads, queries, keys), or None;
    - ``need_weights``: return each layer's attention weights;
    - ``caches`` / ``cross_caches``: one KVCache per block (decoding), or None;
    - ``slots``: where this forward's new keys/values go in each cache, a LongTensor (seq,); ``n_keys``: how many
      cache slots attention reads (None: all, the fixed shape of a compiled step);
    - ``checked``: the model built ``mask`` and ``bias`` itself, so attention does not check them again;
    - ``context`` / ``context_mask``: the encoder output (batch, source, d_model) and its (batch, 1, 1, source)
      mask, for a decoder block's cross-attention.
    """

    mask: Tensor | None = None
    causal: bool = False
    rotate: Callable[[Tensor], Tensor] | None = None
    bias: Tensor | None = None
    need_weights: bool = False
    caches: Sequence[KVCache] | None = None
    cross_caches: Sequence[KVCache] | None = None
    slots: Tensor | None = None
    n_keys: int | None = None
    checked: bool = False
    context: Tensor | None = None
    context_mask: Tensor | None = None


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x²) + eps) · g: LayerNorm without centring or bias (LLaMA)."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm(x) = (x - mean) / sqrt(var + eps) · g + b, or RMSNorm, as the config says."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.layer_norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """FFN(x) = act(x W_1 + b_1) W_2 + b_2, applied to each position alone; SwiGLU: (silu(x W_1) ⊙ x W_3) W_2."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.activation == "swiglu"
        self.act = F.silu if self.gated else _ACTIVATIONS[config.activation]
        n_in = 2 * config.d_ff if self.gated else config.d_ff  # SwiGLU keeps [W_1 | W_3] in one matrix
        self.w1 = nn.Linear(config.d_model, n_in, bias=config.bias)
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.w2(self.act(gate) * up)
        return self.w2(self.act(h))


class EncoderBlock(nn.Module):
    """x ← x + SelfAttention(x); x ← x + FFN(x): two sublayers, each with dropout, a residual and a norm.

    Post-LN (the paper): x ← LayerNorm(x + Dropout(sublayer(x))).
    Pre-LN (GPT-2 and most models since): x ← x + Dropout(sublayer(LayerNorm(x))); trains without warm-up.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = MultiHeadAttention(
            config.d_model, config.n_heads, n_kv_heads=config.n_kv_heads, bias=config.bias,
            dropout=config.attn_dropout, layout="qkv" if config.fused_qkv else "q_k_v",
        )
        self.self_attn_norm = make_norm(config)
        self.ffn = FeedForward(config)
        self.ffn_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def residual(self, x: Tensor, norm: nn.Module, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """One sublayer with its residual connection and norm, placed as ``norm_position`` says."""
        h = sublayer(norm(x) if self.pre_norm else x)
        if self.training and isinstance(self.dropout, nn.Dropout):  # p = 0 or eval mode: identity, no call
            h = self.dropout(h)
        return x + h if self.pre_norm else norm(x + h)

    def self_attention(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None
                       ) -> tuple[Tensor, Tensor | None]:
        weights = []

        def attend(h: Tensor) -> Tensor:
            out, w = self.self_attn(h, mask=inputs.mask, causal=inputs.causal, need_weights=inputs.need_weights,
                                    rotate=inputs.rotate, bias=inputs.bias, cache=cache, slots=inputs.slots,
                                    n_keys=inputs.n_keys, checked=inputs.checked)
            weights.append(w)
            return out

        return self.residual(x, self.self_attn_norm, attend), weights[0]

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None = None
                ) -> tuple[Tensor, Tensor | None, None]:
        """x (batch, seq, d_model) → (x, self-attention weights or None, None)."""
        x, w = self.self_attention(x, inputs, cache)
        return self.residual(x, self.ffn_norm, self.ffn), w, None


class DecoderBlock(EncoderBlock):
    """x ← x + MaskedSelfAttention(x); x ← x + CrossAttention(x, encoder output); x ← x + FFN(x).

    With ``cross_attention=False`` the middle sublayer is absent: that is the block of a decoder-only model
    (GPT), which has no encoder to attend to.
    """

    def __init__(self, config: ModelConfig, *, cross_attention: bool = True):
        super().__init__(config)
        self.cross_attn = self.cross_attn_norm = None
        if cross_attention:
            self.cross_attn = MultiHeadAttention(  # W_Q on the decoder's x, [W_K | W_V] on the encoder output
                config.d_model, config.n_heads, n_kv_heads=config.n_kv_heads, bias=config.bias,
                dropout=config.attn_dropout, layout="q_kv" if config.fused_qkv else "q_k_v",
            )
            self.cross_attn_norm = make_norm(config)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None = None,
                cross_cache: KVCache | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """→ (x, masked self-attention weights, cross-attention weights); weights are None unless requested."""
        x, self_w = self.self_attention(x, inputs, cache)
        cross_w = None
        if self.cross_attn is not None:
            if inputs.context is None and (cross_cache is None or not cross_cache.static):
                raise ValueError("this decoder block cross-attends: pass the encoder output as context")
            found = []

            def cross(h: Tensor) -> Tensor:
                out, w = self.cross_attn(h, inputs.context, mask=inputs.context_mask,
                                         need_weights=inputs.need_weights, cache=cross_cache, checked=inputs.checked)
                found.append(w)
                return out

            x = self.residual(x, self.cross_attn_norm, cross)
            cross_w = found[0]
        return self.residual(x, self.ffn_norm, self.ffn), self_w, cross_w


class Stack(nn.Module):
    """N identical blocks applied in turn, then the final norm a pre-LN stack needs."""

    def __init__(self, config: ModelConfig, n_layers: int, make_block: Callable[[], nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(make_block() for _ in range(n_layers))
        self.norm = make_norm(config) if config.use_final_norm else None

    def forward(self, x: Tensor, inputs: AttentionInputs) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """→ (hidden states, self-attention weights per layer, cross-attention weights per layer)."""
        self_weights, cross_weights = [], []
        caches, cross_caches = inputs.caches, inputs.cross_caches
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            if cross_caches is None:
                x, sw, cw = layer(x, inputs, cache)
            else:
                x, sw, cw = layer(x, inputs, cache, cross_caches[i])
            if inputs.need_weights:
                self_weights.append(sw)
                if cw is not None:
                    cross_weights.append(cw)
        if self.norm is not None:
            x = self.norm(x)
        return x, self_weights, cross_weights
