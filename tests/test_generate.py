"""Generation: the KV cache against the full forward, batching, sampling filters, seeds, beam search, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qkv import DecoderLM, ModelConfig, Transformer
from qkv.generate import (
    GenerationConfig,
    apply_repetition_penalty,
    beam_search,
    filter_top_k,
    filter_top_p,
    generate,
    generate_seq2seq,
    gnmt_length_penalty,
    left_pad,
    next_token_probs,
    right_pad,
    stream,
)
from qkv.generation.prompt import Stepper
from qkv.positions import POSITIONAL_KINDS

pytestmark = pytest.mark.usefixtures("one_thread")


def _peaked(model):
    """Redraw the matrices with std 0.3 (training's init is 0.02): peaked, well-separated logits keep greedy
    choices far from ties."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


def decoder(positional: str = "learned", seed: int = 0, **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=40, d_model=32, n_heads=4, d_ff=64, n_decoder_layers=2, max_seq_len=64,
                         positional=positional, **overrides)
    return _peaked(DecoderLM(config).eval())


def seq2seq(positional: str = "sinusoidal", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=30, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                         max_seq_len=48, positional=positional, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _peaked(Transformer(config).eval())


# -- the KV cache ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
def test_cached_logits_equal_the_full_forward_at_every_step_decoder(positional):
    model = decoder(positional)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], pad_id=0)  # row 1 is left-padded
    new = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        stepper = Stepper(model, ids, mask, new.shape[1], use_cache=True)
        logits = stepper.prefill()
        for step in range(new.shape[1]):
            for row, length in enumerate([6, 3]):  # each row alone, unpadded, through the plain forward
                prefix = torch.cat([ids[row, -length:], new[row, :step]]).unsqueeze(0)
                full = model(prefix)[0, -1]
                torch.testing.assert_close(logits[row], full, atol=1e-5, rtol=0)
            logits = stepper.step(new[:, step: step + 1])


@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
def test_model_cache_equals_full_forward_with_left_padding_and_positions(positional):
    """The core contract generation relies on: forward(new, decode_state=...) == forward(prefix)[:, -1]."""
    model = decoder(positional, seed=3)
    ids, mask = left_pad([[4, 5, 6, 7], [8, 9]], pad_id=0)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        state = model.new_decode_state(2, 16)
        out = model(ids, mask, decode_state=state)
        torch.testing.assert_close(out, model(ids, mask, positions=positions), atol=1e-5, rtol=0)
        for step in range(5):
            token = torch.tensor([[10 + step], [20 + step]])
            ids = torch.cat([ids, token], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
            cached = model(token, decode_state=state)[:, -1]
            torch.testing.assert_close(cached, model(ids, mask, positions=positions)[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
def test_cached_logits_equal_the_full_forward_at_every_step_encoder_decoder(positional):
    model = seq2seq(positional)
    src = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    src_mask = src != 0
    targets = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]])
    with torch.inference_mode():
        stepper = Stepper(model, src, src_mask, targets.shape[1], use_cache=True)
        logits = stepper.prefill(targets[:, :1])
        for step in range(1, targets.shape[1]):
            full = model(src, targets[:, :step], src_mask)[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
            logits = stepper.step(targets[:, step: step + 1])
    # the encoder's keys and values were projected once and then only read
    assert all(c.static and c.keys.shape[-2] == src.shape[1] for c in stepper.state.cross_caches)


def test_cache_and_no_cache_generate_the_same_tokens():
    model = decoder("rope")
    ids = torch.tensor([[3, 4, 5, 6]])
    a = generate(model, ids, 20, temperature=0)
    b = generate(model, ids, 20, temperature=0, use_cache=False)
    assert torch.equal(a, b)


# -- batching ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
def test_batched_greedy_equals_one_by_one(positional):
    model = decoder(positional, seed=1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    ids, mask = left_pad(prompts, pad_id=0)
    batched = generate(model, ids, 15, temperature=0, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), 15, temperature=0)
        assert batched[row, -15:].tolist() == alone[0, -15:].tolist(), f"row {row} differs"


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_right_padded_prompts_continue_each_row_from_its_last_real_token(positional):
    """right_pad's output (and a mask with a hole) given to every entry: each row's new tokens are the ones it
    gets alone, and the returned prompt part is the left-padded one (each row reads prompt + continuation)."""
    model = decoder(positional, seed=1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    ids, mask = right_pad(prompts, pad_id=0)
    alone = [generate(model, torch.tensor([p]), 12, temperature=0)[0, len(p):].tolist() for p in prompts]
    out = generate(model, ids, 12, temperature=0, attention_mask=mask)
    assert out[:, -12:].tolist() == alone
    assert torch.equal(out[:, :7], left_pad(prompts, pad_id=0)[0])
    assert torch.stack(list(stream(model, ids, 12, temperature=0, attention_mask=mask)), 1).tolist() == alone
    beams = [beam_search(model, torch.tensor([p]), 6, num_beams=3)[0, len(p):].tolist() for p in prompts]
    assert beam_search(model, ids, 6, num_beams=3, attention_mask=mask)[:, -6:].tolist() == beams
    holes = torch.tensor([[5, 0, 6, 7, 8, 9, 10, 0, 11]])  # padding in the middle: the real tokens, in order
    hole_mask = holes != 0
    assert generate(model, holes, 12, temperature=0, attention_mask=hole_mask)[0, -12:].tolist() == alone[0]


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_sliding_window_past_the_context_equals_a_forward_over_the_last_max_seq_len_tokens(positional):
    """sliding_window=True: 3 x max_seq_len new tokens; for absolute positions each greedy choice is the argmax of
    a plain forward over the row's last 64 tokens (computed here without any cache), batched and left-padded
    rows alike, with and without the cache. By default generate refuses, naming the way out."""
    model = decoder(positional, seed=2)
    prompts, n_new = [[5, 6, 7, 8, 9, 10, 11], [12, 13]], 3 * 64
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(n_new):
                ids.append(int(model(torch.tensor([ids[-64:]]))[0, -1].argmax()))
            expected.append(ids[len(prompt):])
    ids, mask = left_pad(prompts, pad_id=0)
    for use_cache in (True, False):
        out = generate(model, ids, n_new, temperature=0, attention_mask=mask, sliding_window=True,
                       use_cache=use_cache)
        assert out[:, -n_new:].tolist() == expected, f"use_cache={use_cache}"
    beams = beam_search(model, torch.tensor([prompts[0]]), 80, num_beams=2, sliding_window=True)
    assert beams.shape == (1, 7 + 80)
    with pytest.raises(ValueError, match="max_new_tokens=192.*sliding_window=True"):
        generate(model, ids, n_new, temperature=0, attention_mask=mask)


def test_batched_greedy_seq2seq_equals_one_by_one():
    model = seq2seq("learned")
    sources = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]
    batched = generate_seq2seq(model, sources, max_new_tokens=12, eos_token_id=None)
    for src, got in zip(sources, batched, strict=True):
        alone = generate_seq2seq(model, [src], max_new_tokens=12, eos_token_id=None)[0]
        assert got == alone


def test_rows_that_stop_are_padded_and_the_others_continue():
    model = decoder()
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    free = generate(model, ids, 10, temperature=0, stop_token_ids=())
    stop = int(free[0, 5])  # the third token row 0 produces
    out = generate(model, ids, 10, temperature=0, stop_token_ids=[stop], pad_token_id=39)
    first_stop = free[0, 3:].tolist().index(stop) + 3
    assert out[0, : first_stop + 1].tolist() == free[0, : first_stop + 1].tolist()
    assert set(out[0, first_stop + 1:].tolist()) <= {39}
    if stop not in free[1, 3:].tolist():
        assert out[1].tolist() == free[1, : out.shape[1]].tolist()


def test_min_new_tokens_forbids_stopping_early():
    model = decoder()
    ids = torch.tensor([[3, 4, 5]])
    first = int(generate(model, ids, 1, temperature=0)[0, -1])
    assert generate(model, ids, 10, temperature=0, stop_token_ids=[first]).shape[1] == 4  # stops at once
    out = generate(model, ids, 10, temperature=0, stop_token_ids=[first], min_new_tokens=4)
    assert out.shape[1] >= 3 + 4 and first not in out[0, 3:7].tolist()


# -- sampling filters, checked on the distribution ----------------------------------------------------------------


def test_top_k_distribution_has_exactly_the_k_most_likely_tokens():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    probs = next_token_probs(logits, temperature=0.7, top_k=5)
    top = logits.topk(5, dim=-1).indices
    for row in range(4):
        assert set(probs[row].nonzero().flatten().tolist()) == set(top[row].tolist())
        expected = torch.softmax(logits[row, top[row]] / 0.7, -1)
        torch.testing.assert_close(probs[row, top[row]], expected)


def test_top_k_breaks_ties_by_the_lower_index():
    """The documented rule, on the distribution: among logits tied at the k-th value the lowest indices stay
    (argmax's rule); everything strictly above the k-th value always stays."""
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0] * 5, [5.0, 1.0, 4.0, 1.0, 1.0]])
    probs = next_token_probs(logits, top_k=2)
    assert [row.nonzero().flatten().tolist() for row in probs] == [[1, 2], [0, 1], [0, 2]]
    three = filter_top_k(logits, 3)
    assert [torch.isfinite(row).nonzero().flatten().tolist() for row in three] == [[1, 2, 3], [0, 1, 2], [0, 1, 2]]
    flat = next_token_probs(torch.zeros(2, 100), temperature=0.5, top_k=3)  # a uniform row: the first three
    assert flat.nonzero()[:, 1].tolist() == [0, 1, 2] * 2 and torch.allclose(flat[:, :3], torch.tensor(1 / 3))


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=30), st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_nucleus(values, p):
    logits = torch.tensor([values])
    probs = logits.softmax(-1)[0]
    kept = filter_top_p(logits, p)[0] > float("-inf")
    assert kept.any()
    # every kept token is at least as likely as every dropped one
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max()
    # the kept mass reaches p, and would not without its least likely member (unless it is the only one)
    mass = float(probs[kept].sum())
    assert mass >= p - 1e-6 or kept.all()
    if kept.sum() > 1:
        assert mass - float(probs[kept].min()) < p + 1e-6


def test_sampled_tokens_stay_inside_top_k_and_the_nucleus():
    model = decoder()
    ids = torch.tensor([[3, 4, 5, 6]]).repeat(300, 1)
    with torch.no_grad():
        logits = model(ids[:1])[0, -1]
    probs = logits.softmax(-1)
    top_k = set(logits.topk(3).indices.tolist())
    order = probs.argsort(descending=True)
    nucleus_size = int((probs[order].cumsum(0) < 0.6).sum()) + 1
    nucleus = set(order[:nucleus_size].tolist())
    k_samples = next(stream(model, ids, 1, temperature=1.5, top_k=3, seed=0))
    p_samples = next(stream(model, ids, 1, temperature=1.0, top_p=0.6, seed=0))
    assert set(k_samples.tolist()) <= top_k and len(set(k_samples.tolist())) > 1
    assert set(p_samples.tolist()) <= nucleus


def test_repetition_penalty_formula_and_its_use():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    model = decoder()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        raw = model(ids)[0, -1]
    seen = torch.zeros(40, dtype=torch.bool)
    seen[[3, 4, 5, 6]] = True
    expected = int(apply_repetition_penalty(raw, seen, 50.0).argmax())
    assert int(generate(model, ids, 1, temperature=0, repetition_penalty=50.0)[0, -1]) == expected


def test_the_same_seed_gives_the_same_tokens():
    model = decoder()
    ids = torch.tensor([[3, 4, 5]])
    a = generate(model, ids, 30, temperature=1.0, top_p=0.95, seed=7)
    b = generate(model, ids, 30, temperature=1.0, top_p=0.95, seed=7)
    c = generate(model, ids, 30, temperature=1.0, top_p=0.95, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stream_yields_each_token_before_computing_the_next():
    model = decoder()
    ids = torch.tensor([[3, 4, 5]])
    calls = []
    hook = model.embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        it = stream(model, ids, 8, temperature=0)
        assert calls == []  # nothing runs before the first token is asked for
        first = next(it)
        assert len(calls) == 1  # the prompt only
        rest = list(it)
    finally:
        hook.remove()
    assert torch.cat([first] + rest).tolist() == generate(model, ids, 8, temperature=0)[0, 3:].tolist()


def test_the_first_signature_samples_what_a_plain_top_k_loop_samples():
    """generate(model, ids, n, temperature=, top_k=, seed=), max_new_tokens positional as in the first API, draws
    the tokens an independent loop draws: the full forward over the prefix (no cache), its k best logits kept,
    softmax(logits / T), one torch.multinomial draw per step from a generator seeded with ``seed``."""
    model = decoder()
    ids = torch.tensor([[3, 4]])
    out = generate(model, ids, 12, temperature=0.8, top_k=5, seed=1)
    generator, tokens = torch.Generator().manual_seed(1), ids
    with torch.no_grad():
        for _ in range(12):
            logits = model(tokens)[:, -1]
            best = logits.topk(5, dim=-1)
            probs = torch.zeros_like(logits).scatter(-1, best.indices, (best.values / 0.8).softmax(-1))
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    assert out.tolist() == tokens.tolist()
    assert len(set(tokens[0, 2:].tolist())) > 1  # a draw, not one token repeated: the sampling path ran


# -- beam search -------------------------------------------------------------------------------------------------


def test_beam_search_with_one_beam_is_greedy():
    model = decoder()
    ids, mask = left_pad([[3, 4, 5, 6], [7, 8]], pad_id=0)
    greedy = generate(model, ids, 12, temperature=0, attention_mask=mask)
    assert torch.equal(beam_search(model, ids, 12, num_beams=1, attention_mask=mask), greedy)
    s2s = seq2seq()
    src = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]])
    assert generate_seq2seq(s2s, src, src != 0, num_beams=1, max_new_tokens=10) == \
        generate_seq2seq(s2s, src, src != 0, max_new_tokens=10)


def bigram_model(log_probs: torch.Tensor) -> DecoderLM:
    """A DecoderLM that computes log P(next | last) = log_probs[last]: one-hot embeddings, blocks switched off
    (zero output projections: each residual sublayer adds 0), no final norm, the output matrix = the table."""
    v = log_probs.shape[0]
    config = ModelConfig(vocab_size=v, d_model=v, n_heads=1, d_ff=4, n_decoder_layers=1, max_seq_len=16,
                         positional="none", tie_embeddings=False, final_norm=False)
    model = DecoderLM(config).eval()
    with torch.no_grad():
        model.embed.token.weight.copy_(torch.eye(v))
        for block in model.layers.layers:
            block.self_attn.out.weight.zero_()
            block.self_attn.out.bias.zero_()
            block.ffn.w2.weight.zero_()
            block.ffn.w2.bias.zero_()
        model.lm_head.weight.copy_(log_probs.T)  # logits[next] = lm_head[next] · onehot(last)
    return model


def test_beam_search_beats_greedy_where_greedy_is_provably_suboptimal():
    # tokens: 0 start, 1 "a", 2 "b", 3..6 fillers. From start: a 0.6, b 0.4. After a: four fillers at 0.25 each.
    # After b: filler 3 at 0.9. Best 2-token sequence: (b, 3) with 0.36 > 0.6 · 0.25 = 0.15 for any (a, x).
    p = torch.full((7, 7), 1e-9)
    p[0, 1], p[0, 2] = 0.6, 0.4
    p[1, 3:7] = 0.25
    p[2, 3], p[2, 4] = 0.9, 0.1
    p[3:, 3] = 1.0
    p = p / p.sum(-1, keepdim=True)
    model = bigram_model(p.log())
    start = torch.tensor([[0]])
    greedy = generate(model, start, 2, temperature=0)[0, 1:].tolist()
    beam, score = beam_search(model, start, 2, num_beams=2, return_scores=True, stop_token_ids=())
    # exhaustive search over all 49 continuations confirms the optimum
    best = max(itertools.product(range(7), repeat=2), key=lambda s: p[0, s[0]] * p[s[0], s[1]])
    assert greedy[0] == 1 and beam[0, 1:].tolist() == list(best) == [2, 3]
    expected = math.log(0.4 * 0.9) / gnmt_length_penalty(2, 0.6)
    assert float(score[0]) == pytest.approx(expected, rel=1e-4)


def test_beam_search_length_penalty_prefers_what_gnmt_prefers():
    # From start: stop token 1 at 0.5 (a one-token hypothesis), else token 2 (0.5) then stop with certainty.
    p = torch.full((4, 4), 1e-9)
    p[0, 1], p[0, 2] = 0.5, 0.5
    p[2, 1] = 1.0
    p[1, 1] = p[3, 3] = 1.0
    p = p / p.sum(-1, keepdim=True)
    model = bigram_model(p.log())
    start = torch.tensor([[0]])
    # both end with log P = log 0.5; the longer one is divided by the larger lp, so it scores higher (log P < 0)
    out = beam_search(model, start, 5, num_beams=2, stop_token_ids=[1], length_penalty=0.6, early_stopping=False)
    assert out[0, 1:3].tolist() == [2, 1]
    out = beam_search(model, start, 5, num_beams=2, stop_token_ids=[1], length_penalty=0.0, early_stopping=False)
    assert out[0, 1] == 1  # alpha = 0: a tie in log P, the first found (the shorter) wins
    assert gnmt_length_penalty(1, 0.6) == pytest.approx((6 / 6) ** 0.6)
    assert gnmt_length_penalty(10, 0.6) == pytest.approx((15 / 6) ** 0.6)


def test_beam_search_seq2seq_scores_match_a_rescoring_by_the_full_model():
    model = seq2seq()
    src = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    out, scores = beam_search(model, src, 8, num_beams=4, attention_mask=src != 0, return_scores=True)
    with torch.no_grad():
        for row in range(2):
            tokens = out[row].tolist()
            end = tokens.index(2) + 1 if 2 in tokens[1:] else len(tokens)
            tgt = torch.tensor([tokens[:end]])
            logp = model(src[row: row + 1], tgt[:, :-1], (src != 0)[row: row + 1]).log_softmax(-1)
            total = float(logp[0].gather(-1, tgt[0, 1:, None]).sum())
            assert float(scores[row]) == pytest.approx(total / gnmt_length_penalty(end - 1, 0.6), abs=1e-4)


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, words", [
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_k", 0, ">= 1"), ("temperature", -0.5, ">= 0"),
    ("max_new_tokens", -1, ">= 0"), ("num_beams", 0, ">= 1"), ("repetition_penalty", 0.0, "> 0"),
])
def test_bad_options_name_the_value_and_the_range(option, value, words):
    model = decoder()
    with pytest.raises(ValueError) as err:
        generate(model, torch.tensor([[3]]), 5, **{option: value}) if option != "max_new_tokens" else \
            generate(model, torch.tensor([[3]]), value)
    assert f"{option}={value}" in str(err.value) and words in str(err.value)


def test_bad_prompts_raise_clear_errors():
    model = decoder()  # no BOS token
    with pytest.raises(ValueError, match="empty prompt.*bos_token_id"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model, torch.ones(1, 65, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_new_tokens=20.*max_seq_len=64"):
        generate(model, torch.ones(1, 50, dtype=torch.long), 20)
    with pytest.raises(TypeError, match="did you mean 'top_k'"):
        generate(model, torch.tensor([[3]]), 5, topk=3)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, torch.tensor([[3]]), 5, stop_strings=["x"])
    with_bos = decoder(bos_token_id=1)
    assert generate(with_bos, torch.zeros(1, 0, dtype=torch.long), 3, temperature=0)[0, 0] == 1
    assert GenerationConfig(stop_token_ids=[3]).stop_token_ids == (3,)


@pytest.mark.parametrize("temperature", [-1.0, float("nan"), float("inf")])
def test_a_temperature_that_is_negative_or_not_finite_is_refused(temperature):
    """softmax(logits / inf) is the uniform distribution: noise, never what a user asking for 'inf' means."""
    with pytest.raises(ValueError, match="must be >= 0 and finite"):
        GenerationConfig(temperature=temperature)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_one_clear_error_in_every_mode(bad):
    """A weight that is NaN or infinite makes the logits so: sampling, greedy and beam search each refuse with one
    message naming the cause, never a multinomial traceback or a silent arbitrary token."""
    model = decoder("rope", tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[7, 3] = bad
    ids = torch.tensor([[3, 4, 5]])
    for options in ({"temperature": 1.0, "seed": 0}, {"temperature": 0.8, "top_k": 5, "top_p": 0.9},
                    {"temperature": 0}, {"num_beams": 2}):
        with pytest.raises(ValueError, match="logits hold NaN or infinity.*not finite"):
            generate(model, ids, 5, **options)


def test_an_empty_prompt_starts_from_bos_alone_and_in_a_batch():
    model = decoder("learned", bos_token_id=1)
    alone = generate(model, torch.zeros(1, 0, dtype=torch.long), 6, temperature=0)
    assert alone[0].tolist() == generate(model, torch.tensor([[1]]), 6, temperature=0)[0].tolist()
    ids, mask = left_pad([[], [5, 6, 7]], pad_id=0)
    batched = generate(model, ids, 6, temperature=0, attention_mask=mask)
    assert batched[0, -6:].tolist() == alone[0, 1:].tolist()
    assert batched[1].tolist() == generate(model, torch.tensor([[5, 6, 7]]), 6, temperature=0)[0].tolist()


def test_batched_beam_search_seq2seq_equals_one_by_one():
    model = seq2seq("sinusoidal", seed=2)
    sources = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]
    batched = generate_seq2seq(model, sources, num_beams=3, max_new_tokens=8)
    assert batched == [generate_seq2seq(model, [s], num_beams=3, max_new_tokens=8)[0] for s in sources]
