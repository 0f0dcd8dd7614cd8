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


def head_colour(head: int, n_heads: int) -> tuple[float, float, float]:
    """One colour per head, evenly spaced around the hue circle (the same rule as the explorer page)."""
    import colorsys

    return colorsys.hls_to_rgb(((head * 360 / max(n_heads, 1) + 8) % 360) / 360, 0.42, 0.78)


def attention_lines(
    weights: torch.Tensor,
    query_labels: Sequence[str],
    key_labels: Sequence[str] | None = None,
    *,
    heads: Sequence[int] | None = None,
    token: int | None = None,
    threshold: float = 0.02,
    title: str | None = None,
    ax=None,
):
    """The "lines" picture: queries on the left, keys on the right, a line from each query to each key it attends
    to, opacity = weight, one colour per head. ``weights`` is (heads, queries, keys) or one head (queries, keys);
    ``heads`` picks which to draw; ``token`` highlights one query's lines (the others fade). Returns the Figure.
    """
    from matplotlib.collections import LineCollection

    weights = torch.as_tensor(weights).detach().float().cpu()
    if weights.dim() == 2:
        weights = weights[None]
    if weights.dim() != 3:
        raise ValueError(f"attention_lines draws (heads, queries, keys), got {tuple(weights.shape)}")
    n_heads, n_q, n_k = weights.shape
    key_labels = query_labels if key_labels is None else key_labels
    heads = range(n_heads) if heads is None else heads
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.2, 0.26 * max(n_q, n_k) + 1.2))
    else:
        fig = ax.figure
    segments, colours = [], []
    for h in heads:
        r, g, b = head_colour(h, n_heads)
        for i, j in (weights[h] >= threshold).nonzero().tolist():
            alpha = float(weights[h, i, j]) * (1.0 if token is None or i == token else 0.08)
            segments.append([(0.0, -i), (1.0, -j)])
            colours.append((r, g, b, alpha))
    ax.add_collection(LineCollection(segments, colors=colours, linewidths=2.0))
    for side, x, labels, align in ((0, -0.04, query_labels, "right"), (1, 1.04, key_labels, "left")):
        for i, label in enumerate(labels):
            lit = token is not None and (i == token if side == 0 else any(
                float(weights[h, token, i]) >= threshold for h in heads))
            ax.text(x, -i, visible(label), ha=align, va="center", fontsize=9,
                    fontweight="bold" if lit else "normal", color="black" if lit or token is None else "0.45")
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(-max(n_q, n_k) + 0.4, 0.8)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def attention_panels(
    maps: torch.Tensor,
    query_labels: Sequence[str],
    key_labels: Sequence[str] | None,
    panels: Sequence[tuple[int, Sequence[int]]],
    *,
    lines: bool = False,
    token: int | None = None,
    title: str | None = None,
):
    """Side-by-side panels of chosen heads: each panel is (layer, heads); heatmaps need one head per panel,
    lines overlay several heads (one colour each). ``token`` highlights one query."""
    maps = torch.as_tensor(maps).detach().float().cpu()
    n_q, n_k = maps.shape[2], maps.shape[3]
    key_labels = query_labels if key_labels is None else key_labels
    plt = _pyplot()
    width = 4.2 if lines else max(3.5, 0.26 * n_k + 1.6)
    height = 0.26 * max(n_q, n_k) + (1.2 if lines else 1.8)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    for ax, (layer, heads) in zip(axes[0], panels, strict=True):
        heads = list(heads)
        name = f"layer {layer}, head {heads[0]}" if len(heads) == 1 else f"layer {layer}, heads {heads[0]}-{heads[-1]}"
        if lines:
            attention_lines(maps[layer], query_labels, key_labels, heads=heads, token=token, title=name, ax=ax)
            continue
        if len(heads) != 1:
            raise ValueError(f"a heatmap panel shows one head, got heads {heads}; pick one head per panel")
        attention_heatmap(maps[layer, heads[0]], query_labels, key_labels, title=name, ax=ax, colorbar=False)
        if token is not None:
            from matplotlib.patches import Rectangle

            ax.add_patch(Rectangle((-0.5, token - 0.5), n_k, 1, fill=False, edgecolor="red", linewidth=1.5))
    if title:
        fig.suptitle(title)
    return fig
