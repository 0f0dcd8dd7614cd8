"""The three models: causality, padding invariance, the KV cache, returned attention, bad input."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv import DecoderLM, Encoder, ModelConfig, Transformer
from qkv.positions import POSITIONAL_KINDS

ATOL = 1e-5
VOCAB = 23


def small_config(positional: str, n_heads: int = 2, **overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, d_model=32, n_heads=n_heads, d_ff=64, n_encoder_layers=2,
                  n_decoder_layers=2, max_seq_len=32, positional=positional, dropout=0.0)
    return ModelConfig(**{**values, **overrides})


@functools.cache
def decoder_lm(positional: str, n_heads: int = 2, norm_position: str = "pre") -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(small_config(positional, n_heads, norm_position=norm_position)).eval()


@functools.cache
def encoder(positional: str) -> Encoder:
    torch.manual_seed(1)
    return Encoder(small_config(positional, norm_position="post")).eval()


@functools.cache
def seq2seq(positional: str) -> Transformer:
    torch.manual_seed(2)
    return Transformer(small_config(positional, norm_position="post", scale_embeddings=True)).eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------------------------
# Causality: the future never leaks into the past.
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
@settings(max_examples=15)
@given(data=st.data(), batch=st.integers(1, 3), length=st.integers(2, 12), n_heads=st.sampled_from([1, 2, 4]))
def test_future_tokens_do_not_change_past_outputs(positional: str, data, batch: int, length: int,
                                                  n_heads: int) -> None:
    model = decoder_lm(positional, n_heads)
    t = data.draw(st.integers(0, length - 2), label="t")
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length),
                                          min_size=batch, max_size=batch), label="ids"))
    changed = ids.clone()
    changed[:, t + 1 :] = (ids[:, t + 1 :] + 1 + data.draw(st.integers(0, VOCAB - 2), label="shift")) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
        explicit, _ = model(changed, return_attention=True)  # the explicit attention path, too
    assert max_err(before[:, : t + 1], after[:, : t + 1]) <= ATOL
    assert max_err(explicit[:, : t + 1], before[:, : t + 1]) <= ATOL
    assert max_err(explicit, after) <= ATOL
    # And the future does matter to the future (the test is not vacuous).
    assert max_err(before[:, t + 1 :], after[:, t + 1 :]) > ATOL


# --------------------------------------------------------------------------------------------------------------
# Padding invariance: masked padding changes nothing else.
# --------------------------------------------------------------------------------------------------------------


def _padded(ids: torch.Tensor, n_pad: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids with n_pad padding tokens appended, and the mask that is True at the real tokens."""
    b, n = ids.shape
    padded = torch.cat([ids, torch.full((b, n_pad), pad_id)], dim=1)
    mask = torch.zeros(b, n + n_pad, dtype=torch.bool)
    mask[:, :n] = True
    return padded, mask


@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
def test_padding_appended_to_encoder_input_changes_no_real_output(positional: str) -> None:
    model = encoder(positional)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 7), generator=gen)
    with torch.no_grad():
        reference = model(ids)
        for n_pad in (1, 5):
            padded, mask = _padded(ids, n_pad)
            for need_weights in (False, True):
                out = model(padded, attention_mask=mask, return_attention=need_weights)
                out = out[0] if need_weights else out
                assert max_err(out[:, :7], reference) <= ATOL, (n_pad, need_weights)
        # A ragged batch: each row equals the same row encoded alone, without padding.
        mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
        batched = model(ids, attention_mask=mask)
        alone = model(ids[1:, :4])
        assert max_err(batched[1:, :4], alone) <= ATOL
        assert max_err(batched[:1], reference[:1]) <= ATOL


@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
def test_padding_appended_to_transformer_source_changes_no_logit(positional: str) -> None:
    model = seq2seq(positional)
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(3, VOCAB, (2, 6), generator=gen)
    tgt = torch.randint(3, VOCAB, (2, 5), generator=gen)
    with torch.no_grad():
        reference = model(src, tgt)
        padded, mask = _padded(src, 4)
        assert max_err(model(padded, tgt, src_attention_mask=mask), reference) <= ATOL
        with_weights, attn = model(padded, tgt, src_attention_mask=mask, return_attention=True)
    assert max_err(with_weights, reference) <= ATOL
    for layer in attn["cross"]:  # the decoder never looks at source padding
        assert torch.equal(layer[..., 6:], torch.zeros_like(layer[..., 6:]))


# --------------------------------------------------------------------------------------------------------------
# The key/value cache gives exactly the full forward.
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
def test_cached_decoding_equals_full_forward(positional: str, norm_position: str) -> None:
    model = decoder_lm(positional, 2, norm_position)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 10), generator=gen)
    with torch.no_grad():
        full = model(ids)
        for max_len in (None, 10, 16):  # the whole context, exactly the tokens fed, more
            state = model.new_decode_state(2, max_len)
            steps = [model(ids[:, :4], decode_state=state)]  # prefill with a prompt, then one token at a time
            steps += [model(ids[:, i : i + 1], decode_state=state) for i in range(4, 10)]
            assert state.length == 10
            assert max_err(torch.cat(steps, dim=1), full) <= ATOL, max_len


@pytest.mark.parametrize("positional", POSITIONAL_KINDS)
def test_cached_seq2seq_decoding_equals_full_forward(positional: str) -> None:
    model = seq2seq(positional)
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(3, VOCAB, (2, 7), generator=gen)
    tgt = torch.randint(3, VOCAB, (2, 6), generator=gen)
    src_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    with torch.no_grad():
        full = model(src, tgt, src_attention_mask=src_mask)
        memory = model.encode(src, src_mask)
        state = model.new_decode_state(2, 6)
        steps = [model.decode(tgt[:, :1], memory, src_mask, decode_state=state)]
        for i in range(1, 6):  # after the first step the encoder's keys and values come from the state
            steps.append(model.decode(tgt[:, i : i + 1], None, decode_state=state))
    assert max_err(torch.cat(steps, dim=1), full) <= ATOL


# --------------------------------------------------------------------------------------------------------------
# Returned attention: shapes by CONVENTIONS.md, rows that are distributions, causal maps.
# --------------------------------------------------------------------------------------------------------------


def _check_maps(maps: list[torch.Tensor], shape: tuple[int, ...], n_layers: int, *, causal: bool) -> None:
    assert isinstance(maps, list) and len(maps) == n_layers
    for w in maps:
        assert w.shape == shape
        torch.testing.assert_close(w.sum(-1), torch.ones(shape[:-1]), atol=1e-5, rtol=0)
        if causal:
            assert torch.equal(w, w.tril())


def test_returned_attention_has_the_documented_shapes() -> None:
    ids = torch.randint(0, VOCAB, (3, 9))
    with torch.no_grad():
        hidden, enc_maps = encoder("sinusoidal")(ids, return_attention=True)
        logits, dec_maps = decoder_lm("learned")(ids, return_attention=True)
        seq_logits, maps = seq2seq("sinusoidal")(ids, ids[:, :5], return_attention=True)
    assert hidden.shape == (3, 9, 32) and logits.shape == (3, 9, VOCAB) and seq_logits.shape == (3, 5, VOCAB)
    _check_maps(enc_maps, (3, 2, 9, 9), 2, causal=False)
    _check_maps(dec_maps, (3, 2, 9, 9), 2, causal=True)
    assert set(maps) == {"encoder", "decoder_self", "cross"}
    _check_maps(maps["encoder"], (3, 2, 9, 9), 2, causal=False)
    _check_maps(maps["decoder_self"], (3, 2, 5, 5), 2, causal=True)
    _check_maps(maps["cross"], (3, 2, 5, 9), 2, causal=False)
    # Not causal where nothing says so: the encoder looks ahead.
    assert enc_maps[0].triu(1).abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------
# Bad input: errors that name the value and the fix.
# --------------------------------------------------------------------------------------------------------------


def test_models_reject_bad_input_with_a_clear_message() -> None:
    lm, enc, s2s = decoder_lm("learned"), encoder("sinusoidal"), seq2seq("sinusoidal")
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=rf"outside \[0, vocab_size={VOCAB}\).*max {VOCAB}"):
        lm(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="min -1"):
        enc(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=r"shape \(batch, seq\), got \(5,\)"):
        lm(ids[0])
    with pytest.raises(TypeError, match="torch.float32"):
        lm(ids.float())
    with pytest.raises(TypeError, match=r"torch.uint8; convert with ids.long\(\)"):
        lm(ids.to(torch.uint8))
    with pytest.raises(TypeError, match="list"):
        enc(ids.tolist())
    for kind in POSITIONAL_KINDS:  # every model, whatever its positions, has a maximum length
        with pytest.raises(ValueError, match="33 tokens is longer than max_seq_len=32"):
            decoder_lm(kind)(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, max_seq_len=32\), got min 0, max 40"):
        enc(ids[:, :3], positions=torch.tensor([[0, 1, 40]]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, keys\) = \(2, 5\), got \(2, 4\)"):
        enc(ids, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"src_attention_mask .* got \(5,\)"):
        s2s(ids, ids, src_attention_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="same batch size: 2 vs 1"):
        s2s(ids, ids[:1])
    with pytest.raises(TypeError, match="tgt_ids must be a torch.Tensor"):
        s2s(ids, ids.tolist())
    with pytest.raises(TypeError, match="ModelConfig"):
        Encoder({"d_model": 32})
