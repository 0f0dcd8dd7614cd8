"""Pictures of what a Transformer computes: attention maps and positional encodings (matplotlib), and the data
behind them, which the web explorer (``qkv.serve``) shares. matplotlib is imported only when drawing."""

from .heatmap import (
    attention_grid,
    attention_heatmap,
    attention_lines,
    attention_panels,
    attention_picture,
    head_colour,
    save_figure,
)
from .maps import KIND_TITLES, AttentionMaps, attention_kinds, attention_maps, check_index, encode_input
from .positions import encoding_for_kind, positional_picture_data, positions_figure

__all__ = [
    "attention_heatmap",
    "attention_grid",
    "attention_lines",
    "attention_panels",
    "attention_picture",
    "head_colour",
    "save_figure",
    "AttentionMaps",
    "attention_maps",
    "attention_kinds",
    "encode_input",
    "check_index",
    "KIND_TITLES",
    "positional_picture_data",
    "positions_figure",
    "encoding_for_kind",
]
