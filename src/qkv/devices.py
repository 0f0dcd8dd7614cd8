"""Where tensors live: a device named by the user (``--device``, ``TrainConfig.device``, ``qkv.load(device=)``)
checked against what this torch build and this machine have, so a wrong name is one clear error instead of
torch's ``AssertionError: Torch not compiled with CUDA enabled`` deep inside the first ``.to()``."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]

DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else the CPU; any other name → that device, checked.

    Raises ``ValueError`` naming the device and the fix for an unknown name (``"gpu"``), a CUDA device on a torch
    build or machine without CUDA, a CUDA index past the last GPU, or MPS where it is not available.
    """
    if isinstance(name, str) and name.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device name; use one of auto, {', '.join(DEVICE_TYPES)} "
                         "(or cuda:N for the N-th GPU)") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device {name!r}: this torch {torch.__version__} is a CPU-only build; use --device "
                             "cpu, or install a CUDA build of torch (https://pytorch.org/get-started/locally/)")
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {name!r}: torch has CUDA but sees no GPU (check nvidia-smi and "
                             "CUDA_VISIBLE_DEVICES); use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: there are {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: Apple's MPS is not available here; use --device cpu")
    return device
