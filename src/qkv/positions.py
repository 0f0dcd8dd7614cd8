"""Positional encodings: how a Transformer learns the order of its tokens.

Self-attention by itself treats its input as a *set*: permute the tokens and the outputs are permuted the same
way. Every encoding here breaks that symmetry, through one interface with three hooks, each a no-op by default:

- ``embed(x, positions)``: absolute encodings (sinusoidal, learned) add a vector to each token embedding;
- ``rotary(positions)``: RoPE rotates queries and keys inside attention;
- ``attention_bias(n_queries, n_keys)``: ALiBi adds a distance penalty to the attention scores.

``positions`` is a LongTensor ``(batch or 1, seq)``: usually ``0..seq-1``, shifted per row for left-padded
batches and offset by the cache length when decoding one token at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "sinusoidal_encoding",
    "sinusoidal_shift_matrix",
    "PositionalEncoding",
    "SinusoidalPositions",
    "LearnedPositions",
    "NoPositions",
    "RotaryPositions",
    "ALiBiPositions",
    "build_positional",
    "POSITIONAL_KINDS",
]


def _inverse_frequencies(dim: int, base: float = 10000.0) -> Tensor:
    """w_i = 1 / base^(2i/dim), i = 0 .. dim/2 - 1: one angular speed per pair of dimensions."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def sinusoidal_encoding(n_positions: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    Returns a float32 tensor ``(n_positions, d_model)``. Computed in float64, then rounded once.
    """
    if d_model % 2 != 0:
        raise ValueError(f"the sinusoidal encoding pairs sin/cos dimensions: d_model={d_model} must be even")
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * _inverse_frequencies(d_model)[None, :]
    pe = torch.empty(n_positions, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe.float()


def sinusoidal_shift_matrix(k: int, d_model: int) -> Tensor:
    """M_k with PE(pos + k) = M_k PE(pos) for every pos: a rotation by angle k·w_i in each (sin, cos) pair.

    This is why the paper chose sinusoids: "for any fixed offset k, PE_pos+k can be represented as a linear
    function of PE_pos", so attention can learn to look a fixed distance away.
    """
    w = _inverse_frequencies(d_model)
    c, s = torch.cos(k * w), torch.sin(k * w)
    m = torch.zeros(d_model, d_model, dtype=torch.float64)
    # [sin(a+b), cos(a+b)] = [[cos b, sin b], [-sin b, cos b]] @ [sin a, cos a]
    m[0::2, 0::2] = torch.diag(c)
    m[0::2, 1::2] = torch.diag(s)
    m[1::2, 0::2] = torch.diag(-s)
    m[1::2, 1::2] = torch.diag(c)
    return m


class PositionalEncoding(nn.Module):
    """The interface every positional encoding implements; the base class encodes nothing."""

    kind = "none"

    def __init__(self, max_positions: int):
        super().__init__()
        self.max_positions = max_positions

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (batch, seq, d_model) → x with position information added (identity here)."""
        return x

    def rotary(self, positions: Tensor, limit: int | None = None) -> Callable[[Tensor], Tensor] | None:
        """A function applied to queries and keys (batch, heads, seq, d_k), or None.

        ``limit``: an upper bound (exclusive) on ``positions`` known to the caller (None: they lie within
        ``max_positions``); past ``max_positions`` a relative encoding computes its values instead of reading its
        table (decoding past the context)."""
        return None

    def attention_bias(self, n_queries: int, n_keys: int, device: torch.device, *,
                       query_positions: Tensor | None = None, key_positions: Tensor | None = None) -> Tensor | None:
        """An additive term for the attention scores, broadcastable to (batch, heads, queries, keys), or None.

        The queries are the last ``n_queries`` of the ``n_keys`` positions 0, 1, ..., unless decoding gives the
        positions of its queries (queries,) and of the keys it holds (the first ``n_keys`` of ``key_positions``)."""
        return None

    def table(self, n_positions: int) -> Tensor | None:
        """The vectors this encoding adds at positions 0..n-1 (for pictures), or None when it adds none."""
        return None


class NoPositions(PositionalEncoding):
    """No positional information at all: an encoder is permutation-equivariant (a bag of tokens); a causal decoder
    still learns order, from its mask (Haviv et al., 2022; ``qkv study order`` measures it)."""

    kind = "none"


class SinusoidalPositions(PositionalEncoding):
    """x + PE(pos) with the fixed sinusoidal table of "Attention Is All You Need"."""

    kind = "sinusoidal"

    def __init__(self, max_positions: int, d_model: int):
        super().__init__(max_positions)
        self.register_buffer("pe", sinusoidal_encoding(max_positions, d_model), persistent=False)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + self.pe[positions].to(x.dtype)

    def table(self, n_positions: int) -> Tensor:
        return self.pe[:n_positions]


class LearnedPositions(PositionalEncoding):
    """x + P[pos] with a trained table P (GPT-2, BERT): one learned vector per position."""

    kind = "learned"

    def __init__(self, max_positions: int, d_model: int):
        super().__init__(max_positions)
        self.weight = nn.Embedding(max_positions, d_model)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + self.weight(positions)

    def table(self, n_positions: int) -> Tensor:
        return self.weight.weight[:n_positions].detach()


def _rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] → [-x2, x1] on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryPositions(PositionalEncoding):
    """RoPE: rotate each (x_i, x_{i+d/2}) pair of q and k by angle pos·w_i, so q·k depends on the offset only.

    Uses the "rotate half" pairing of GPT-NeoX and LLaMA, so their weights load unchanged.
    """

    kind = "rope"

    def __init__(self, max_positions: int, d_k: int, base: float = 10000.0):
        super().__init__(max_positions)
        if d_k % 2 != 0:
            raise ValueError(f"RoPE rotates pairs of dimensions: d_k={d_k} must be even")
        self.d_k, self.base = d_k, base
        self.frequencies = _inverse_frequencies(d_k, base)  # float64 w_i, kept off the module's dtype casts
        cos, sin = self.cos_sin(torch.arange(max_positions))  # (max_positions, d_k): the table
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos(pos·w_i), sin(pos·w_i) for any positions (..., seq) → two float32 (..., seq, d_k) tensors.

        Computed in float64 and rounded once: the table's values exactly, also for positions past it."""
        angles = positions.to(torch.float64)[..., None] * self.frequencies.to(positions.device)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().float(), angles.sin().float()

    def rotary(self, positions: Tensor, limit: int | None = None) -> Callable[[Tensor], Tensor]:
        if limit is not None and limit > self.max_positions:  # past the table (a sliding window kept counting)
            cos, sin = (t.unsqueeze(1) for t in self.cos_sin(positions))
        else:
            cos = self.cos[positions].unsqueeze(1)  # (batch, 1, seq, d_k)
            sin = self.sin[positions].unsqueeze(1)

        def rotate(x: Tensor) -> Tensor:
            return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)

        return rotate


def alibi_slopes(n_heads: int) -> Tensor:
    """m_h = 2^(-8h/n) for h = 1..n (n a power of two; otherwise interleaved as in the ALiBi paper)."""

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


class ALiBiPositions(PositionalEncoding):
    """ALiBi: score(i, j) += -m_h · |i - j|, a per-head linear penalty on distance; nothing is added to x."""

    kind = "alibi"

    def __init__(self, max_positions: int, n_heads: int):
        super().__init__(max_positions)
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def attention_bias(self, n_queries: int, n_keys: int, device: torch.device, *,
                       query_positions: Tensor | None = None, key_positions: Tensor | None = None) -> Tensor:
        # Without positions, queries are the last n_queries of n_keys positions 0, 1, ... Decoding gives the
        # columns of its queries and of the keys its cache holds (a ring's slots are not in order). Only
        # differences matter, so a left-padded row, whose positions are shifted, needs nothing special.
        q = torch.arange(n_keys - n_queries, n_keys, device=device) if query_positions is None else query_positions
        k = torch.arange(n_keys, device=device) if key_positions is None else key_positions[:n_keys]
        distance = (q[:, None] - k[None, :]).abs().to(self.slopes.dtype)
        return (-self.slopes[:, None, None] * distance).unsqueeze(0)  # (1, heads, queries, keys)


POSITIONAL_KINDS = ("sinusoidal", "learned", "none", "rope", "alibi")


def build_positional(kind: str, *, max_positions: int, d_model: int, n_heads: int,
                     rope_base: float = 10000.0) -> PositionalEncoding:
    """The positional encoding named by ``ModelConfig.positional``."""
    if kind == "sinusoidal":
        return SinusoidalPositions(max_positions, d_model)
    if kind == "learned":
        return LearnedPositions(max_positions, d_model)
    if kind == "none":
        return NoPositions(max_positions)
    if kind == "rope":
        return RotaryPositions(max_positions, d_model // n_heads, rope_base)
    if kind == "alibi":
        return ALiBiPositions(max_positions, n_heads)
    raise ValueError(f"unknown positional encoding {kind!r}; choose one of {', '.join(POSITIONAL_KINDS)}")
