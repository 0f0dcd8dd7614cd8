"""Positional encodings as pictures: what each encoding gives position p, and how two positions relate.

Two panels per encoding, drawn from :func:`positional_picture_data` (plain tensors, tested on their own):

- the table: for sinusoidal and learned encodings the vector added at each position (positions x dimensions);
  for RoPE the rotation cos(p·w_i) applied to each pair of query/key dimensions; for ALiBi the bias added to the
  score of query i and key j;
- the relation between positions as a function of their distance d = j - i, seen from a few reference positions
  i: for absolute encodings the dot product PE(i)·PE(i + d); for RoPE the score (R_i x)·(R_{i+d} x) of one vector
  rotated to two positions; for ALiBi the bias -m_h·|d| of every head. Where the curves from different
  reference positions lie on top of each other, the encoding depends on distance only (sinusoidal, RoPE, ALiBi);
  a learned table need not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig
from ..positions import POSITIONAL_KINDS, PositionalEncoding, build_positional
from .heatmap import _pyplot

__all__ = ["PositionalPictureData", "positional_picture_data", "positions_figure", "encoding_for_kind",
           "check_positions"]

MAX_DRAWN_POSITIONS = 8192  # rows of a picture; LLaMA-2's context is 4,096
MAX_TABLE = 1 << 24  # numbers in a stand-alone encoding's table (64 MB of float32)


@dataclass
class PositionalPictureData:
    kind: str
    table: Tensor | None  # (rows, columns) or None when the encoding has nothing to tabulate
    table_title: str
    table_axes: tuple[str, str]
    distances: Tensor  # (n,) the x axis of the curves
    curves: dict[str, Tensor]  # label → (n,) values, NaN where a reference position has no such distance
    curves_title: str
    table_values: str = ""  # what a colour in the table means: the colour bar's label


def encoding_for_kind(kind: str, *, n_positions: int = 128, d_model: int = 128, n_heads: int = 8
                      ) -> PositionalEncoding:
    """A stand-alone positional encoding of the named kind (learned tables start at their random init)."""
    if kind not in POSITIONAL_KINDS:
        raise ValueError(f"unknown positional encoding {kind!r}; choose one of {', '.join(POSITIONAL_KINDS)}")
    # the model's own rules (positive sizes, d_model divisible by n_heads, even sin/cos and RoPE pairs)
    ModelConfig(d_model=d_model, n_heads=n_heads, max_seq_len=n_positions, positional=kind)
    check_positions(n_positions)
    if n_positions * d_model > MAX_TABLE:
        raise ValueError(f"a table of {n_positions:,} positions x d_model={d_model:,} holds more than the "
                         f"{MAX_TABLE:,} numbers qkv draws; pick fewer positions or a smaller d_model")
    return build_positional(kind, max_positions=n_positions, d_model=d_model, n_heads=n_heads)


def check_positions(n_positions: int) -> int:
    """How many positions a picture draws: at least 2 (a distance needs two), at most ``MAX_DRAWN_POSITIONS``."""
    if isinstance(n_positions, bool) or not isinstance(n_positions, int):
        raise TypeError(f"the number of positions must be an integer, got {n_positions!r}")
    if not 2 <= n_positions <= MAX_DRAWN_POSITIONS:
        raise ValueError(f"positions={n_positions:,} must lie in [2, {MAX_DRAWN_POSITIONS:,}]: a picture cannot "
                         "show more rows than that, nor a distance with fewer")
    return n_positions


def _references(n: int) -> list[int]:
    return sorted({0, n // 4, n // 2})


def _by_distance(pair_value, n: int) -> tuple[Tensor, dict[str, Tensor]]:
    """curves[i][d] = pair_value(i, i + d) for a few reference positions i, over d = -(n-1) .. n-1."""
    distances = torch.arange(-(n - 1), n)
    curves = {}
    for i in _references(n):
        j = i + distances
        inside = (j >= 0) & (j < n)
        values = torch.full((len(distances),), float("nan"), dtype=torch.float64)
        values[inside] = pair_value(i, j[inside]).double()
        curves[f"from position {i}"] = values
    return distances, curves


@torch.no_grad()
def positional_picture_data(encoding: PositionalEncoding, n_positions: int = 64) -> PositionalPictureData:
    """The numbers both panels draw, for any positional encoding of qkv."""
    n = min(check_positions(n_positions), encoding.max_positions)
    kind = encoding.kind
    table = encoding.table(n)
    if table is not None:  # absolute: sinusoidal, learned
        table = table.detach().float().cpu()
        distances, curves = _by_distance(lambda i, j: table[j] @ table[i], n)
        return PositionalPictureData(kind, table, f"{kind} table: the vector added at each position",
                                     ("dimension", "position"), distances, curves,
                                     "PE(i) · PE(i + d): dot product against distance d",
                                     "value added to the token's embedding")
    device = next((b.device for b in encoding.buffers()), torch.device("cpu"))
    positions = torch.arange(n, device=device)[None, :]
    rotate = encoding.rotary(positions)
    if rotate is not None:  # RoPE: rotate one fixed vector to every position and compare the rotated copies
        d_k = encoding.cos.shape[-1]
        x = torch.ones(1, 1, n, d_k, device=device)
        rotated = rotate(x)[0, 0].float().cpu()  # (n, d_k): R_p x
        distances, curves = _by_distance(lambda i, j: rotated[j] @ rotated[i], n)
        return PositionalPictureData(kind, encoding.cos[:n].float().cpu(),
                                     "RoPE: cos(p · w_i), the rotation of each query/key pair",
                                     ("dimension of q and k", "position"), distances, curves,
                                     "(R_i x) · (R_{i+d} x): score of one vector at two positions",
                                     "cos(p · w_i)")
    last = encoding.attention_bias(1, n, device)  # the last query's row: it sees every distance back to key 0
    if last is not None:  # ALiBi: a penalty per head, linear in distance
        last = last[0, :, 0].float().cpu()  # (heads, n): bias of query n-1 against key j
        distances = torch.arange(-(n - 1), n)
        curves = {}
        for h in range(last.shape[0]):
            values = torch.full((len(distances),), float("nan"), dtype=torch.float64)
            keys = n - 1 + distances
            inside = (keys >= 0) & (keys < n)
            values[inside] = last[h, keys[inside]].double()
            curves[f"head {h}"] = values
        # head 0's (n, n) table from that row, as the bias depends on |i - j| only: never (heads, n, n) at once
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        table = last[0, n - 1 - (i - j).abs()]
        return PositionalPictureData(kind, table, "ALiBi, head 0: bias added to score(query i, key j)",
                                     ("key position j", "query position i"), distances, curves,
                                     "-m_h · |d|: the bias of each head against distance d",
                                     "bias added to the attention score")
    return PositionalPictureData(kind, None,
                                 "no positional encoding: an encoder sees a bag of tokens (a causal mask still leaks "
                                 "order)", ("", ""), torch.arange(0), {}, "nothing depends on position")


def positions_figure(encoding: PositionalEncoding, n_positions: int = 64, *, title: str | None = None):
    """Two panels: the encoding's table as a heatmap, and its relation between positions against distance."""
    data = positional_picture_data(encoding, n_positions)
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    if data.table is None:
        for ax in (left, right):
            ax.axis("off")
        left.text(0.5, 0.5, data.table_title, ha="center", va="center", wrap=True)
        right.text(0.5, 0.5, data.curves_title, ha="center", va="center")
    else:
        image = left.imshow(data.table.numpy(), aspect="auto", cmap="RdBu_r", interpolation="nearest")
        left.set_xlabel(data.table_axes[0])
        left.set_ylabel(data.table_axes[1])
        left.set_title(data.table_title, fontsize=10)
        fig.colorbar(image, ax=left, fraction=0.046, pad=0.04).set_label(data.table_values)
        for label, values in data.curves.items():
            right.plot(data.distances.numpy(), values.numpy(), label=label, linewidth=1.2)
        right.axvline(0, color="grey", linewidth=0.5)
        right.set_xlabel("distance d = j - i")
        right.set_title(data.curves_title, fontsize=10)
        right.legend(fontsize=7, ncol=2 if len(data.curves) > 4 else 1)
    fig.suptitle(title or f"positional encoding: {data.kind}")
    return fig
