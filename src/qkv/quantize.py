"""Weight-only quantization: int8 and int4 layers that stand in for ``nn.Linear`` and multiply on PyTorch's
packed CPU kernels; ``quantize(model, "int8" | "int4")`` swaps them in.

A decoding step reads every weight once per token, so its speed is the weights' bytes over the memory's pace.
Fewer bits per weight read fewer bytes:

- ``Int8Linear``: y = x (q ⊙ s)^T + b, q an int8 matrix (N, K), s one scale per output channel (row), s = max|w|/127.
  ``torch.ops.aten._weight_int8pack_mm(x, q, s)``. Half of bf16's bytes.
- ``Int4Linear``: group-wise int4, w[n, k] = (q[n, k] − 8) · s[n, g] + z[n, g] for the group g = k // G of G
  consecutive inputs (G = 32, 64, 128 or 256), q in 0..15, the scale s and zero z in bf16 (the min-max rule: s =
  (max − min)/15, z = min + 8 s). ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, scales_and_zeros)``
  with the codes packed by ``_convert_weight_to_int4pack_for_cpu``. 0.5 + 4/G bytes a weight: 0.28x of bf16 at
  G = 64, 0.31x at G = 32 (a GGUF Q4_1 file's 5 bits a weight).

These kernels are vectorized on x86 for bf16 activations only (fp32 runs a scalar loop, ten times slower), so
each layer casts its input to bf16, multiplies, and casts the result back to the input's dtype: an fp32 model's
quantized layers see its activations rounded to bf16 (a relative 2^-8). The scales and zeros are bf16 for the same
reason. ``torchao`` offers both kinds too; measured here (torch 2.13, one thread) its eager int8 layer is a
dequantize then a matmul, slower than bf16, and its CPU int4 layer calls the same int4 kernel: qkv calls the
kernels itself.

The int4 packed layout depends on the CPU that packed it, so weights are packed when a model is loaded
(``qkv.load(path, quantize="int4")``) on the machine that runs them, and never saved: a quantized layer refuses to
be written to a state dict. ``dequantized()`` gives the float weights a layer represents (for pictures, the
``W_Q..W_O`` views after ``dequantize(model)``, and the tests that hold the kernel to them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import unwrap

__all__ = ["MODES", "GROUP_SIZES", "DEFAULT_GROUP_SIZE", "Int8Linear", "Int4Linear", "quantize", "dequantize",
           "int4_codes", "quantized_bytes", "check_mode"]

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel takes
DEFAULT_GROUP_SIZE = 64
ACTIVATIONS = torch.bfloat16  # the dtype the packed kernels are vectorized for

_INT8_K = 16  # the int8 kernel reads the inputs in blocks of 16: other widths crash it, so they are padded
_INT4_N = 16  # the int4 packing takes output rows in multiples of 16


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Quantized(nn.Module):
    """What both layers share: the shapes, the bias, bf16 activations in and the input's dtype out, no saving."""

    in_features: int
    out_features: int

    def _set_bias(self, bias: Tensor | None) -> None:
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def _input(self, x: Tensor, width: int) -> Tensor:
        """x (..., K) → bf16 (rows, width), zero-padded past K (a padded column multiplies a zero)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs of width {self.in_features}, got {x.shape[-1]}")
        x2 = x.reshape(-1, x.shape[-1]).to(ACTIVATIONS).contiguous()
        return F.pad(x2, (0, width - self.in_features)) if width != self.in_features else x2

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(f"{prefix.rstrip('.') or 'this layer'} is an {type(self).__name__}, packed for this CPU "
                           "and never saved: save the float model, and quantize it when loading "
                           "(qkv.load(path, quantize=...)); qkv.quantize.dequantize(model) gives a float copy")

    def dequantized(self) -> Tensor:  # pragma: no cover - each layer has its own
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_Quantized):
    """y = x (q ⊙ s)^T + b: int8 weights q (out, in) with one bf16 scale s per output channel, on
    ``torch.ops.aten._weight_int8pack_mm``. Build it with ``Int8Linear.from_linear(linear)``."""

    def __init__(self, weight_int8: Tensor, scales: Tensor, bias: Tensor | None = None, *,
                 in_features: int | None = None):
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2 or scales.shape != weight_int8.shape[:1]:
            raise ValueError("Int8Linear takes int8 weights (out, in) and one scale per output row")
        self.out_features = weight_int8.shape[0]
        self.in_features = in_features if in_features is not None else weight_int8.shape[1]
        width = _round_up(self.in_features, _INT8_K)
        if weight_int8.shape[1] != width:
            weight_int8 = F.pad(weight_int8[:, :self.in_features], (0, width - self.in_features))
        self.register_buffer("weight_int8", weight_int8.contiguous(), persistent=False)
        self.register_buffer("scales", scales.to(ACTIVATIONS).contiguous(), persistent=False)
        self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Per-channel symmetric int8: s = max_k |w[n, k]| / 127 (rounded to bf16), q = round(w / s)."""
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).to(ACTIVATIONS).float()
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # a row of zeros: q = 0, any scale
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales, linear.bias, in_features=linear.in_features)

    def forward(self, x: Tensor) -> Tensor:
        scales = self.scales if self.scales.dtype == ACTIVATIONS else self.scales.to(ACTIVATIONS)
        y = torch.ops.aten._weight_int8pack_mm(self._input(x, self.weight_int8.shape[1]), self.weight_int8, scales)
        return self._output(y, x)

    def dequantized(self) -> Tensor:
        """The float32 weights (out, in) this layer multiplies by: q ⊙ s."""
        return self.weight_int8[:, :self.in_features].float() * self.scales.to(ACTIVATIONS).float()[:, None]


def int4_codes(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise asymmetric int4 of a weight (N, K), K a multiple of ``group_size`` → (codes (N, K) int32 in 0..15,
    scales (N, K/G) bf16, zeros (N, K/G) bf16) with w ≈ (q − 8) · s + z: per group of G inputs of a row, s = (max −
    min)/15 and z = min + 8 s, both rounded to bf16, then q = round((w − z)/s) + 8 with those rounded values."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).to(ACTIVATIONS)
    zeros = (low + 8 * scales.float()).to(ACTIVATIONS)
    s = scales.float()[..., None]
    q = torch.where(s > 0, torch.round((groups - zeros.float()[..., None]) / torch.where(s > 0, s, 1)) + 8, 8.0)
    return q.clamp(0, 15).to(torch.int32).reshape(n, k), scales, zeros


class Int4Linear(_Quantized):
    """y = x Ŵ^T + b with Ŵ[n, k] = (q[n, k] − 8) · s[n, k // G] + z[n, k // G]: 4-bit codes q packed for this CPU,
    a bf16 scale s and zero z per group of G inputs, on ``torch.ops.aten._weight_int4pack_mm_for_cpu``. Build it
    with ``Int4Linear.from_linear(linear, group_size)``, or from codes (a GGUF file's Q4 blocks) with
    ``Int4Linear.from_codes``."""

    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, group_size: int, bias: Tensor | None, *,
                 in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_int4", packed, persistent=False)  # (N padded, K padded / 2) uint8
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)  # (K/G, N, 2) bf16
        self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        """Quantize ``linear``'s weight by :func:`int4_codes`, ``group_size`` inputs a group."""
        _check_group_size(group_size)
        w = linear.weight.detach().float()
        width = _round_up(linear.in_features, group_size)
        if width != linear.in_features:  # zero columns close the last group; the padded inputs are zeros
            w = F.pad(w, (0, width - linear.in_features))
        codes, scales, zeros = int4_codes(w, group_size)
        return cls.from_codes(codes, scales, zeros, group_size, linear.bias, in_features=linear.in_features)

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None,
                   *, in_features: int | None = None) -> Int4Linear:
        """Pack codes (N, K) in 0..15 with their scales and zeros (N, K/G), so that w = (q − 8) · s + z, for this
        CPU's kernel. K must be a multiple of G (pad the codes; ``in_features`` says how many inputs are real)."""
        _check_group_size(group_size)
        n, k = codes.shape
        if k % group_size or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
            raise ValueError(f"codes {tuple(codes.shape)} need K a multiple of group_size={group_size} and scales "
                             f"and zeros of shape {(n, k // group_size)}, got {tuple(scales.shape)}")
        rows = _round_up(n, _INT4_N)
        if rows != n:  # rows of zeros (scale 0, zero 0) whose outputs are cut off
            codes = F.pad(codes, (0, 0, 0, rows - n), value=8)
            scales, zeros = (F.pad(t.float(), (0, 0, 0, rows - n)) for t in (scales, zeros))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(ACTIVATIONS).contiguous()
        return cls(packed, scales_and_zeros, group_size, bias, in_features=k if in_features is None else in_features,
                   out_features=n)

    def forward(self, x: Tensor) -> Tensor:
        sz = self.scales_and_zeros
        sz = sz if sz.dtype == ACTIVATIONS else sz.to(ACTIVATIONS)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(self._input(x, sz.shape[0] * self.group_size),
                                                       self.weight_int4, self.group_size, sz)
        return self._output(y, x)

    def codes(self) -> Tensor:
        """The 4-bit codes q (N, K padded) in 0..15, read back through the kernel itself with unit scales and
        zero zeros (x = I gives q − 8 exactly): the packed layout is this CPU's, never parsed by hand."""
        sz = self.scales_and_zeros
        width = sz.shape[0] * self.group_size
        unit = torch.stack([torch.ones(sz.shape[:2]), torch.zeros(sz.shape[:2])], dim=-1).to(ACTIVATIONS)
        eye = torch.eye(width, dtype=ACTIVATIONS)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group_size, unit).t().float() + 8

    def dequantized(self) -> Tensor:
        """The float32 weights (out, in) this layer multiplies by: (q − 8) · s + z, group by group."""
        sz = self.scales_and_zeros.to(ACTIVATIONS).float()  # (K/G, N, 2)
        scale = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)  # (N, K)
        zero = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        w = (self.codes() - 8) * scale + zero
        return w[:self.out_features, :self.in_features]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def _check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not one the int4 kernel takes; choose one of "
                         f"{', '.join(map(str, GROUP_SIZES))}")


def check_mode(mode: str) -> str:
    """``mode`` if it names a quantization ("int8" | "int4"), else one ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not a quantization qkv knows; choose one of {', '.join(MODES)}")
    return mode


def quantize(model: nn.Module, mode: str, *, group_size: int = DEFAULT_GROUP_SIZE, output: str = "int8"
             ) -> nn.Module:
    """Swap every ``nn.Linear`` of the qkv model inside ``model`` for an ``Int8Linear`` or ``Int4Linear``
    (``group_size`` inputs a group), in place, for inference on the CPU → ``model``, in eval mode.

    The output layer becomes a quantized copy of its matrix even when it is tied: the token embedding's lookup stays
    exact (it reads one row per token, the output layer every row). The output layer is int8 unless ``output="int4"``:
    its rounding goes straight into the logits (SmolLM2 with every layer int4: perplexity +8%; with an int8 output
    layer: +0.5%, for 15% more bytes; llama.cpp keeps its output layer at 6 bits for the same reason). Layers
    already quantized stay as they are (a GGUF file's Q4 blocks are put in place before the rest is quantized).
    The weights must be on the CPU; a model with peft adapters is refused (merge them first).
    """
    check_mode(mode)
    check_mode(output)
    if "int4" in (mode, output):
        _check_group_size(group_size)
    core = unwrap(model)
    if any(hasattr(m, "base_layer") for m in core.modules()):
        raise ValueError("this model holds adapters (peft LoRA); merge them first (merge_and_unload()), then "
                         "quantize the merged model")
    devices = {p.device.type for p in core.parameters()} | {b.device.type for b in core.buffers()}
    if devices - {"cpu"}:
        raise ValueError(f"quantized layers run on the CPU's packed kernels, but the model is on "
                         f"{', '.join(sorted(devices - {'cpu'}))}; load it with device='cpu' (--device cpu)")
    for module in list(core.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                kind = output if child is core.lm_head else mode
                setattr(module, name, Int8Linear.from_linear(child) if kind == "int8"
                        else Int4Linear.from_linear(child, group_size))
    return model.eval()


def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The inverse swap, in place: every quantized layer becomes an ``nn.Linear`` holding its dequantized weights
    (in ``dtype``), so the ``W_Q..W_O`` views and training work again, with the rounding kept. A tied output layer
    stays untied: its copy was quantized, the embedding was not. → ``model``."""
    core = unwrap(model)
    for module in list(core.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, _Quantized):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, dtype=dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.dequantized())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(module, name, linear)
    return model


def quantized_bytes(module: nn.Module) -> int:
    """The bytes a module holds (parameters and buffers): what a decoding step reads of it."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
