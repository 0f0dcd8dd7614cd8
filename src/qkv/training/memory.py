"""Activation checkpointing: keep each block's input, not its activations, and recompute them in the backward pass.

A Transformer's training memory is dominated by what each block keeps for the backward pass (attention weights,
the feed-forward's hidden layer: O(layers · batch · T · d_ff)). With checkpointing a block keeps only its input
and runs its forward a second time during backward: memory per block falls to one (batch, T, d_model) tensor, for
about a third more compute. The gradients are the same numbers (dropout masks are replayed: torch restores the
random state for the recomputation).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..blocks import Stack

__all__ = ["checkpoint_activations", "is_checkpointing"]

_CLASSES: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    """A subclass of block class ``cls`` whose forward, while training with gradients, runs under
    ``torch.utils.checkpoint`` (weights and state-dict names unchanged: only the class differs)."""
    if cls not in _CLASSES:
        def forward(self, *args, **kwargs):
            if self.training and torch.is_grad_enabled():
                return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)
            return cls.forward(self, *args, **kwargs)

        _CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__, "checkpointed": True})
    return _CLASSES[cls]


def checkpoint_activations(model: nn.Module) -> int:
    """Turn on activation checkpointing for every block of ``model`` (any wrapper around a qkv model: peft, DDP),
    in place → the number of blocks. Evaluation and generation (no gradient, or eval mode) run as before."""
    n = 0
    for module in model.modules():
        if isinstance(module, Stack):
            for block in module.layers:
                if not getattr(block, "checkpointed", False):
                    block.__class__ = _checkpointed(type(block))
                n += 1
    return n


def is_checkpointing(model: nn.Module) -> bool:
    """Whether ``model``'s blocks recompute their activations in the backward pass."""
    return any(getattr(m, "checkpointed", False) for m in model.modules())
