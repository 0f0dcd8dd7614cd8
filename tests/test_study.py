"""qkv study: each quick mode runs once here and its invariants are checked; the parts they rest on are checked
against independent references (the larger model built for extrapolation, the unscaled attention, the softmax's
gradient)."""

import csv
import math

import pytest
import torch

from qkv import DecoderLM, ModelConfig
from qkv.attention import scaled_dot_product_attention
from qkv.cli import main
from qkv.study import order_study, positions_study, scale_study
from qkv.study.order import shuffle_words
from qkv.study.positions import ENCODINGS, extend_context, sliding_window_losses, token_losses
from qkv.study.report import QUICK_NOTE, markdown_table
from qkv.study.scale import attention_at_init, without_scale

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("study")


def _files_written(result) -> None:
    folder = result.out_dir
    assert (folder / "results.md").is_file() and (folder / "results.csv").is_file()
    assert result.figures and all(f.is_file() and f.stat().st_size > 10_000 for f in result.figures)
    tables = {row["table"] for row in csv.DictReader((folder / "results.csv").open())}
    assert tables == set(result.tables)
    # a quick run says so under its title, in results.md and so in what `qkv study --quick` prints
    assert result.quick and (folder / "results.md").read_text().split("\n\n")[1] == QUICK_NOTE


# -- positions --------------------------------------------------------------------------------------------------
def test_positions_quick_mode_reaches_8L_except_with_learned_positions(out):
    torch.set_num_threads(1)
    result = positions_study(quick=True, out_dir=out, progress=False)
    _files_written(result)
    long, sliding = result.table("long context"), result.table("sliding window")
    assert [r["encoding"] for r in long] == list(ENCODINGS)
    columns = [c for c in long[0] if c != "encoding"]
    assert len(columns) == 4  # L, 2L, 4L, 8L
    vocab = 65  # a model that learned nothing scores the vocabulary size (uniform guess)
    for row, window in zip(long, sliding, strict=True):
        # within the training context the long read and the sliding window are the same computation
        assert row[columns[0]] == pytest.approx(window[columns[0]], rel=1e-6)
        assert all(1.0 < window[c] < vocab for c in columns)
        if row["encoding"] == "learned":
            assert all(row[c] is None for c in columns[1:])
        else:
            assert all(1.0 < row[c] < vocab for c in columns)
    assert "n/a" in (result.out_dir / "results.md").read_text()


@pytest.mark.parametrize("kind", ["sinusoidal", "rope", "alibi", "none"])
def test_a_model_extended_past_its_context_computes_the_same_logits(kind):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=20, d_model=32, n_heads=2, d_ff=64, n_decoder_layers=2,
                                  max_seq_len=16, positional=kind)).eval()
    ids = torch.randint(0, 20, (3, 16))
    longer = extend_context(model, 64)
    assert longer.config.max_seq_len == 64
    with torch.no_grad():
        torch.testing.assert_close(longer(ids), model(ids), rtol=0, atol=1e-6)
        assert torch.isfinite(longer(torch.randint(0, 20, (1, 64)))).all()


def test_learned_positions_cannot_be_extended():
    model = DecoderLM(ModelConfig(vocab_size=20, d_model=32, n_heads=2, n_decoder_layers=1, max_seq_len=16,
                                  positional="learned"))
    with pytest.raises(ValueError, match="sliding window"):
        extend_context(model, 32)


def test_sliding_window_scores_each_token_once_with_at_least_half_a_window_of_context():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=20, d_model=32, n_heads=2, n_decoder_layers=1, max_seq_len=8,
                                  positional="learned")).eval()
    ids = torch.randint(0, 20, (2, 21))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    losses = sliding_window_losses(model, inputs, targets, window=8, stride=4)
    # independent reference: token t is predicted by the window that ends at the first multiple-of-4 end >= t + 1
    # (the first window for t < 8), reading the 8 tokens before that end (the last window: the final 8)
    for t in range(20):
        end = 8 if t < 8 else min(20, 4 * math.ceil((t + 1) / 4))
        start = end - 8
        expected = token_losses(model, inputs[:, start:end], targets[:, start:end])[:, t - start]
        torch.testing.assert_close(losses[:, t], expected)


# -- order --------------------------------------------------------------------------------------------------------
def test_order_quick_mode_no_positions_is_a_bag_of_characters_and_the_causal_mask_leaks_order(out):
    torch.set_num_threads(1)
    result = order_study(quick=True, out_dir=out, progress=False)
    _files_written(result)
    permutation = {r["encoding"]: r for r in result.table("permutation")}
    assert permutation["none"]["max |difference|"] <= 1e-6  # equivariant: exact up to float64 rounding
    assert permutation["rope"]["relative difference (mean)"] > 1e-3
    gaps = {(r["model"], r["encoding"]): r["gap (shuffled - original)"] for r in result.table("shuffled words")}
    assert abs(gaps[("masked LM", "none")]) <= 1e-6  # the same bag of characters, the same loss
    assert gaps[("masked LM", "rope")] > abs(gaps[("masked LM", "none")]) + 1e-3
    assert gaps[("causal LM", "none")] > 1e-3  # the causal mask alone tells the model where each token is
    pair = {(r["model"], r["encoding"]): r["total variation"] for r in result.table("dog bites man")}
    assert pair[("masked LM", "none")] <= 1e-6
    assert pair[("causal LM", "none")] > 1e-3


def test_shuffled_words_keep_the_characters_and_change_the_order():
    import random

    rng = random.Random(0)
    shuffled = shuffle_words("the dog bites the man", rng)
    assert shuffled != "the dog bites the man"
    assert sorted(shuffled) == sorted("the dog bites the man")
    assert shuffle_words("ha ha ha", rng) is None


# -- scale --------------------------------------------------------------------------------------------------------
def test_scale_quick_mode_entropy_falls_with_d_k_only_without_the_scale(out):
    torch.set_num_threads(1)
    result = scale_study(quick=True, out_dir=out, progress=False)
    _files_written(result)
    rows = result.table("at initialisation")
    assert [r["d_k"] for r in rows] == [16, 32, 64, 128, 256, 512]
    scaled = [r["entropy, with 1/sqrt(d_k)"] for r in rows]
    unscaled = [r["entropy, without"] for r in rows]
    assert all(a > b for a, b in zip(unscaled, unscaled[1:], strict=False))  # strictly falling
    # with the scale the scores have unit variance at every d_k: the entropy stays put (within 0.1 nats)
    assert max(scaled) - min(scaled) < 0.1
    assert unscaled[-1] < 0.25 * scaled[-1]
    assert rows[-1]["largest weight, without"] > 0.9 > 0.2 > rows[-1]["largest weight, with 1/sqrt(d_k)"]
    # a fresh qkv model (projections at std 0.02) starts far from saturation at small d_k, close to it at 512
    model = result.table("in a qkv model at initialisation")
    assert model[0]["entropy, without"] == pytest.approx(model[0]["entropy, with 1/sqrt(d_k)"], abs=0.05)
    assert model[-1]["entropy, without"] < 0.5 * model[-1]["entropy, with 1/sqrt(d_k)"]
    # bf16 keeps fp32's range: nothing overflows, but rounding large unscaled scores moves the weights more
    bf16 = result.table("in bf16 at initialisation")[-1]
    assert bf16["bf16 non-finite, without"] == bf16["bf16 non-finite, with 1/sqrt(d_k)"] == 0
    assert bf16["bf16 weight error, without"] > 3 * bf16["bf16 weight error, with 1/sqrt(d_k)"]
    for row in result.table("training"):
        assert row["diverged at step"] is None or row["diverged at step"] >= 1


def test_the_softmax_gradient_at_the_scores_matches_autograd_through_the_attention():
    # attention_at_init reports w ⊙ (u - Σ w u); autograd's ∂L/∂q must equal scale · (that) · K
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    g = torch.randn(1, 1, 8, 16, generator=generator, dtype=torch.float64)
    q.requires_grad_(True)
    out, weights = scaled_dot_product_attention(q, k, v)
    (out * g).sum().backward()
    u = g @ v.transpose(-2, -1)
    grad_scores = weights * (u - (weights * u).sum(-1, keepdim=True))
    torch.testing.assert_close(q.grad, grad_scores.detach() @ k / 4.0)  # scale 1/sqrt(16)
    measured = attention_at_init(16, scaled=True, n_keys=8, n_rows=8, generator=torch.Generator().manual_seed(0))
    assert 0 < measured["entropy"] < math.log(8) and 0 < measured["grad at scores"]


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
def test_a_model_without_the_scale_computes_softmax_of_qk_without_dividing(positional):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=20, d_model=32, n_heads=2, d_ff=64, n_decoder_layers=1,
                                  max_seq_len=12, positional=positional, init_std=0.2)).eval()
    ids = torch.randint(0, 20, (2, 12))
    with torch.no_grad():
        _, scaled = model(ids, return_attention=True)
        without_scale(model)
        _, unscaled = model(ids, return_attention=True)
        # the reference: the layer's own queries and keys through the formula with scale=1
        block = model.layers.layers[0]
        positions = torch.arange(12).unsqueeze(0)
        x = block.self_attn_norm(model.embed(ids, positions))
        q, k, v = block.self_attn.project(x)
        inner = model.embed.positional.inner
        rotate = inner.rotary(positions)
        if rotate is not None:
            q, k = rotate(q), rotate(k)
        _, expected = scaled_dot_product_attention(q, k, v, causal=True, scale=1.0,
                                                   bias=inner.attention_bias(12, 12, q.device))
    torch.testing.assert_close(unscaled[0], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unscaled[0], scaled[0], atol=1e-3)


# -- command line and tables ---------------------------------------------------------------------------------------
def test_study_command_rejects_bad_flags_in_one_line(capsys):
    assert main(["study", "scale", "--threads", "0"]) == 2
    assert main(["study", "positions", "--data", "x.zip"]) == 2
    assert main(["study", "order", "--bf16"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "--threads=0" in lines[0] and "order study only" in lines[1]
    assert "scale study only" in lines[2]


def test_markdown_table_writes_n_a_for_missing_values_and_escapes_bars():
    text = markdown_table([{"encoding": "learned", "L": 3.14159, "2L": None, "max |x|": 1e-7}])
    assert text.splitlines()[2] == "| learned  | 3.142 | n/a |   1.0e-07 |"
    assert text.splitlines()[0] == "| encoding |     L |  2L | max \\|x\\| |"


def test_order_study_names_a_parallel_file_too_small_to_evaluate_on(tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("Hi.\tSalut.\nGo.\tVa.\n")
    assert main(["study", "order", "--quick", "--data", str(pairs), "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no English sentence of 3-8 words" in err
