"""Training under torchrun, data-parallel (DDP) and sharded (FSDP): two CPU processes (Gloo) train exactly as one
process with twice the gradient accumulation (the sync-after-accumulation order included), their masked-LM step is
the one-batch step over every masked token of both, and a two-process run resumes exactly (each process's dropout
generator included)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qkv import ModelConfig
from qkv.loading import load
from qkv.models import Encoder
from qkv.train import IGNORE_INDEX, resume

ARGS = ["tiny-decoder", "--batch-size", "4", "--context", "32", "--d-model", "32", "--n-heads", "2", "--d-ff", "64",
        "--n-decoder-layers", "2", "--max-seq-len", "32", "--eval-every", "3", "--eval-batches", "2", "--seed", "1",
        "--lr", "3e-3", "--warmup-steps", "2", "--max-steps", "6", "--no-progress"]


def qkv_train(*args: str, processes: int = 1) -> str:
    """``qkv train ARGS`` in a fresh process, or in ``processes`` of them under torchrun → its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    done = subprocess.run([sys.executable, *launcher, "-m", "qkv", "train", *args], capture_output=True, text=True,
                          env=env, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def weights(run_dir) -> dict[str, torch.Tensor]:
    latest = (run_dir / "latest").read_text().strip()
    return load_file(run_dir / latest / "model.safetensors")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_accumulating_two_batches_train_as_one_process_accumulating_four(tmp_path, parallel):
    """Each process keeps its first micro-batch's gradients local (DDP's no_sync, FSDP's gradient sync off) and
    averages once after the second; the four batches of a step are those one process would take, so the weights
    must agree, whether every process holds the model (DDP) or a shard of it (FSDP)."""
    two = qkv_train(*ARGS, "--dropout", "0", "--grad-accum", "2", "--parallel", parallel, "--out",
                    str(tmp_path / "two"), processes=2)
    one = qkv_train(*ARGS, "--dropout", "0", "--grad-accum", "4", "--out", str(tmp_path / "one"))
    assert two.count("done: step 6") == 1  # only the first process speaks
    expected, got = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert expected.keys() == got.keys()
    for name in expected:
        e, g = expected[name], got[name]
        if name.endswith("qkv.bias"):  # the key bias shifts each query's scores by q·b_k, which softmax ignores:
            # its gradient is round-off alone, and AdamW's g/(|g| + eps) scales that to lr-sized steps. Compare the
            # query and value thirds.
            e, g = e.view(3, -1)[[0, 2]], g.view(3, -1)[[0, 2]]
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6, msg=name)
    assert val_losses(two) == val_losses(one) and len(val_losses(one)) == 2  # at steps 3 and 6, every digit


def val_losses(stdout: str) -> list[str]:
    return [line.split("| val ")[1].split()[0] for line in stdout.splitlines() if "| val " in line]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_two_process_run_resumes_exactly_and_only_as_two_processes(tmp_path, parallel):
    """FSDP's checkpoint holds the whole model and optimizer state, gathered from the shards."""
    run = tmp_path / "run"
    qkv_train(*ARGS, "--dropout", "0.1", "--keep-checkpoints", "3", "--parallel", parallel, "--out", str(run),
              processes=2)
    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(run / "step-000003", again / "step-000003")
    qkv_train("--resume", str(again / "step-000003"), processes=2)
    expected, got = weights(run), weights(again)
    for name in expected:  # dropout masks drawn again from each process's saved generator: bit for bit
        assert torch.equal(got[name], expected[name]), name
    with pytest.raises(ValueError, match="trained as 2 process.* resuming as 1.*--nproc_per_node=2"):
        resume(run / "step-000003", out_dir=tmp_path / "single")


def test_sigterm_to_torchrun_stops_every_process_at_one_step_with_one_checkpoint(tmp_path):
    """torchrun passes SIGTERM on to its workers; they agree on the step, save once, and say how to resume."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = tmp_path / "run"
    endless = list(ARGS)
    endless[endless.index("--max-steps") + 1] = "1000000"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "qkv",
               "train", *endless, "--save-every", "0", "--out", str(run)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:  # wait until both processes are training
        if line.startswith("step 1:"):
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    saved = sorted(p.name for p in run.glob("step-*"))
    assert len(saved) == 1 and (run / "latest").read_text().strip() == saved[0], (saved, err[-2000:])
    step = int(saved[0].split("-")[1])
    assert f"SIGTERM at step {step}: saved checkpoint" in err
    assert "continue with `torchrun --nproc_per_node=2 -m qkv train --resume" in err
    model, _ = load(run)  # a complete checkpoint
    assert model.num_parameters() > 0


# One masked-LM step under torchrun, with DDP and with FSDP: process r takes micro-batches r and r + 2 of four.
# Process 0 saves the gradients the optimizer applied, the logged loss and tokens, and what a reference needs.
MLM_STEP = """
import sys
import torch
from qkv import ModelConfig
from qkv.models import Encoder
from qkv.tokenizers import Tokenizer
from qkv.train import TrainConfig, Trainer

class ListSource:
    def __init__(self, batches):
        self.batches = batches
    def batch(self, index):
        return self.batches[index]
    def fixed(self, n_batches):
        return self.batches[:n_batches]

tok = Tokenizer.char("abcdefghijklmnopqrstuvwxyz", special_tokens=["<mask>"])
config = ModelConfig(**CONFIG, vocab_size=tok.vocab_size)
batches = [torch.randint(0, 26, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
torch.manual_seed(0)
initial = {k: v.clone() for k, v in Encoder(config).state_dict().items()}
saved = {"initial": initial, "batches": batches}
for parallel in ("ddp", "fsdp"):
    model = Encoder(config)
    model.load_state_dict(initial)
    options = TrainConfig(max_steps=1, grad_accum=2, parallel=parallel, warmup_steps=0, grad_clip=None,
                          progress=False, eval_batches=1, device="cpu")  # Gloo, fp32
    trainer = Trainer(model, tok, ListSource(batches), ListSource(batches), options, sys.argv[1] + "/" + parallel)
    applied = []
    def keep(*_):  # FSDP holds a shard of each gradient: gather it whole
        applied.append([getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for p in model.parameters()])
    trainer.optimizer.register_step_pre_hook(keep)
    loss, _, tokens = trainer.train_step()
    corrupted = [trainer.objective.corrupt(b, trainer._generator(i)) for i, b in enumerate(batches)]
    saved[parallel] = {"loss": loss, "tokens": tokens, "gradients": applied[0], "corrupted": corrupted}
if trainer.rank == 0:
    torch.save(saved, sys.argv[1] + "/step.pt")
"""
MLM_CONFIG = dict(d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=0, max_seq_len=24,
                  dropout=0.0)


def test_two_processes_accumulating_masked_lm_take_the_one_batch_step_over_all_masked_tokens(tmp_path):
    """Four micro-batches (two per process) hold different numbers of masked tokens; the counts are added across
    the processes before the backward passes, so DDP and FSDP apply the gradient of one batch holding all four:
    the mean cross-entropy over every masked token, computed here in one process with F.cross_entropy."""
    script = tmp_path / "mlm_step.py"
    script.write_text(MLM_STEP.replace("**CONFIG", "**" + repr(MLM_CONFIG)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=110,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "step.pt", weights_only=True)
    for parallel in ("ddp", "fsdp"):
        step = saved[parallel]
        inputs, targets = (torch.cat(parts) for parts in zip(*step["corrupted"], strict=True))
        counts = [int((t != IGNORE_INDEX).sum()) for _, t in step["corrupted"]]
        assert len(set(counts)) > 1, counts
        model = Encoder(ModelConfig(**MLM_CONFIG, vocab_size=27))
        model.load_state_dict(saved["initial"])
        logits = model.logits(model(inputs))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        loss.backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        got = torch.cat([g.reshape(-1) for g in step["gradients"]])
        assert float((got - expected).norm() / expected.norm()) < 1e-5, parallel
        assert step["loss"] == pytest.approx(float(loss.detach()), rel=1e-6), parallel
        assert step["tokens"] == sum(b.numel() for b in saved["batches"])
