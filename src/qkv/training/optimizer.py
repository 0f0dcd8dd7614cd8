"""AdamW as the trainer builds it: weight decay on matrices only, and the fastest kernel for the device."""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import RMSNorm
from ..positions import PositionalEncoding

__all__ = ["param_groups", "adamw_kernel", "upgrade_saved_state"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on norms, biases, token/positional/segment embeddings."""
    decay, no_decay = _grouped(model)
    return [{"params": [p for _, p in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0}]


def _grouped(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(name, parameter) pairs with weight decay and without, in the order the optimizer holds them."""
    no_decay_modules = (nn.Embedding, nn.LayerNorm, RMSNorm, PositionalEncoding)
    decay, no_decay = [], []
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            exempt = isinstance(module, no_decay_modules) or name == "bias" or p.dim() < 2
            (no_decay if exempt else decay).append((f"{prefix}.{name}" if prefix else name, p))
    return decay, no_decay


def upgrade_saved_state(model: nn.Module, saved: dict) -> dict:
    """An AdamW state saved by qkv before cross-attention had W_Q and [W_K | W_V] modules of its own (it stored
    them as one ``cross_attn.qkv`` matrix) → the same moments regrouped as the weights are on loading (rows
    [:d_model] to ``q``, the rest to ``kv``), so such a run resumes exactly. Any other state is returned as is.
    """
    groups = [[name for name, _ in group] for group in _grouped(model)]
    if [len(g["params"]) for g in saved.get("param_groups", [])] == [len(g) for g in groups]:
        return saved
    old_groups = []  # the names as that qkv held them: each cross_attn.{q, kv}.X pair was one cross_attn.qkv.X
    for group in groups:
        old = []
        for name in group:
            if ".cross_attn.kv." in name and old and old[-1][0] == name.replace(".kv.", ".q."):
                old[-1] = (name.replace(".kv.", ".qkv."), [old[-1][0], name])
            else:
                old.append((name, [name]))
        old_groups.append(old)
    if [len(g["params"]) for g in saved["param_groups"]] != [len(g) for g in old_groups]:
        return saved  # not that layout either: load_state_dict names the mismatch
    state, param_groups, index = {}, [], 0
    for saved_group, old in zip(saved["param_groups"], old_groups, strict=True):
        ids = []
        for saved_id, (old_name, new_names) in zip(saved_group["params"], old, strict=True):
            moments = saved["state"].get(saved_id)
            if len(new_names) == 1:
                parts = [moments]
            else:
                d_model = model.get_submodule(old_name.rsplit(".qkv.", 1)[0]).d_model
                rows = (slice(None, d_model), slice(d_model, None))
                parts = [None if moments is None else
                         {k: v[part].clone() if v.dim() else v.clone() for k, v in moments.items()} for part in rows]
            for part in parts:
                if part is not None:
                    state[index] = part
                ids.append(index)
                index += 1
        param_groups.append({**saved_group, "params": ids})
    return {"state": state, "param_groups": param_groups}


def adamw_kernel(device: torch.device) -> dict:
    """AdamW's implementation: one fused kernel on CPU and CUDA (4-6x faster than foreach on the CPU here)."""
    fused = device.type in ("cpu", "cuda")
    return {"fused": True if fused else None, "foreach": None if fused else True}
