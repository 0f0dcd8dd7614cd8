"""Attention weights as a heatmap: one row per query token, one column per key token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("pictures need matplotlib: pip install 'qkv[viz]'") from None
    return plt


def attention_heatmap(
    weights: torch.Tensor,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    ax=None,
    cmap: str = "viridis",
    colorbar: bool = True,
):
    """Draw a (queries, keys) attention matrix: cell (i, j) = how much query i attends to key j.

    Returns the matplotlib Figure. Labels are token pieces; whitespace is shown visibly so "␣" and "⏎" are
    distinguishable in a character model.
    """
    weights = torch.as_tensor(weights).detach().float().cpu()
    if weights.dim() != 2:
        raise ValueError(f"attention_heatmap draws one head: expected (queries, keys), got {tuple(weights.shape)}")
    n_q, n_k = weights.shape
    query_labels = list(query_labels) if query_labels is not None else [str(i) for i in range(n_q)]
    key_labels = list(key_labels) if key_labels is not None else query_labels if n_q == n_k else [
        str(i) for i in range(n_k)]
    if len(query_labels) != n_q or len(key_labels) != n_k:
        raise ValueError(f"{len(query_labels)} query / {len(key_labels)} key labels for a {n_q}x{n_k} map")
    plt = _pyplot()
    if ax is None:
        size = max(4.0, 0.28 * max(n_q, n_k) + 2)
        fig, ax = plt.subplots(figsize=(size + 1, size))
    else:
        fig = ax.figure
    image = ax.imshow(weights.numpy(), cmap=cmap, vmin=0.0, vmax=max(float(weights.max()), 1e-9), aspect="auto")
    ax.set_xticks(range(n_k), [visible(t) for t in key_labels], rotation=90, fontsize=8)
    ax.set_yticks(range(n_q), [visible(t) for t in query_labels], fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return fig


def visible(token: str) -> str:
    """Show whitespace in a label: space → ␣, newline → ⏎, tab → ⇥."""
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure as PNG, creating parent folders, and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def attention_grid(
    maps: torch.Tensor,
    query_labels: Sequence[str],
    key_labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    layers: Sequence[int] | None = None,
    cmap: str = "viridis",
):
    """Draw every head of every layer: a grid of heatmaps, one row per layer, one column per head.

    ``maps`` is (layers, heads, queries, keys). Token labels go on the left column (queries) and the bottom row
    (keys); each panel keeps its own colour scale from 0 to its largest weight.
    """
    maps = torch.as_tensor(maps).detach().float().cpu()
    if maps.dim() != 4:
        raise ValueError(f"attention_grid draws (layers, heads, queries, keys), got {tuple(maps.shape)}")
    layers = list(range(maps.shape[0])) if layers is None else list(layers)
    n_rows, n_cols = len(layers), maps.shape[1]
    n_q, n_k = maps.shape[2], maps.shape[3]
    key_labels = query_labels if key_labels is None else key_labels
    plt = _pyplot()
    cell = min(2.6, max(1.2, 0.11 * max(n_q, n_k)))
    margin = 0.09 * max(len(visible(t)) for t in [*query_labels, *key_labels]) + 0.4
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * cell + margin, n_rows * cell + margin + 0.4),
                             squeeze=False)
    font = 7 if max(n_q, n_k) <= 24 else 5
    for r, layer in enumerate(layers):
        for h in range(n_cols):
            ax = axes[r][h]
            attention_heatmap(maps[layer, h], query_labels, key_labels, ax=ax, cmap=cmap, colorbar=False)
            ax.set_xlabel("")
            ax.set_ylabel("")
            ax.tick_params(length=0, labelsize=font)
            if h:
                ax.set_yticks([])
            else:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
            if r < n_rows - 1:
                ax.set_xticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig
