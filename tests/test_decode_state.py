"""DecodeState: decoding step by step equals the forward pass without cache — at every step, for every positional
encoding, for left-padded batches row by row, and past the context (a sliding window) against what it must equal."""

from __future__ import annotations

import pytest
import torch

from qkv import ModelConfig
from qkv.attention import causal_mask
from qkv.blocks import AttentionInputs
from qkv.decode_state import ROLLING_POSITIONALS
from qkv.models import DecoderLM, Transformer
from qkv.positions import POSITIONAL_KINDS

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CONTEXT = 32, 8
ATOL = 2e-5
ABSOLUTE = [k for k in POSITIONAL_KINDS if k not in ROLLING_POSITIONALS]


def decoder(positional: str, n_layers: int = 2, context: int = CONTEXT, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    config = ModelConfig.preset("tiny-decoder", vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64,
                                n_decoder_layers=n_layers, max_seq_len=context, positional=positional)
    return DecoderLM(config).eval()


def seq2seq(positional: str) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny-seq2seq", vocab_size=VOCAB, d_model=32, d_ff=64, max_seq_len=CONTEXT,
                                positional=positional)
    return Transformer(config).eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def greedy_with_state(model: DecoderLM, prompt: torch.Tensor, n_new: int, mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding through a DecodeState → (prompt + new ids, each step's next-token logits (batch, vocab))."""
    state = model.new_decode_state(prompt.shape[0], prompt.shape[1] + n_new)
    ids, steps = prompt, []
    logits = model(prompt, mask, decode_state=state)[:, -1]
    for _ in range(n_new):
        steps.append(logits)
        token = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
        logits = model(token, decode_state=state)[:, -1]
    return ids, steps


# --------------------------------------------------------------------------------------------------------------
# Within the context: the state is a cache, and a cache changes nothing.
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
def test_decoding_with_the_state_equals_the_forward_pass_at_every_step(positional: str) -> None:
    model = decoder(positional)
    ids = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        state = model.new_decode_state(2, CONTEXT)
        steps = [model(ids[:, :5], decode_state=state)]  # the prompt at once, then one token per step
        steps += [model(ids[:, i : i + 1], decode_state=state) for i in range(5, CONTEXT)]
    assert state.length == CONTEXT and state.caches[0].keys.shape[2] == CONTEXT  # allocated once, filled
    assert max_err(torch.cat(steps, 1), full) <= ATOL


@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
def test_a_left_padded_batch_decodes_each_row_as_it_would_alone(positional: str) -> None:
    model = decoder(positional)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (6, 2, 4)]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)  # Hugging Face's 1/0 form
    for row, p in enumerate(prompts):
        ids[row, 6 - len(p):], mask[row, 6 - len(p):] = p, 1
    n_new = 3 * CONTEXT  # well past the context: the window slides too, row by row
    with torch.no_grad():
        batched, batched_steps = greedy_with_state(model, ids, n_new, mask)
        for row, p in enumerate(prompts):
            alone, alone_steps = greedy_with_state(model, p[None], n_new)
            assert torch.equal(batched[row, 6:], alone[0, len(p):]), row
            for step, (b, a) in enumerate(zip(batched_steps, alone_steps, strict=True)):
                assert max_err(b[row], a[0]) <= ATOL, (row, step)


def test_the_state_of_an_encoder_decoder_equals_its_forward_pass() -> None:
    for positional in POSITIONAL_KINDS:
        model = seq2seq(positional)
        gen = torch.Generator().manual_seed(3)
        src, tgt = torch.randint(3, VOCAB, (2, 7), generator=gen), torch.randint(3, VOCAB, (2, CONTEXT), generator=gen)
        src_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
        with torch.no_grad():
            full = model(src, tgt, src_attention_mask=src_mask)
            state = model.new_decode_state(2)
            steps = [model.decode(tgt[:, :1], model.encode(src, src_mask), src_mask, decode_state=state)]
            steps += [model.decode(tgt[:, i : i + 1], None, decode_state=state) for i in range(1, CONTEXT)]
        assert max_err(torch.cat(steps, 1), full) <= ATOL, positional


def test_reorder_moves_every_row_of_the_state() -> None:
    for positional in ("learned", "rope"):
        model = decoder(positional)
        gen = torch.Generator().manual_seed(4)
        ids = torch.randint(0, VOCAB, (3, 5), generator=gen)
        mask = torch.tensor([[True] * 5, [False, True, True, True, True], [False, False, True, True, True]])
        nxt = torch.randint(0, VOCAB, (3, 1), generator=gen)
        index = torch.tensor([2, 0, 0])  # as beam search does: a row copied, a row dropped
        with torch.no_grad():
            state = model.new_decode_state(3, 2 * CONTEXT)
            model(ids, mask, decode_state=state)
            state.reorder(index)
            moved = model(nxt, decode_state=state)
            fresh = model.new_decode_state(3, 2 * CONTEXT)
            model(ids[index], mask[index], decode_state=fresh)
            expected = model(nxt, decode_state=fresh)
        assert max_err(moved, expected) <= ATOL, positional


# --------------------------------------------------------------------------------------------------------------
# Past the context: a sliding window of the last max_seq_len tokens.
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positional", ABSOLUTE)
def test_absolute_positions_past_the_context_equal_a_forward_pass_over_the_window(positional: str) -> None:
    # Absolute encodings re-encode the window: each step is the plain forward of the last max_seq_len tokens.
    model = decoder(positional)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ids, steps = greedy_with_state(model, prompt, 3 * CONTEXT)
        for step, logits in enumerate(steps):
            end = prompt.shape[1] + step  # the tokens fed so far
            window = ids[:, max(0, end - CONTEXT) : end]
            assert max_err(logits, model(window)[:, -1]) <= ATOL, step


def _sliding_window_forward(model: DecoderLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a forward pass over the whole of ``ids`` (longer than the context) in which each token attends to
    itself and the max_seq_len - 1 tokens before it: sliding-window attention, with positions 0..n-1 (RoPE's
    rotations computed past its table; ALiBi's distances; nothing for "none"). The independent reference for a
    cache that rolls: nothing is cached, nothing dropped."""
    n, window = ids.shape[1], model.config.max_seq_len
    positions = torch.arange(n).unsqueeze(0)
    band = causal_mask(n) & (torch.arange(n)[None, :] > torch.arange(n)[:, None] - window)  # i - window < j <= i
    pe = model.embed.positional
    x = model.embed(ids, torch.zeros_like(positions))  # these encodings add nothing to the embeddings
    inputs = AttentionInputs(mask=band, rotate=pe.rotary(positions, n), bias=pe.attention_bias(n, n, ids.device))
    x, _, _ = model.layers(x, inputs)
    return model.logits(x)


@pytest.mark.parametrize("positional", ROLLING_POSITIONALS)
def test_a_rolling_cache_equals_sliding_window_attention_over_the_whole_sequence(positional: str) -> None:
    model = decoder(positional, n_layers=3)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ids, steps = greedy_with_state(model, prompt, 3 * CONTEXT)
        reference = _sliding_window_forward(model, ids)
    for step, logits in enumerate(steps):
        assert max_err(logits, reference[:, prompt.shape[1] + step - 1]) <= ATOL, step


@pytest.mark.parametrize("positional", ROLLING_POSITIONALS)
def test_with_one_layer_a_rolling_cache_equals_a_forward_pass_over_the_window(positional: str) -> None:
    # One layer: keys depend on their own token only, so rolling is exactly recomputing the window; deeper
    # layers' keys remember older tokens (the test above), and the window forward differs there.
    one, three = decoder(positional, n_layers=1), decoder(positional, n_layers=3)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for model in (one, three):
            ids, steps = greedy_with_state(model, prompt, 3 * CONTEXT)
            errors = [max_err(logits, model(ids[:, max(0, end - CONTEXT) : end])[:, -1])
                      for end, logits in enumerate(steps, start=prompt.shape[1])]
            if model is one:
                assert max(errors) <= ATOL
            else:
                assert max(errors[: CONTEXT - prompt.shape[1] + 1]) <= ATOL  # within the context: equal
                assert max(errors) > 1e-3  # past it: the window forward is not what a rolled cache computes


def test_an_encoder_decoder_slides_its_target_window() -> None:
    model = seq2seq("sinusoidal")
    gen = torch.Generator().manual_seed(8)
    src, tgt = torch.randint(3, VOCAB, (2, 7), generator=gen), torch.randint(3, VOCAB, (2, 3 * CONTEXT), generator=gen)
    with torch.no_grad():
        memory = model.encode(src)
        state = model.new_decode_state(2, 3 * CONTEXT)
        for end in range(1, 3 * CONTEXT + 1):
            logits = model.decode(tgt[:, end - 1 : end], memory if end == 1 else None, decode_state=state)[:, -1]
            window = tgt[:, max(0, end - CONTEXT) : end]
            assert max_err(logits, model.decode(window, memory)[:, -1]) <= ATOL, end


# --------------------------------------------------------------------------------------------------------------
# Refusals: the strict mode, and the one "does it fit" check.
# --------------------------------------------------------------------------------------------------------------


def test_strict_mode_refuses_to_go_past_the_context() -> None:
    model = decoder("learned")
    with pytest.raises(ValueError, match=r"max_len of 9 tokens is longer than max_seq_len=8"):
        model.new_decode_state(1, CONTEXT + 1, sliding_window=False)
    state = model.new_decode_state(1, CONTEXT, sliding_window=False)
    with torch.no_grad():
        model(torch.zeros(1, CONTEXT, dtype=torch.long), decode_state=state)
        with pytest.raises(ValueError, match=r"9 positions do not fit the model's context max_seq_len=8.*"
                                             r"sliding_window=True"):
            model(torch.zeros(1, 1, dtype=torch.long), decode_state=state)
    small = model.new_decode_state(1, 4)  # allocated for 4: it may not slide before the context is full
    with torch.no_grad(), pytest.raises(ValueError, match="holds max_len=4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), decode_state=small)


def test_check_fits_names_the_numbers_and_the_fixes() -> None:
    model = decoder("learned")
    model.check_fits(5, CONTEXT - 4)  # the last new token is never fed back: 5 + 4 - 1 = 8 positions
    with pytest.raises(ValueError, match=r"a prompt of 5 tokens \+ max_new_tokens=5 need 9 positions but the "
                                         r"model's context is max_seq_len=8; lower max_new_tokens to at most 4"):
        model.check_fits(5, CONTEXT - 3, what="a prompt")
    model.check_fits(5, 100, sliding_window=True)
    with pytest.raises(ValueError, match=r"prompt of 9 tokens is longer than max_seq_len=8 .*keep its last 8"):
        model.check_fits(9, 1, sliding_window=True, what="prompt")


def test_the_first_step_checks_its_inputs() -> None:
    model = decoder("learned")
    state = model.new_decode_state(2)
    with torch.no_grad():
        with pytest.raises(ValueError, match="created for batch=2"):
            model(torch.zeros(3, 4, dtype=torch.long), decode_state=state)
        with pytest.raises(ValueError, match="outside"):
            model(torch.full((2, 4), VOCAB), decode_state=state)
        with pytest.raises(TypeError, match="float masks are not accepted"):
            model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), decode_state=state)
        with pytest.raises(ValueError, match="decode_state keeps its own positions"):
            model(torch.zeros(2, 4, dtype=torch.long), positions=torch.arange(4)[None], decode_state=state)


def test_logits_to_keep_computes_the_output_layer_for_the_last_positions_only() -> None:
    model = decoder("rope")
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(ids)
        assert max_err(model(ids, logits_to_keep=1), full[:, -1:]) <= ATOL  # a (1, d) matmul rounds differently
        state = model.new_decode_state(2)
        assert max_err(model(ids, decode_state=state, logits_to_keep=2), full[:, -2:]) <= ATOL


def test_reorder_leaves_the_callers_source_mask_alone() -> None:
    model = seq2seq("sinusoidal")
    src = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(10))
    src_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    given = src_mask.clone()
    with torch.no_grad():
        state = model.new_decode_state(2)
        model.decode(torch.ones(2, 1, dtype=torch.long), model.encode(src, src_mask), src_mask, decode_state=state)
        state.reorder(torch.tensor([1, 1]))
    assert torch.equal(src_mask, given)


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_a_sliding_state_may_be_fed_more_than_its_max_len(positional: str) -> None:
    # max_len sizes the allocation; a sliding state created for max_seq_len goes on past it all the same.
    model = decoder(positional)
    prompt = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        _, expected = greedy_with_state(model, prompt, 3 * CONTEXT)  # created for 3 + 24 tokens
        state = model.new_decode_state(1, CONTEXT)
        logits, steps = model(prompt, decode_state=state)[:, -1], []
        for _ in range(3 * CONTEXT):
            steps.append(logits)
            logits = model(logits.argmax(-1, keepdim=True), decode_state=state)[:, -1]
    assert max(max_err(a, b) for a, b in zip(steps, expected, strict=True)) <= ATOL


def test_reorder_within_groups_of_one_source_may_leave_the_cross_attention_inputs_as_they_are() -> None:
    model = seq2seq("rope")
    gen = torch.Generator().manual_seed(12)
    src = torch.randint(3, VOCAB, (2, 6), generator=gen).repeat_interleave(2, 0)  # 2 sources x 2 beams
    src_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2]).repeat_interleave(2, 0)
    tgt = torch.randint(3, VOCAB, (4, 3), generator=gen)
    index = torch.tensor([1, 1, 2, 3])  # rows move only within their source's group
    outputs = []
    with torch.no_grad():
        for same_source in (False, True):
            state = model.new_decode_state(4)
            model.decode(tgt[:, :2], model.encode(src, src_mask), src_mask, decode_state=state)
            state.reorder(index, same_source=same_source)
            outputs.append(model.decode(tgt[:, 2:], None, decode_state=state))
    assert max_err(*outputs) <= ATOL


@pytest.mark.parametrize("positional", ["rope", "learned"])
def test_a_rewound_state_continues_as_a_fresh_one_fed_the_kept_prefix(positional: str) -> None:
    """A conversation resent whole reuses the prefix it shares with the last request and feeds only the rest."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.preset("tiny-decoder", vocab_size=30, max_seq_len=32,
                                         positional=positional)).eval()
    first, second = torch.tensor([[3, 4, 5, 6, 7, 8]]), torch.tensor([[3, 4, 5, 9, 10]])
    with torch.inference_mode():
        state = model.new_decode_state(1, 20)
        model(first, decode_state=state)
        state.rewind(3)  # the common prefix: 3, 4, 5
        reused = model(second[:, 3:], decode_state=state)
        fresh = model(second, decode_state=model.new_decode_state(1, 20))[:, 3:]
        torch.testing.assert_close(reused, fresh, atol=1e-5, rtol=0)
        assert state.length == 5
        with pytest.raises(ValueError, match="rewind needs 0 <= n <= 5"):
            state.rewind(6)
