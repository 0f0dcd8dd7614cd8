"""Training throughput: qkv against Hugging Face GPT-2 and x-transformers, measured in the same run.

Every library trains the same decoder-only shape on the same random batch with the same step: forward, the
same cross-entropy, backward, gradient clipping to norm 1, and the same AdamW. The libraries take turns
(A/B/C/A/B/C...) so a noisy neighbour slows all of them alike; each figure is the median of the runs after a
warm-up. MFU (model FLOPs utilisation) divides model FLOPs/s by the fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..extras import require

__all__ = [
    "BenchShape",
    "TRAINING_SHAPES",
    "QUICK_SHAPE",
    "matmul_peak",
    "model_flops_per_token",
    "make_optimizer",
    "training_step",
    "build_qkv",
    "build_hf_gpt2",
    "build_x_transformers",
    "training_benchmark",
    "paired_ratio_range",
    "format_training_table",
]

VOCAB_SIZE = 65  # the character vocabulary of tiny Shakespeare


@dataclass(frozen=True)
class BenchShape:
    """One decoder-only configuration and the batch it trains on."""

    name: str
    layers: int
    heads: int
    d_model: int
    context: int
    batch: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.context


TRAINING_SHAPES = (
    BenchShape("small", layers=4, heads=4, d_model=128, context=64, batch=12),
    BenchShape("medium", layers=6, heads=6, d_model=384, context=256, batch=8),
)
QUICK_SHAPE = BenchShape("quick", layers=2, heads=2, d_model=32, context=16, batch=2)


def _sync(t: Tensor) -> None:
    """Wait for the device to finish the work queued before ``t`` (a no-op in effect on the CPU)."""
    t.reshape(-1)[0].item()


def _mm_seconds(a: Tensor, b: Tensor, out: Tensor, calls: int = 1) -> float:
    """Seconds per ``torch.mm(a, b)`` over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, b, out=out)
    _sync(out)
    return (time.perf_counter() - start) / calls


def _uses_bf16(device: torch.device, bf16: bool | None) -> bool:
    """bf16 autocast: on an accelerator unless told otherwise; on the CPU only when asked."""
    return device.type != "cpu" if bf16 is None else bf16


def _square(n: int, device: torch.device, bf16: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    dtype = torch.bfloat16 if _uses_bf16(device, bf16) else torch.float32  # what training multiplies in
    return (torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype),
            torch.empty(n, n, device=device, dtype=dtype))


def matmul_peak(n: int = 2048, repeats: int = 5, device: str | torch.device = "cpu",
                bf16: bool | None = None) -> float:
    """The matrix-multiply peak in FLOP/s: 2·n³ / (median time of ``torch.mm`` on n x n matrices).

    fp32 on the CPU (the precision qkv trains in there by default); bf16 on an accelerator or when ``bf16``.
    """
    device = torch.device(device)
    a, b, out = _square(n, device, bf16)
    calls = 1 if device.type == "cpu" else 20
    _mm_seconds(a, b, out, calls)  # warm-up
    return 2 * n**3 / statistics.median(_mm_seconds(a, b, out, calls) for _ in range(repeats))


def model_flops_per_token(n_params: int, layers: int, d_model: int, context: int) -> float:
    """Training FLOPs per token = 6·N + 12·L·d·T (N: parameters but the position embeddings; PaLM, app. B)."""
    return 6 * n_params + 12 * layers * d_model * context


def make_optimizer(model: nn.Module, lr: float = 3e-4, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """AdamW(betas=(0.9, 0.95)): the one optimizer every library in the comparison trains with.

    ``fused=True`` runs the whole update as one kernel per parameter group (CPU and CUDA alike).
    """
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                             fused=True)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: Tensor, targets: Tensor,
                  bf16: bool | None = None) -> Tensor:
    """One step: loss = CE(model(ids), targets); backward; clip the gradient norm to 1; AdamW.

    On an accelerator (or with ``bf16``) the forward runs under bf16 autocast; weights and optimizer stay fp32.
    """
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=_uses_bf16(ids.device, bf16)):
        logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


class _LogitsOnly(nn.Module):
    """Adapts a model whose forward returns an output object (Hugging Face) to ``ids → logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids).logits


def build_qkv(shape: BenchShape) -> tuple[nn.Module, int]:
    """qkv's DecoderLM at its defaults: GPT-2's layout (pre-LN, learned positions, biases, tied output),
    exact (erf) GELU as in x-transformers where GPT-2 uses the tanh approximation → (model, N)."""
    from qkv.config import ModelConfig
    from qkv.models import DecoderLM

    config = ModelConfig(vocab_size=VOCAB_SIZE, d_model=shape.d_model, n_heads=shape.heads,
                         d_ff=4 * shape.d_model, n_decoder_layers=shape.layers, max_seq_len=shape.context,
                         activation="gelu", positional="learned", norm_position="pre",
                         tie_embeddings=True, dropout=0.0)
    model = DecoderLM(config)
    return model, model.num_parameters(exclude_positions=True)


def build_hf_gpt2(shape: BenchShape) -> tuple[nn.Module, int]:
    """``GPT2LMHeadModel(GPT2Config(...))`` with every dropout 0 → (ids → logits, N)."""
    transformers = require("transformers", "the training benchmark")
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel
    config = GPT2Config(n_layer=shape.layers, n_head=shape.heads, n_embd=shape.d_model,
                        n_positions=shape.context, vocab_size=VOCAB_SIZE, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return _LogitsOnly(model), n_params


def build_x_transformers(shape: BenchShape) -> tuple[nn.Module, int]:
    """``TransformerWrapper(attn_layers=Decoder(...))``, head size d // H, tied embedding → (model, N)."""
    x_transformers = require("x_transformers", "the training benchmark")
    Decoder, TransformerWrapper = x_transformers.Decoder, x_transformers.TransformerWrapper
    model = TransformerWrapper(num_tokens=VOCAB_SIZE, max_seq_len=shape.context, tie_embedding=True,
                               attn_layers=Decoder(dim=shape.d_model, depth=shape.layers, heads=shape.heads,
                                                   attn_dim_head=shape.d_model // shape.heads))
    positions = sum(p.numel() for n, p in model.named_parameters() if n.startswith("pos_emb"))
    return model, sum(p.numel() for p in model.parameters()) - positions


BUILDERS: dict[str, Callable[[BenchShape], tuple[nn.Module, int]]] = {
    "qkv": build_qkv,
    "HF GPT-2": build_hf_gpt2,
    "x-transformers": build_x_transformers,
}


@dataclass
class _Contender:
    name: str
    shape: BenchShape
    step: Callable[[], Tensor]
    n_params: int
    rates: list[float]


def _contender(name: str, shape: BenchShape, build: Callable[[BenchShape], tuple[nn.Module, int]],
               ids: Tensor, targets: Tensor, compile: bool = False, bf16: bool | None = None) -> _Contender:
    torch.manual_seed(0)
    model, n_params = build(shape)
    model.to(ids.device).train()
    optimizer = make_optimizer(model)
    if compile:
        model = torch.compile(model)
    return _Contender(name, shape, lambda: training_step(model, optimizer, ids, targets, bf16), n_params, [])


def paired_ratio_range(rates: list[float], other_rates: list[float]) -> tuple[float, float]:
    """(lowest, highest) of rates[i] / other_rates[i]: the ratio within each round, where both libraries ran
    back to back under the same load. Its spread shows how much one run's ratio can be trusted."""
    paired = [a / b for a, b in zip(rates, other_rates, strict=True)]
    return min(paired), max(paired)


def _timed_run(contender: _Contender, steps: int) -> float:
    """Tokens per second over ``steps`` consecutive training steps (waiting for the device at the end)."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = contender.step()
    _sync(loss)
    return steps * contender.shape.tokens_per_step / (time.perf_counter() - start)


def training_benchmark(*, quick: bool = False, compile: bool = False, repeats: int = 5,
                       libraries: tuple[str, ...] | None = None, seconds_per_run: float = 1.0,
                       device: str | torch.device = "cpu", bf16: bool | None = None) -> list[dict]:
    """Rows of {config, library, tokens_per_s, mfu, vs, vs_range}: the median of ``repeats`` interleaved runs each;
    ``vs`` is qkv's median over each other library's, ``vs_range`` the lowest and highest ratio within a round.

    Each round runs every library once and a 2048 x 2048 ``torch.mm``; the median of those gives the matmul
    peak, so the peak is measured under the same conditions as the training. ``compile=True`` adds a row
    for qkv under ``torch.compile``. ``quick`` measures one tiny shape once. ``bf16``: every contender trains
    under bf16 autocast and the peak is a bf16 ``torch.mm`` (default: on accelerators only).
    """
    device = torch.device(device)
    shapes = (QUICK_SHAPE,) if quick else TRAINING_SHAPES
    repeats = 1 if quick else repeats
    names = libraries or tuple(BUILDERS)
    n, calls = (256 if quick else 2048), (1 if device.type == "cpu" else 20)
    a, b, out = _square(n, device, bf16)
    _mm_seconds(a, b, out, calls)  # warm-up
    rows = []
    for shape in shapes:
        generator = torch.Generator().manual_seed(0)
        data = torch.randint(0, VOCAB_SIZE, (shape.batch, shape.context + 1), generator=generator).to(device)
        ids, targets = data[:, :-1], data[:, 1:]
        contenders = [_contender(name, shape, BUILDERS[name], ids, targets, bf16=bf16) for name in names]
        if compile:
            contenders.append(_contender("qkv compiled", shape, build_qkv, ids, targets, compile=True, bf16=bf16))
        steps = {}
        for c in contenders:  # warm-up (and compilation); then size each run to about seconds_per_run
            _timed_run(c, 1)
            steps[c.name] = 1 if quick else max(2, round(seconds_per_run * _timed_run(c, 1) / shape.tokens_per_step))
        mm_times = []
        for _ in range(repeats):
            mm_times.append(_mm_seconds(a, b, out, calls))
            for c in contenders:
                c.rates.append(_timed_run(c, steps[c.name]))
        peak = 2 * n**3 / statistics.median(mm_times)
        medians = {c.name: statistics.median(c.rates) for c in contenders}
        for c in contenders:
            flops = model_flops_per_token(c.n_params, shape.layers, shape.d_model, shape.context)
            row = {"config": shape.name, "library": c.name, "tokens_per_s": medians[c.name],
                   "mfu": medians[c.name] * flops / peak, "peak_gflops": peak / 1e9, "n_params": c.n_params,
                   "threads": torch.get_num_threads(), "device": device.type,
                   "precision": "bf16 autocast" if _uses_bf16(device, bf16) else "fp32",
                   "shape": shape, "runs": repeats, "steps_per_run": steps[c.name], "peak_n": n}
            if c.name.startswith("qkv"):
                others = [o for o in contenders if not o.name.startswith("qkv")]
                row["vs"] = {o.name: medians[c.name] / medians[o.name] for o in others}
                row["vs_range"] = {o.name: paired_ratio_range(c.rates, o.rates) for o in others}
            rows.append(row)
    return rows


def format_training_table(rows: list[dict]) -> str:
    """The rows as a plain-text table, one line per (config, library)."""
    if not rows:
        return ""
    first = rows[0]
    precision = first["precision"]
    lines = [f"Training tokens/s: forward + cross-entropy + backward + clip + fused AdamW, {precision}, "
             f"{first['device']}, {first['threads']} threads; median of {first['runs']} interleaved runs",
             f"MFU = (6·N + 12·L·d·T) · tokens/s / matmul peak ({precision.split()[0]} torch.mm {first['peak_n']}², "
             "median, same rounds)",
             "qkv / other: ratio of the medians (in brackets: the lowest and highest ratio within one round)",
             f"  {'config':<7} {'L/H/d/T/batch':<16} {'library':<15} {'params N':>10} {'tokens/s':>9} "
             f"{'peak GF/s':>9} {'MFU':>6}  qkv / other"]
    for r in rows:
        s = r["shape"]
        dims = f"{s.layers}/{s.heads}/{s.d_model}/{s.context}/{s.batch}"
        spread = r.get("vs_range", {})
        ratios = "  ".join(f"/{other} {ratio:.2f}" + (f" ({spread[other][0]:.2f}-{spread[other][1]:.2f})"
                                                       if r["runs"] > 1 and other in spread else "")
                           for other, ratio in r.get("vs", {}).items())
        lines.append(f"  {r['config']:<7} {dims:<16} {r['library']:<15} {r['n_params']:>10,} "
                     f"{r['tokens_per_s']:>9,.0f} {r['peak_gflops']:>9.0f} {r['mfu']:>6.1%}  {ratios}")
    return "\n".join(lines)
