"""Scaled dot-product and multi-head attention, proven against PyTorch's own implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import qkv.attention as attention
from qkv import MultiHeadAttention, scaled_dot_product_attention
from qkv.attention import causal_mask, padding_mask, to_torch_mha_mask

ATOL = 1e-5


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# MultiHeadAttention == torch.nn.MultiheadAttention with the same weights.
# ----------------------------------------------------------------------------------------------------------


def paired_mha(d_model: int = 32, n_heads: int = 4, seed: int = 0) -> tuple[MultiHeadAttention, nn.Module]:
    """A qkv MultiHeadAttention and a torch one holding the very same (random, non-zero bias) weights."""
    torch.manual_seed(seed)
    ours = MultiHeadAttention(d_model, n_heads).eval()
    for p in ours.parameters():
        nn.init.normal_(p, 0.0, 0.3)
    ref = nn.MultiheadAttention(d_model, n_heads, batch_first=True).eval()
    with torch.no_grad():
        # qkv keeps [W_Q | W_K | W_V] as one Linear, exactly the layout of in_proj_weight.
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.out.weight)
        ref.out_proj.bias.copy_(ours.out.bias)
    return ours, ref


@pytest.mark.parametrize("case", ["self", "cross", "key_padding", "causal", "causal_and_padding"])
def test_multi_head_attention_equals_torch_multihead_attention(case: str) -> None:
    ours, ref = paired_mha()
    b, t, s = 3, 7, 7
    if case == "cross":
        s = 11  # a source of a different length than the target
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, 32, generator=gen)
    context = torch.randn(b, s, 32, generator=gen) if case == "cross" else None
    keys_in = x if context is None else context

    real = torch.ones(b, s, dtype=torch.bool)  # True at real tokens
    if case in ("key_padding", "causal_and_padding"):
        real[0, -3:] = False
        real[2, -1:] = False
    use_padding = case in ("key_padding", "causal_and_padding")
    causal = case in ("causal", "causal_and_padding")

    ref_kwargs: dict = {}
    if use_padding:
        ref_kwargs["key_padding_mask"] = to_torch_mha_mask(real)
    if causal:
        ref_kwargs["attn_mask"] = to_torch_mha_mask(causal_mask(t, s))
    ref_out, ref_w = ref(x, keys_in, keys_in, need_weights=True, average_attn_weights=True, **ref_kwargs)

    mask = padding_mask(real) if use_padding else None
    out, w = ours(x, context, mask=mask, causal=causal, need_weights=True)
    assert w.shape == (b, 4, t, s)
    assert max_err(out, ref_out) <= ATOL
    assert max_err(w.mean(dim=1), ref_w) <= ATOL  # head-averaged, as torch returns them

    fused, none = ours(x, context, mask=mask, causal=causal, need_weights=False)
    assert none is None
    assert max_err(fused, ref_out) <= ATOL


def test_to_torch_mha_mask_flips_the_sign_convention() -> None:
    allowed = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(to_torch_mha_mask(allowed), torch.tensor([[False, True, False], [True, True, False]]))
    # PyTorch's own causal mask for nn.MultiheadAttention / nn.Transformer: -inf above the diagonal = masked.
    torch_causal = nn.Transformer.generate_square_subsequent_mask(5) == float("-inf")
    assert torch.equal(to_torch_mha_mask(causal_mask(5)), torch_causal)


def test_causal_mask_is_aligned_bottom_right_for_a_cache() -> None:
    # 2 new queries after 3 cached keys: they are positions 3 and 4 of 5.
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)
    assert torch.equal(causal_mask(4), torch.ones(4, 4).tril().bool())


def test_paper_matrices_are_views_of_the_stored_projection() -> None:
    mha = MultiHeadAttention(16, 4)
    x = torch.randn(2, 3, 16)
    q, k, v = mha.project(x)  # (batch, heads, seq, d_k)
    merge = lambda t: t.transpose(1, 2).reshape(2, 3, 16)  # noqa: E731
    b_q, b_k, b_v = mha.qkv.bias.split(16)
    torch.testing.assert_close(merge(q), x @ mha.W_Q + b_q)
    torch.testing.assert_close(merge(k), x @ mha.W_K + b_k)
    torch.testing.assert_close(merge(v), x @ mha.W_V + b_v)
    assert mha.W_O.shape == (16, 16)


# ----------------------------------------------------------------------------------------------------------
# The explicit formula and the fused kernel agree, in values and gradients.
# ----------------------------------------------------------------------------------------------------------

B, H, T, S, D = 2, 3, 6, 6, 8


def _mask_case(name: str, gen: torch.Generator) -> dict:
    """Keyword arguments for scaled_dot_product_attention, one masking situation each."""
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[0, -2:] = False
    if name == "none":
        return {}
    if name == "padding":  # (batch, 1, 1, keys)
        return {"mask": padding_mask(pad)}
    if name == "per_head":  # (1, heads, queries, keys), every query keeps key 0
        m = torch.rand(1, H, T, S, generator=gen) > 0.4
        m[..., 0] = True
        return {"mask": m}
    if name == "one_dim":  # (keys,): the same keys hidden from every query
        return {"mask": torch.tensor([True, False, True, True, False, True])}
    if name == "two_dim":  # (queries, keys)
        m = torch.rand(T, S, generator=gen) > 0.3
        m[:, -1] = True
        return {"mask": m}
    if name == "causal":
        return {"causal": True}
    if name == "causal_and_padding":
        return {"causal": True, "mask": padding_mask(pad)}
    if name == "bias":
        return {"bias": torch.randn(1, H, T, S, generator=gen)}
    if name == "bias_and_mask":
        return {"bias": torch.randn(1, H, T, S, generator=gen), "mask": padding_mask(pad), "causal": True}
    raise AssertionError(name)


MASK_CASES = ["none", "one_dim", "padding", "per_head", "two_dim", "causal", "causal_and_padding", "bias",
              "bias_and_mask"]


@pytest.mark.parametrize("case", MASK_CASES)
def test_explicit_and_fused_paths_agree_in_values_and_gradients(case: str) -> None:
    gen = torch.Generator().manual_seed(3)
    kwargs = _mask_case(case, gen)
    base = [torch.randn(B, H, n, D, generator=gen, dtype=torch.float32) for n in (T, S, S)]
    grad_out = torch.randn(B, H, T, D, generator=gen)

    results = []
    for need_weights in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out, w = scaled_dot_product_attention(q, k, v, need_weights=need_weights, **kwargs)
        assert (w is None) != need_weights
        out.backward(grad_out)
        results.append((out.detach(), q.grad, k.grad, v.grad))

    for name, explicit, fused in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert max_err(explicit, fused) <= ATOL, name


def _ops_run(need_weights: bool, **kwargs) -> set[str]:
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        scaled_dot_product_attention(q, k, v, need_weights=need_weights, **kwargs)
    return {e.key for e in prof.key_averages()}


def _fused_kernel_ran(ops: set[str]) -> bool:
    fused = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product")  # plain, flash or efficient
    return any(op.startswith(fused) for op in ops)


@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"mask": torch.tensor([True, True, False, True])}])
def test_profiler_shows_fused_kernel_only_when_weights_are_not_requested(kwargs: dict) -> None:
    fused_ops = _ops_run(False, **kwargs)
    explicit_ops = _ops_run(True, **kwargs)
    assert _fused_kernel_ran(fused_ops), sorted(fused_ops)
    assert not _fused_kernel_ran(explicit_ops), sorted(explicit_ops)
    assert "aten::softmax" in explicit_ops or "aten::_softmax" in explicit_ops


@pytest.mark.parametrize("mask", [None, torch.tensor([[True, True, False, True]])])
def test_multi_head_attention_on_cpu_bf16_takes_the_explicit_formula_for_short_sequences(mask) -> None:
    """On the CPU in bf16 the fused kernel is the slower one up to CPU_BF16_EXPLICIT_MAX_KEYS keys (measured),
    so MultiHeadAttention computes the formula there, and gives what fp32 gives up to bf16 rounding; longer
    sequences, and the function scaled_dot_product_attention (its contract), keep the fused kernel."""
    torch.manual_seed(11)
    mha = MultiHeadAttention(16, 2)
    x = torch.randn(1, 4, 16)
    reference, _ = mha(x, mask=mask, causal=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        out, w = mha(x, mask=mask, causal=True)
    assert w is None and out.dtype == torch.bfloat16
    assert not _fused_kernel_ran({e.key for e in prof.key_averages()})
    assert max_err(out.float(), reference) <= 0.05  # bf16 keeps 8 bits of mantissa

    long = torch.randn(1, attention.CPU_BF16_EXPLICIT_MAX_KEYS + 1, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        mha(long, causal=True)
    assert _fused_kernel_ran({e.key for e in prof.key_averages()})
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        scaled_dot_product_attention(q, q, q, causal=True, need_weights=False)
    assert _fused_kernel_ran({e.key for e in prof.key_averages()})


@pytest.mark.parametrize("case", ["causal", "padding+causal", "bias"])
def test_grouped_query_attention_shares_key_value_heads_without_copying_them(case: str) -> None:
    """n_kv_heads < n_heads: the fused kernel shares each key/value head among its group of query heads
    (enable_gqa, no copy of k and v, and none in the profile); it equals the explicit formula, which repeats them."""
    torch.manual_seed(5)
    mha = MultiHeadAttention(32, 4, n_kv_heads=2)
    x = torch.randn(3, 6, 32)
    kwargs: dict = {"causal": case != "bias"}
    if case == "padding+causal":
        kwargs["mask"] = padding_mask(torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]))
    if case == "bias":
        kwargs["bias"] = torch.randn(1, 4, 6, 6)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fused, _ = mha(x, **kwargs)
    explicit, weights = mha(x, need_weights=True, **kwargs)
    assert weights.shape == (3, 4, 6, 6)
    assert max_err(fused, explicit) <= 1e-5
    ops = {e.key for e in prof.key_averages()}
    if attention.SDPA_GROUPS:
        assert "aten::repeat_interleave" not in ops, sorted(ops)


def test_causal_fused_path_builds_no_mask_and_uses_is_causal(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_sdpa(*args, **kwargs)

    def no_mask(*args, **kwargs):
        raise AssertionError("causal fused attention must not build a (T, T) mask")

    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    reference, _ = scaled_dot_product_attention(q, k, v, causal=True, need_weights=True)
    monkeypatch.setattr(attention, "causal_mask", no_mask)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    out, _ = scaled_dot_product_attention(q, k, v, causal=True, need_weights=False)
    assert len(calls) == 1
    assert calls[0]["attn_mask"] is None and calls[0]["is_causal"] is True
    assert calls[0]["scale"] == pytest.approx(8**-0.5)
    assert max_err(out, reference) <= ATOL
    with pytest.raises(AssertionError, match="must not build"):  # the explicit path does need the mask
        scaled_dot_product_attention(q, k, v, causal=True, need_weights=True)


@pytest.mark.parametrize("case", ["row", "whole_sequence", "with_bias"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_query_gives_zeros_and_finite_gradients(case: str, need_weights: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).requires_grad_() for _ in range(3))
    kwargs: dict = {}
    if case == "row":  # query 2 of every head may see nothing
        mask = torch.ones(T, T, dtype=torch.bool)
        mask[2] = False
        kwargs["mask"] = mask
        dead = (slice(None), slice(None), 2)
    elif case == "whole_sequence":  # batch row 1 is all padding
        real = torch.ones(B, T, dtype=torch.bool)
        real[1] = False
        kwargs["mask"] = padding_mask(real)
        dead = (1,)
    else:
        mask = torch.ones(T, T, dtype=torch.bool)
        mask[0] = False
        kwargs.update(mask=mask, bias=torch.randn(1, H, T, T, generator=gen), causal=True)
        dead = (slice(None), slice(None), 0)
    out, w = scaled_dot_product_attention(q, k, v, need_weights=need_weights, **kwargs)
    assert torch.isfinite(out).all()
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    if need_weights:
        assert torch.equal(w[dead], torch.zeros_like(w[dead]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------------------------------------
# Why divide by sqrt(d_k).
# ----------------------------------------------------------------------------------------------------------


def test_scaling_by_sqrt_dk_prevents_softmax_saturation() -> None:
    gen = torch.Generator().manual_seed(0)
    n_rows, d_k, n_keys = 1000, 512, 16
    q = torch.randn(n_rows, 1, d_k, generator=gen)  # unit variance
    k = torch.randn(n_rows, n_keys, d_k, generator=gen)
    v = torch.randn(n_rows, n_keys, 4, generator=gen)
    _, unscaled = scaled_dot_product_attention(q, k, v, scale=1.0)
    _, scaled = scaled_dot_product_attention(q, k, v)  # default: 1 / sqrt(d_k)
    saturated = lambda w: (w.amax(dim=-1) > 0.99).float().mean().item()  # noqa: E731
    assert saturated(unscaled) >= 0.6
    assert saturated(scaled) == 0.0
    # The default really is 1/sqrt(d_k): identical to scaling the queries by hand.
    _, by_hand = scaled_dot_product_attention(q / d_k**0.5, k, v, scale=1.0)
    assert max_err(scaled, by_hand) <= 1e-6


# ----------------------------------------------------------------------------------------------------------
# Bad input: a ValueError / TypeError naming the value, never a shape error from deep inside PyTorch.
# ----------------------------------------------------------------------------------------------------------


def test_attention_rejects_bad_inputs_with_a_clear_message() -> None:
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    with pytest.raises(ValueError, match=r"q has 8, k has 6"):
        scaled_dot_product_attention(q, torch.randn(2, 4, 5, 6), v)
    with pytest.raises(ValueError, match=r"k has 5, v has 7"):
        scaled_dot_product_attention(q, k, torch.randn(2, 4, 7, 8))
    with pytest.raises(ValueError, match=r"\(8,\)"):
        scaled_dot_product_attention(torch.randn(8), k, v)
    with pytest.raises(TypeError, match="torch.int64"):
        scaled_dot_product_attention(q.long(), k, v)
    with pytest.raises(TypeError, match="list"):
        scaled_dot_product_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5\) does not broadcast"):
        scaled_dot_product_attention(q, k, v, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.float32"):
        scaled_dot_product_attention(q, k, v, torch.ones(5, 5))
    with pytest.raises(ValueError, match=r"bias of shape \(2, 2\)"):
        scaled_dot_product_attention(q, k, v, bias=torch.zeros(2, 2))


def test_multi_head_attention_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_heads=4"):
        MultiHeadAttention(30, 4)
    mha = MultiHeadAttention(16, 4)
    with pytest.raises(ValueError, match=r"\(batch, seq, 16\), got \(2, 3, 12\)"):
        mha(torch.randn(2, 3, 12))
    with pytest.raises(ValueError, match=r"context of shape \(batch, src_seq, 16\), got \(2, 16\)"):
        mha(torch.randn(2, 3, 16), torch.randn(2, 16))


# ----------------------------------------------------------------------------------------------------------
# The formula is the reference; every kernel the dispatcher may pick gives its result.
# ----------------------------------------------------------------------------------------------------------


def test_the_formula_is_softmax_of_scaled_scores_times_values_term_by_term() -> None:
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, n, 4, generator=gen, dtype=torch.float64) for n in (3, 5, 5))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])[:, None, None, :]
    bias = torch.randn(1, 3, 3, 5, generator=gen, dtype=torch.float64)
    out, weights = attention.attention(q, k, v, mask, bias=bias)
    for b, h, i in [(0, 0, 0), (1, 2, 1), (1, 1, 2)]:  # one query at a time, with the math module
        visible = [j for j in range(5) if mask[b, 0, 0, j]]
        s = {j: float(q[b, h, i] @ k[b, h, j]) / 4**0.5 + float(bias[0, h, i, j]) for j in visible}
        z = sum(torch.tensor(s[j]).exp() for j in visible)
        expected_w = [float(torch.tensor(s[j]).exp() / z) if j in s else 0.0 for j in range(5)]
        assert torch.allclose(weights[b, h, i], torch.tensor(expected_w, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(out[b, h, i], sum(expected_w[j] * v[b, h, j] for j in range(5)), atol=1e-12)


@pytest.mark.parametrize("case", MASK_CASES)
def test_every_kernel_equals_the_formula(case: str) -> None:
    gen = torch.Generator().manual_seed(12)
    kwargs = _mask_case(case, gen)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for n in (T, S, S))
    mask = kwargs.get("mask")
    if kwargs.get("causal"):
        mask = causal_mask(T, S) if mask is None else mask & causal_mask(T, S)
    reference, reference_w = attention.attention(q, k, v, mask, bias=kwargs.get("bias"))
    fused, none = scaled_dot_product_attention(q, k, v, need_weights=False, **kwargs)
    explicit, weights = scaled_dot_product_attention(q, k, v, need_weights=True, **kwargs)
    assert none is None and max_err(fused, reference) <= ATOL and max_err(explicit, reference) <= ATOL
    assert max_err(weights, reference_w) <= ATOL
    # The CPU-bf16 rule's explicit kernel, asked for no weights (what MultiHeadAttention takes there):
    low = [t.bfloat16() for t in (q, k, v)]
    bias = kwargs.get("bias")
    out, _ = attention._dispatch(*low, kwargs.get("mask"), bool(kwargs.get("causal")), None, 0.0, False,
                                 None if bias is None else bias.bfloat16(), speed_rules=True)
    expected, _ = attention.attention(*low, mask, bias=None if bias is None else bias.bfloat16())
    assert max_err(out.float(), expected.float()) <= 0.05  # bf16 rounding of the two orders of operations


def test_grouped_key_value_heads_equal_the_formula_with_each_head_repeated() -> None:
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(2, 6, 5, 8, generator=gen)
    k, v = (torch.randn(2, 2, 5, 8, generator=gen) for _ in range(2))  # 2 key/value heads, 3 query heads each
    mask = padding_mask(torch.tensor([[1] * 5, [1] * 3 + [0] * 2]))
    reference, _ = attention.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask & causal_mask(5))
    for need_weights in (False, True):
        out, _ = attention._dispatch(q, k, v, mask, True, None, 0.0, need_weights, None, speed_rules=True)
        assert max_err(out, reference) <= ATOL, need_weights


def test_blocks_read_one_frozen_inputs_object_and_refuse_unknown_arguments() -> None:
    from dataclasses import FrozenInstanceError

    from qkv import ModelConfig
    from qkv.blocks import AttentionInputs, DecoderBlock, EncoderBlock

    config = ModelConfig.preset("tiny-encoder", d_model=32, d_ff=64)
    x = torch.randn(2, 5, 32)
    inputs = AttentionInputs(mask=padding_mask(torch.tensor([[1] * 5, [1] * 3 + [0] * 2])))
    with pytest.raises(FrozenInstanceError):
        inputs.causal = True  # type: ignore[misc]
    with pytest.raises(TypeError):  # an encoder block has no cross-attention: a context is an error, not ignored
        EncoderBlock(config)(x, inputs, context=x)
    with pytest.raises(ValueError, match="pass the encoder output as context"):
        DecoderBlock(config)(x, inputs)
    out, _, _ = DecoderBlock(config)(x, AttentionInputs(causal=True, context=x, context_mask=inputs.mask))
    assert out.shape == x.shape
