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
