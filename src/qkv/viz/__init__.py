"""Pictures of what a Transformer computes: attention maps and positional encodings (matplotlib)."""

from .heatmap import attention_heatmap, save_figure

__all__ = ["attention_heatmap", "save_figure"]
