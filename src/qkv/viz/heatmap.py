"""Attention weights as a heatmap: one row per query token, one column per key token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..extras import require
from .maps import KIND_TITLES, AttentionMaps, check_index


def _pyplot():
    require("matplotlib", "drawing pictures").use("Agg", force=False)
    return require("matplotlib.pyplot", "drawing pictures")


COLORBAR_LABEL = "attention weight"
COUNTING = "layers and heads count from 0"
MASKED = dict(facecolor="0.82", edgecolor="0.55", hatch="////", linewidth=0)  # how a masked cell is drawn
MASKED_LABEL = "masked: may not attend"


def attention_heatmap(
    weights: torch.Tensor,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    ax=None,
    cmap: str = "viridis",
    colorbar: bool = True,
    mask: torch.Tensor | None = None,
    vmax: float | None = None,
):
    """Draw a (queries, keys) attention matrix: cell (i, j) = how much query i attends to key j.

    ``mask`` (queries, keys), bool, True = may attend (qkv's one mask convention): the cells it forbids are drawn
    hatched grey, never in the colour of weight 0, so "masked" and "attends with weight 0" look different.
    Colours run from 0 to ``vmax`` (default: the largest weight drawn); the colour bar is labelled "attention
    weight". Returns the matplotlib Figure. Labels are token pieces; whitespace is shown visibly so "␣" and "⏎"
    are distinguishable in a character model.
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
    masked = _masked_cells(mask, (n_q, n_k))
    plt = _pyplot()
    if ax is None:
        size = max(4.0, 0.28 * max(n_q, n_k) + 2)
        fig, ax = plt.subplots(figsize=(size + 1, size))
    else:
        fig = ax.figure
    drawn = np.ma.masked_array(weights.numpy(), mask=masked)
    if masked.any():  # behind the image: the masked cells, left transparent, show this hatched background
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((-0.5, -0.5), n_k, n_q, zorder=0, **MASKED))
    top = vmax if vmax is not None else max(float(weights.max()), 1e-9)
    image = ax.imshow(drawn, cmap=plt.get_cmap(cmap).with_extremes(bad=(0, 0, 0, 0)), vmin=0.0, vmax=top,
                      aspect="auto", zorder=1)
    ax.set_xticks(range(n_k), [visible(t) for t in key_labels], rotation=90, fontsize=8)
    ax.set_yticks(range(n_q), [visible(t) for t in query_labels], fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label(COLORBAR_LABEL)
        if masked.any():
            ax.legend(handles=[masked_patch()], loc="upper right", fontsize=7, framealpha=0.9)
    return fig


def _masked_cells(mask: torch.Tensor | None, shape: tuple[int, int]) -> np.ndarray:
    """Where to draw "masked" — the cells ``mask`` (True = may attend) forbids — as a numpy bool array."""
    if mask is None:
        return np.zeros(shape, dtype=bool)
    mask = torch.as_tensor(mask).detach().cpu()
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = may attend), got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the map is {shape[0]}x{shape[1]}")
    return ~mask.numpy()


def masked_patch():
    """The legend entry of a masked cell."""
    from matplotlib.patches import Patch

    return Patch(label=MASKED_LABEL, **MASKED)


def _shared_colorbar(fig, axes, image, masked: bool) -> None:
    """One colour bar for panels drawn on one 0..1 scale, and the masked-cell legend when a cell is masked."""
    fig.colorbar(image, ax=axes, fraction=0.03, pad=0.02, shrink=0.9).set_label(COLORBAR_LABEL)
    if masked:
        fig.legend(handles=[masked_patch()], loc="lower right", fontsize=7, framealpha=0.9)


def visible(token: str) -> str:
    """Show whitespace in a label: space → ␣, newline → ⏎, tab → ⇥."""
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


MAX_PIXELS = 50_000_000  # 200 MB of RGBA: far past any screen or page, still drawn in seconds
MAX_SIDE = 32_768  # pixels per side; Agg refuses 2^16


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure as a picture file (PNG unless ``path`` ends in another format matplotlib writes),
    creating parent folders, and close it. → the path written, exactly ``path``.

    Raises ``ValueError`` before drawing when ``dpi`` is not positive, when the picture would exceed
    ``MAX_PIXELS`` (naming the largest dpi that fits) or when ``path`` is a directory.
    """
    plt = _pyplot()
    path = Path(path)
    try:
        if isinstance(dpi, bool) or not isinstance(dpi, int | float) or not 0 < dpi < float("inf"):
            raise ValueError(f"dpi={dpi!r} must be a positive number of dots per inch, e.g. 110")
        width, height = (float(x) for x in fig.get_size_inches())
        pixels_w, pixels_h = round(width * dpi), round(height * dpi)
        if pixels_w * pixels_h > MAX_PIXELS or max(pixels_w, pixels_h) > MAX_SIDE:
            fits = int(min((MAX_PIXELS / (width * height)) ** 0.5, MAX_SIDE / max(width, height)))
            advice = f"use a dpi of at most {fits}" if fits >= 10 else "draw fewer tokens, layers or heads"
            raise ValueError(f"a {width:.2f}x{height:.2f}-inch picture at dpi={dpi} is {pixels_w:,}x{pixels_h:,} "
                             f"pixels, more than the {MAX_PIXELS // 1_000_000} megapixels qkv draws; {advice}")
        if path.is_dir():
            raise ValueError(f"{path} is a directory; name the picture file, e.g. {path / 'attention.png'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.set_dpi(dpi)  # lay out at the resolution written, so no larger canvas is ever allocated
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        existed = path.exists()
        try:
            fig.savefig(path, dpi=dpi, format=path.suffix[1:].lower() or "png")
        except OSError as err:  # e.g. the disk is full: name the file, and leave no half-written picture
            if not existed and path.is_file():
                path.unlink()
            raise OSError(err.errno, f"{err.strerror or err}; nothing was written", str(path)) from err
    finally:
        plt.close(fig)
    return path


def attention_grid(
    maps: torch.Tensor,
    query_labels: Sequence[str],
    key_labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    layers: Sequence[int] | None = None,
    cmap: str = "viridis",
    mask: torch.Tensor | None = None,
):
    """Draw every head of every layer: a grid of heatmaps, one row per layer, one column per head.

    ``maps`` is (layers, heads, queries, keys); ``mask`` (queries, keys), True = may attend, marks the cells every
    head was forbidden (drawn hatched grey). Token labels go on the left column (queries) and the bottom row
    (keys), the axes are named, rows and columns say "layer L" and "head H" counting from 0, and every panel
    shares one colour scale, 0 to 1 (a softmax weight's range), read on one colour bar "attention weight".
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
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * cell + margin + 1.2, n_rows * cell + margin + 1.0),
                             squeeze=False, layout="constrained")
    font = 7 if max(n_q, n_k) <= 24 else 5
    for r, layer in enumerate(layers):
        for h in range(n_cols):
            ax = axes[r][h]
            attention_heatmap(maps[layer, h], query_labels, key_labels, ax=ax, cmap=cmap, colorbar=False,
                              mask=mask, vmax=1.0)
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
    _shared_colorbar(fig, axes, axes[0][0].images[0], bool(_masked_cells(mask, (n_q, n_k)).any()))
    fig.supxlabel("key (attended to)", fontsize=9)
    fig.supylabel("query (attending)", fontsize=9)
    fig.suptitle(f"{title}\n({COUNTING})" if title else COUNTING, fontsize=10)
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
    for x, name, align in ((-0.04, "query", "right"), (1.04, "key", "left")):
        ax.text(x, 1.1, name, ha=align, va="center", fontsize=9, fontstyle="italic", color="0.3")
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(-max(n_q, n_k) + 0.4, 1.6)
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
    mask: torch.Tensor | None = None,
):
    """Side-by-side panels of chosen heads: each panel is (layer, heads); heatmaps need one head per panel (one
    0..1 colour scale for all, masked cells hatched), lines overlay several heads (one colour each, opacity = weight).
    ``token`` highlights one query."""
    maps = torch.as_tensor(maps).detach().float().cpu()
    n_q, n_k = maps.shape[2], maps.shape[3]
    key_labels = query_labels if key_labels is None else key_labels
    plt = _pyplot()
    width = 4.2 if lines else max(3.5, 0.26 * n_k + 1.6)
    height = 0.26 * max(n_q, n_k) + (1.4 if lines else 2.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) + (0 if lines else 1.0), height),
                             squeeze=False, layout="constrained")
    for ax, (layer, heads) in zip(axes[0], panels, strict=True):
        heads = list(heads)
        name = f"layer {layer}, head {heads[0]}" if len(heads) == 1 else f"layer {layer}, heads {heads[0]}-{heads[-1]}"
        if lines:
            attention_lines(maps[layer], query_labels, key_labels, heads=heads, token=token, title=name, ax=ax)
            continue
        if len(heads) != 1:
            raise ValueError(f"a heatmap panel shows one head, got heads {heads}; pick one head per panel")
        attention_heatmap(maps[layer, heads[0]], query_labels, key_labels, title=name, ax=ax, colorbar=False,
                          mask=mask, vmax=1.0)
        if token is not None:
            from matplotlib.patches import Rectangle

            ax.add_patch(Rectangle((-0.5, token - 0.5), n_k, 1, fill=False, edgecolor="red", linewidth=1.5,
                                   zorder=2))
    if not lines:
        _shared_colorbar(fig, axes, axes[0][0].images[0], bool(_masked_cells(mask, (n_q, n_k)).any()))
    note = f"{COUNTING};\nline opacity = attention weight" if lines else COUNTING
    fig.suptitle(f"{title}\n({note})" if title else note, fontsize=10)
    return fig


def attention_picture(
    found: AttentionMaps,
    kind: str,
    *,
    layer: int | None = None,
    head: int | None = None,
    picks: Sequence[tuple[int, int]] = (),
    lines: bool = False,
    token: int | None = None,
    title: str | None = None,
):
    """The picture of one kind of attention that ``qkv show attention`` draws → (Figure, the (layer, head) pairs
    shown). Layers and heads are checked (negative ones count from the end).

    - ``picks``: those heads side by side;
    - ``layer`` and ``head``: that one head enlarged (a heatmap of its own, unless ``lines`` or ``token``);
    - ``lines``: the lines picture, one panel per layer (or only ``layer``), every head overlaid;
    - otherwise the grid of every head of every layer (or only ``layer``).
    ``token`` (a query index) is highlighted.
    """
    maps, mask = found.maps[kind], found.mask(kind)
    n_layers, n_heads = maps.shape[:2]
    queries, keys = found.labels(kind)
    if head is not None and layer is None:
        raise ValueError("a head needs its layer: name the layer whose head to enlarge")
    layers = None if layer is None else [check_index("layer", layer, n_layers)]
    if picks:
        panels = [(check_index("layer", l, n_layers), [check_index("head", h, n_heads)]) for l, h in picks]
    elif head is not None:
        panels = [(layers[0], [check_index("head", head, n_heads)])]
    elif lines:
        panels = [(l, list(range(n_heads))) for l in (layers or range(n_layers))]
    else:
        rows = layers or list(range(n_layers))
        figure = attention_grid(maps, queries, keys, title=title, layers=layers, mask=mask)
        return figure, [(l, h) for l in rows for h in range(n_heads)]
    shown = [(l, h) for l, heads in panels for h in heads]
    if len(panels) == 1 and not lines and token is None:
        (l, h), = shown
        name = f"{KIND_TITLES[kind]}, layer {l}, head {h} (counting from 0)"
        return attention_heatmap(maps[l, h], queries, keys, mask=mask, title=name), shown
    return attention_panels(maps, queries, keys, panels, lines=lines, token=token, title=title, mask=mask), shown
