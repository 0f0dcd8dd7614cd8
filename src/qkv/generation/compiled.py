"""The compiled decode step: one new token through every layer as one Inductor graph (gpt-fast's shape, on a CPU).

A decode step of a small model is many small operations (two RMSNorms, RoPE, attention, the cache write, SiLU,
residual adds in each of SmolLM2's 30 layers); eagerly each is a dispatch through Python and ATen, and together
they cost more than reading the weights. :func:`compile_decoder` wraps a model in ``torch.compile(fullgraph=True,
dynamic=False)``; generation then feeds

- the **prompt eagerly** (its length differs from call to call: compiling it would give a graph per length), and
- each **one-token step through the graph**, traced once per batch size and cache capacity. The decode state
  keeps every per-step count in tensors (:mod:`qkv.decode_state`), and a compiled model's state is allocated in
  capacity buckets (:func:`state_capacity`: powers of two from 256 up to ``max_seq_len``), so calls with other
  prompt lengths and ``max_new_tokens`` reuse the graph. Compiled, a step attends to the whole bucket with a mask
  over the slots not yet written, which costs little beside the weights.

With Inductor the weights are **frozen** into the graph (Inductor's ``freezing``): read once when the step
compiles, constant-folded, and the bf16/fp32 linear layers' weights prepacked into oneDNN's/MKL's blocked layout,
which a one-token matrix-vector product reads about twice as fast as a plain ``F.linear`` over an (out, in) matrix
(SmolLM2-135M on 1 core: bf16 1.55x, fp32 1.25x, int4 1.1x; docs/results/quantize.md). The frozen graph keeps
its own copy of what it packed: change the weights afterwards and compile again.

Compiling takes tens of seconds (Inductor writes C++ and compiles it; SmolLM2 frozen: 10-40 s each time, since a
frozen graph is not kept in Inductor's on-disk cache; unfrozen, about 50 s the first time and 5 s from the
cache): it is a switch (``--compile``), and :func:`compile_counts` says how many graphs were
compiled, so a recompile (which, past dynamo's cache limit, silently falls back to eager) can be seen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..models import unwrap

__all__ = ["compile_decoder", "is_compiled", "eager_module", "state_capacity", "compile_counts", "warm_up"]

SMALLEST_BUCKET = 256  # decode-state capacities of a compiled model: 256, 512, 1024, ... up to max_seq_len


def compile_decoder(model: nn.Module, *, backend: str = "inductor", freeze: bool = True) -> nn.Module:
    """``model`` (a DecoderLM, Transformer, or one already quantized) → the same module wrapped by
    ``torch.compile(fullgraph=True, dynamic=False)``, ready for :func:`~qkv.generation.generate`,
    :func:`~qkv.generation.stream`, a :class:`~qkv.generation.conversation.Conversation` and ``qkv chat``.

    Nothing compiles until the first decode step (tens of seconds then, once per batch size and capacity
    bucket). The prompt runs on ``model``'s own weights. ``backend="eager"`` traces without code generation (what
    the tests use to count graphs quickly). Inductor's coordinate-descent tuning stays off: on a CPU it defeats
    the weight-only int8/int4 patterns (pytorch#122955). ``freeze`` (Inductor only, the default): each graph
    takes the weights as constants when it compiles, packing the bf16/fp32 linear layers' for oneDNN/MKL (module
    docstring). Change the weights afterwards and call ``compile_decoder`` again: until then the prompt (eager)
    sees the new weights, the steps of graphs already compiled the old ones, and a graph compiled later (a new
    capacity bucket) the new ones, so the output matches neither model. Raises TypeError for something that is
    not a qkv model.
    """
    unwrap(model)  # a clear TypeError for anything else
    options = {"coordinate_descent_tuning": False} if backend == "inductor" else None
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend, options=options)
    # Dynamo reads freezing from the global config while it traces (parameters as static inputs), before
    # torch.compile's options reach Inductor, so the option alone does nothing: it is set around each call instead
    compiled.forward = _watched(compiled.forward, freeze=backend == "inductor" and freeze)
    return compiled


def _watched(forward: Callable[..., Any], *, freeze: bool) -> Callable[..., Any]:
    """``forward`` run with Inductor's ``freezing`` on when ``freeze`` (it applies to calls without gradients
    only), counting each graph it compiles after its first as a recompile (dynamo itself keeps no such count)."""
    from torch._dynamo.utils import counters
    from torch._inductor import config

    graphs = 0

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal graphs
        before, frozen = counters["stats"]["unique_graphs"], config.freezing
        config.freezing = frozen or freeze  # set and restored by hand: config.patch costs 12 µs a step, this 4
        try:
            out = forward(*args, **kwargs)
        finally:
            config.freezing = frozen
        new = counters["stats"]["unique_graphs"] - before
        if new:
            counters["recompiles"]["decode step"] += new if graphs else new - 1
            graphs += new
        return out

    return call


def is_compiled(model: Any) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def eager_module(model: nn.Module) -> nn.Module:
    """The module a compiled wrapper runs (the prompt goes through it eagerly), else ``model`` itself."""
    return model._orig_mod if is_compiled(model) else model


def state_capacity(needed: int, max_seq_len: int, compiled: bool) -> int:
    """Decode-state slots for ``needed`` tokens: exactly that eagerly; for a compiled model the smallest power of
    two >= ``needed`` (at least 256), never past ``max_seq_len``, so one graph serves many calls."""
    if not compiled:
        return min(needed, max_seq_len)
    bucket = SMALLEST_BUCKET
    while bucket < needed:
        bucket *= 2
    return min(bucket, max_seq_len)


def compile_counts() -> dict[str, int]:
    """What dynamo compiled in this process so far: ``graphs`` (unique graphs traced) and ``recompiles`` (graphs a
    :func:`compile_decoder` model compiled after its first, because a guard failed: a new batch size, capacity
    bucket or dtype; counted by the wrapper, as dynamo keeps no count of its own)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(sum(counters["recompiles"].values()))}


def warm_up(model: nn.Module, batch: int = 1) -> float:
    """Compile ``model``'s decode step now (for ``batch`` rows and the first capacity bucket, the graph generation
    uses for short calls) rather than at the first real token: a one-token prompt fed eagerly, then two steps
    through the graph → the seconds it took (0 for an encoder-decoder, whose steps run as the model inside)."""
    import time

    core = unwrap(model)
    if core.model_type == "seq2seq":
        return 0.0
    start = time.perf_counter()
    with torch.inference_mode():  # the ids made inside it, as generation's are (a guard tells them apart)
        ids = torch.zeros(batch, 1, dtype=torch.long, device=next(core.parameters()).device)
        state = core.new_decode_state(batch, state_capacity(3, core.config.max_seq_len, is_compiled(model)))
        eager_module(model)(ids, decode_state=state)
        for _ in range(2):
            model(ids, decode_state=state)
    return time.perf_counter() - start
