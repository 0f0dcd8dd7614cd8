"""Training as several processes under torchrun: who this process is, joining the group, DDP or FSDP, sums.

Every function here is a no-op question or a thin call for a plain run (one process); the trainer asks
``process_rank()`` and only calls the rest when the world holds more than one process.
"""

from __future__ import annotations

import atexit
import contextlib
import os

import torch
from torch import Tensor, nn

from ..blocks import DecoderBlock, EncoderBlock

__all__ = ["process_rank", "say_once", "replicate", "fsdp_accumulating", "full_model_state", "full_optimizer_state",
           "all_reduce", "gather_objects", "broadcast_object"]


def process_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them (RANK, WORLD_SIZE); (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def say_once(message: str) -> None:
    """Print, from the first process only when torchrun runs several."""
    if process_rank()[0] == 0:
        print(message, flush=True)


def replicate(model: nn.Module, device: torch.device, parallel: str = "ddp") -> nn.Module:
    """Join torchrun's process group (NCCL between GPUs, Gloo between CPU processes), then either wrap the model in
    DistributedDataParallel (the same weights in every process, gradients averaged during backward) or shard it
    with FSDP, one unit per block plus the rest (embeddings, final norm, output projection)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Leave the group before the interpreter tears down: a process that exits without it can die of SIGABRT
        # ("terminate called without an active exception") while Gloo's threads still hold tensors.
        atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ImportError(f"parallel='fsdp' needs torch >= 2.6 (fully_shard); this is torch {torch.__version__}: "
                          "upgrade torch, or train with parallel='ddp'") from None
    for block in [m for m in model.modules() if isinstance(m, (EncoderBlock, DecoderBlock))]:
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def fsdp_accumulating(model: nn.Module):
    """FSDP's counterpart of DDP's no_sync: keep this backward pass's gradients local and unreduced."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """A sharded model's whole state dict, gathered onto process 0's CPU (the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A sharded model's whole AdamW state (keyed by parameter name), gathered onto process 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_reduce(values: list[float], op: str) -> list[float]:
    """The element-wise sum or max of ``values`` over every process."""
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def gather_objects(obj: object, world: int) -> list:
    """Every process's ``obj``, in rank order (each process gets the whole list)."""
    import torch.distributed as dist

    every: list = [None] * world
    dist.all_gather_object(every, obj)
    return every


def broadcast_object(obj: object) -> object:
    """Process 0's ``obj``, in every process."""
    import torch.distributed as dist

    shared = [obj]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
