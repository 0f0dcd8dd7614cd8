"""qkv study scaling: FLOPs by hand, the fits against a known law, the plan's refusals, and the quick study run
once, stopped between units and continued."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from qkv import DecoderLM, ModelConfig
from qkv.cli import main
from qkv.study import laws
from qkv.study.scaling import (
    FULL,
    LADDER,
    PRESETS_PLACED,
    QUICK,
    PlanRefused,
    flops_per_token,
    parameter_counts,
    plan_study,
    scaling_study,
    shape_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN_TOKENS = 18_601_446  # the training split of scaling_corpus()


def test_flops_per_token_equal_a_hand_count_and_n_leaves_out_the_embeddings():
    config = ModelConfig(vocab_size=146, d_model=64, n_heads=2, d_ff=256, n_decoder_layers=2, max_seq_len=128,
                         positional="rope")
    # per layer: W_Q,K,V 3·64·64 + W_O 64·64 + W_1 64·256 + W_2 256·64 = 49,152; output layer 64·146 = 9,344
    matmul = 2 * (3 * 64 * 64 + 64 * 64 + 64 * 256 + 256 * 64) + 64 * 146
    assert flops_per_token(config) == 6 * matmul + 12 * 2 * 64 * 128 == 842_496
    non_embedding, total = parameter_counts(config)
    model = DecoderLM(config)
    assert total == sum(p.numel() for p in model.parameters())
    assert non_embedding == total - 146 * 64  # the tied token embedding / output layer is the only embedding


def test_the_demo_model_placed_on_the_law_is_the_demo_model():
    from qkv.demo import DEMO_MODEL

    assert PRESETS_PLACED["the demo's model"] == DEMO_MODEL


def _synthetic(true: laws.Law, seed: int, noise: float = 0.005):
    """An isoFLOP grid (6 sizes x 4 budgets, C = 6ND) of losses from ``true`` with multiplicative noise."""
    rng = np.random.default_rng(seed)
    n = np.repeat(np.geomspace(4e3, 4e5, 6), 4)  # the true N_opt: 24k to 70k
    c = np.tile(np.geomspace(1e12, 1e13, 4), 6)
    d = c / (6 * n)
    return n, d, c, true.loss(n, d) * np.exp(rng.normal(0.0, noise, n.shape))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_law_fit_recovers_known_exponents_from_noisy_runs(seed):
    # tolerance, with 0.5% noise on 24 runs over a 100x span of sizes around the true optimum: α within 0.04 (the
    # A-α trade-off is the loose direction), β within 0.02; the isoFLOP valleys' N_opt exponent within 0.02 of
    # the law's β/(α+β) = 0.467
    true = laws.Law(E=1.0, A=60.0, B=300.0, alpha=0.40, beta=0.35)
    n, d, c, loss = _synthetic(true, seed)
    fitted = laws.fit_law(n, d, loss, starts=QUICK.law_starts)
    assert abs(fitted.alpha - true.alpha) < 0.04 and abs(fitted.beta - true.beta) < 0.02, fitted
    assert abs(fitted.E - true.E) < 0.2
    valleys = [laws.isoflop_valley(budget, n[c == budget], d[c == budget], loss[c == budget])
               for budget in np.unique(c)]
    assert all(v.inside and v.curvature > 0 for v in valleys)
    slope = laws.power_law([v.flops for v in valleys], [v.n_opt for v in valleys]).exponent
    assert abs(slope - true.beta / (true.alpha + true.beta)) < 0.02


def test_bootstrap_intervals_are_narrow_and_near_the_true_exponents():
    true = laws.Law(E=1.0, A=60.0, B=300.0, alpha=0.40, beta=0.35)
    n, d, _, loss = _synthetic(true, 0)
    fitted = laws.fit_law(n, d, loss, starts=QUICK.law_starts)
    intervals = laws.bootstrap_law(n, d, loss, fitted, samples=20)
    for name in ("alpha", "beta"):
        low, high = intervals[name]
        assert low < high < low + 0.1
        assert low - 0.01 <= getattr(true, name) <= high + 0.01, (name, low, high)


def test_the_valleys_exponents_get_intervals_that_hold_the_true_ones_and_widen_with_noise():
    """Each budget's runs drawn again: the N_opt and D_opt exponents' intervals hold the law's β/(α+β) and
    α/(α+β) (within 0.02), and ten times the noise gives intervals at least 1.5x as wide (even without noise a draw that
    leaves sizes out moves the parabola: the valleys are not parabolas over a 100x span)."""
    true = laws.Law(E=1.0, A=60.0, B=300.0, alpha=0.40, beta=0.35)
    widths = []
    for noise in (0.002, 0.02):
        n, d, c, loss = _synthetic(true, 0, noise)
        budgets = [(budget, n[c == budget], d[c == budget], loss[c == budget]) for budget in np.unique(c)]
        _, n_law, d_law = laws.valley_exponents(budgets)
        spread = laws.bootstrap_valley_exponents(budgets, samples=40, seed=0)
        (a_low, a_high), (b_low, b_high) = spread["a"], spread["b"]
        assert a_low <= n_law.exponent <= a_high and b_low <= d_law.exponent <= b_high
        widths.append(a_high - a_low)
        if noise == 0.002:
            assert a_low - 0.02 <= true.beta / (true.alpha + true.beta) <= a_high + 0.02, spread
            assert b_low - 0.02 <= true.alpha / (true.alpha + true.beta) <= b_high + 0.02, spread
    assert widths[1] > 1.5 * widths[0], widths


def _throughput(rate: float):
    """tokens/s of each rung at ``rate`` FLOP/s for the largest models, 2.5x slower per FLOP for the smallest."""
    def tokens_per_second(rung: int) -> float:
        per_token = flops_per_token(shape_config(*LADDER[rung], 145, FULL.context))
        return rate * min(1.0, (per_token / 2.6e7) ** 0.15) / per_token
    return tokens_per_second


def test_the_default_plan_fits_its_hours_with_a_valley_around_every_budgets_predicted_best_size():
    plan = plan_study(FULL, _throughput(3e10), TRAIN_TOKENS, 145)
    assert plan["estimated hours"] == pytest.approx(2.5, rel=0.02)
    sizes = [w["N (non-embedding)"] for w in plan["widths"]]
    assert len(sizes) == 6 and sizes == sorted(sizes)
    for best in plan["predicted best size per budget (the prior)"]:
        assert sum(n < best for n in sizes) >= 2 and sum(n > best for n in sizes) >= 2
    budgets = plan["budgets"]
    assert all(b / a == pytest.approx(2.15) for a, b in zip(budgets, budgets[1:], strict=False))
    assert max(p["epochs"] for p in plan["points"]) <= 4.0


def test_a_plan_that_repeats_the_data_too_often_is_refused_naming_the_hours_that_fit():
    with pytest.raises(PlanRefused, match=r"read the training text .* times .*give --budget-hours at most"):
        plan_study(dataclasses.replace(FULL, budget_hours=40), _throughput(3e10), TRAIN_TOKENS, 145)


def test_a_plan_whose_valleys_fall_off_the_ladder_is_refused():
    few = dataclasses.replace(FULL, ladder=LADDER[4:10])  # 6 rungs only: the window cannot move
    with pytest.raises(PlanRefused, match="2 on each side of every budget's predicted best size.*raise --budget"):
        plan_study(dataclasses.replace(few, budget_hours=0.05), _throughput(3e10), TRAIN_TOKENS, 145)
    with pytest.raises(PlanRefused, match="2 on each side.*lower --budget-hours"):
        plan_study(dataclasses.replace(few, budget_hours=20, max_epochs=1e9), _throughput(3e10), TRAIN_TOKENS, 145)


# -- the quick study, whole and in pieces -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    torch.set_num_threads(1)
    return scaling_study(quick=True, out_dir=tmp_path_factory.mktemp("scaling"), progress=False)


def test_quick_study_loss_falls_with_budget_and_writes_its_plan_first(quick):
    runs = quick.table("runs")
    budgets = sorted({r["budget"] for r in runs})
    assert len(budgets) == 4 and len(runs) == 4 * 5
    means = [np.mean([r["val loss"] for r in runs if r["budget"] == k]) for k in budgets]
    assert all(a > b for a, b in zip(means, means[1:], strict=False)), means
    assert all(0 < r["val loss"] < math.log(145) for r in runs)  # every run beats a uniform guess
    plan = json.loads((quick.out_dir / "plan.json").read_text())
    assert plan["quick"] and len(plan["widths"]) == 5
    assert {f.name for f in quick.figures} == {"loss-vs-compute.png", "isoflop.png", "law-contours.png"}
    assert {"isoFLOP valleys", "fitted laws", "the articles' table, on this corpus's law"} <= set(quick.tables)


def test_a_study_stopped_between_units_continues_to_the_same_results(quick, tmp_path):
    torch.set_num_threads(1)
    partial = scaling_study(quick=True, out_dir=tmp_path, progress=False, max_units=7)
    assert "7 of 30 units of work done" in partial.notes[0] and not partial.figures
    # stopped after the sweep and two budgets whole: those two valleys are fitted, as a preview
    preview = scaling_study(quick=True, out_dir=tmp_path, progress=False, max_units=13)
    assert "20 of 30 units of work done" in preview.notes[0] and "The fits use the 2 budgets" in preview.notes[0]
    assert [row["budget"] for row in preview.table("isoFLOP valleys")] == [0, 1] and len(preview.figures) == 3
    assert preview.table("isoFLOP valleys") == quick.table("isoFLOP valleys")[:2]  # the same valleys as the whole
    finished = scaling_study(quick=True, out_dir=tmp_path, progress=False)
    assert finished.table("runs") == quick.table("runs")
    assert finished.table("widths and the learning-rate sweep")[0]["lr chosen"] == \
        quick.table("widths and the learning-rate sweep")[0]["lr chosen"]


def test_budget_hours_is_refused_in_one_line_where_it_does_not_apply(quick, capsys):
    out = quick.out_dir.parent
    assert main(["study", "scaling", "--quick", "--budget-hours", "2", "--out", str(out), "--no-progress"]) == 2
    assert main(["study", "positions", "--budget-hours", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "fixed budgets" in lines[0] and "scaling study only" in lines[1]


def test_study_help_tells_the_attention_scale_from_scaling_laws(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "scale: the attention scale, the forgotten 1/sqrt(d_k)" in text
    assert "scaling: scaling laws: loss against model size, data and compute" in text
