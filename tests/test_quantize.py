"""Weight-only int8 / int4 layers (``qkv.quantize``): each layer multiplies by the weights it says it holds, within
the bf16 rounding of its activations, and those weights are its float weights rounded to the nearest code; the
bytes are really fewer and the packed kernels really run; a quantized model decodes (greedy, beam, seq2seq, cached
or not, compiled) and a small trained model's perplexity barely moves."""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import qkv
from qkv.data import read_corpus
from qkv.generation import beam_search, generate, generate_seq2seq
from qkv.quantize import GROUP_SIZES, MODES, Int4Linear, Int8Linear, dequantize, int4_codes, quantized_bytes
from qkv.tokenizers import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits


def _layer(mode: str, linear: nn.Linear, group_size: int = 32) -> nn.Module:
    return Int8Linear.from_linear(linear) if mode == "int8" else Int4Linear.from_linear(linear, group_size)


@torch.no_grad()
def _faults(layer: nn.Module, linear: nn.Linear, x: torch.Tensor) -> list[str]:
    """What is wrong with ``layer`` as a quantization of ``linear``, from two checks:

    1. the layer computes x Ŵ^T + b for its own dequantized Ŵ, within what rounding to bf16 allows: the
       activations are rounded (a relative U each: U Σ_k |x_k| |Ŵ_nk|) and so is the output (U |y_n|), and the
       kernel accumulates in fp32 (K 2^-24 Σ_k |x_k| |Ŵ_nk|);
    2. Ŵ is W rounded to its code grid: each weight within half a step of its float value (the step: s for int4's
       group, s for int8's row), plus the bf16 rounding of the zero point.
    """
    faults = []
    w_hat = layer.dequantized().double()
    y = layer(x).double()
    xd = x.double().reshape(-1, x.shape[-1])
    reference = xd @ w_hat.T + (0 if linear.bias is None else linear.bias.double())
    magnitude = xd.abs() @ w_hat.abs().T
    bound = U * magnitude + U * reference.abs() + x.shape[-1] * 2.0 ** -24 * magnitude + 1e-30
    ratio = float(((y.reshape(reference.shape) - reference).abs() / bound).max())
    if ratio > 1:
        faults.append(f"matmul off its dequantized weights by {ratio:.1f}x the bf16 bound")
    w = linear.weight.detach().double()
    if isinstance(layer, Int8Linear):
        step = layer.scales.double()[:, None].expand_as(w)
        slack = torch.zeros_like(w)
    else:
        sz = layer.scales_and_zeros.double()  # (K/G, N, 2)
        step = sz[..., 0].T.repeat_interleave(layer.group_size, dim=1)[: w.shape[0], : w.shape[1]]
        slack = U * sz[..., 1].T.abs().repeat_interleave(layer.group_size, dim=1)[: w.shape[0], : w.shape[1]]
    far = float(((w_hat - w).abs() - (step / 2 + slack)).max())
    if far > 1e-7:
        faults.append(f"a weight lies {far:.3g} past half a step from its float value")
    return faults


SHAPES = [(64, 128, False), (48, 96, True), (65, 40, True)]  # (out, in, bias): odd shapes are padded inside


@pytest.mark.parametrize("mode,group_size", [("int8", None), *[("int4", g) for g in GROUP_SIZES]])
def test_each_quantized_layer_multiplies_by_its_dequantized_weights_within_bf16_rounding(mode, group_size):
    torch.manual_seed(0)
    for out_features, in_features, bias in SHAPES:
        if group_size and group_size > 2 * in_features:
            continue
        linear = nn.Linear(in_features, out_features, bias=bias)
        layer = _layer(mode, linear, group_size)
        x = torch.randn(3, 5, in_features)
        assert _faults(layer, linear, x) == [], (out_features, in_features)
        assert layer(x).shape == (3, 5, out_features) and layer(x).dtype == torch.float32
        assert layer(x.bfloat16()).dtype == torch.bfloat16  # the input's dtype back out


class WrongScale(Int4Linear):
    """A sloppy quantizer: max − min over 16 levels instead of 15, so the top code is clipped."""

    @classmethod
    def from_linear(cls, linear, group_size=32):
        codes, scales, zeros = int4_codes(linear.weight, group_size)
        return cls.from_codes(codes, (scales.float() * 15 / 16).to(scales.dtype), zeros, group_size, linear.bias)


class OffByOneZero(Int4Linear):
    """A sloppy quantizer: the zero point as the group's minimum + 7 steps (codes read as q − 7, not q − 8)."""

    @classmethod
    def from_linear(cls, linear, group_size=32):
        codes, scales, zeros = int4_codes(linear.weight, group_size)
        return cls.from_codes(codes, scales, (zeros.float() - scales.float()).to(zeros.dtype), group_size,
                              linear.bias)


class WrongGroupOrder(Int4Linear):
    """A sloppy quantizer: the (N, K/G) scales and zeros reshaped to (K/G, N) where they must be transposed."""

    @classmethod
    def from_linear(cls, linear, group_size=32):
        codes, scales, zeros = int4_codes(linear.weight, group_size)
        n, groups = scales.shape
        return cls.from_codes(codes, scales.reshape(groups, n).T, zeros.reshape(groups, n).T, group_size,
                              linear.bias)


class Int8WrongScale(Int8Linear):
    """A sloppy quantizer: one scale for the whole matrix kept, but each row's own scale handed to the kernel."""

    @classmethod
    def from_linear(cls, linear):
        w = linear.weight.detach().float()
        scale = w.abs().max() / 127
        q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        return cls(q, w.abs().amax(dim=1) / 127, linear.bias)


@pytest.mark.parametrize("broken", [WrongScale, OffByOneZero, WrongGroupOrder, Int8WrongScale])
def test_the_bounds_catch_a_sloppy_quantizer(broken):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    faults = _faults(broken.from_linear(linear), linear, torch.randn(4, 128))
    assert faults, f"{broken.__name__} passed"


@pytest.mark.parametrize("mode,limit,kernel", [("int8", 0.55, "aten::_weight_int8pack_mm"),
                                               ("int4", 0.30, "aten::_weight_int4pack_mm_for_cpu")])
def test_a_quantized_layer_holds_a_fraction_of_its_bf16_bytes_and_runs_the_packed_kernel(mode, limit, kernel):
    # SmolLM2's feed-forward shape; int4 at the default group size (64): 0.5 + 4/64 bytes a weight
    linear = nn.Linear(576, 1536, bias=False)
    layer = _layer(mode, linear, group_size=64)
    assert not list(layer.parameters()) and not hasattr(layer, "weight")
    bf16_bytes = linear.weight.numel() * 2
    assert quantized_bytes(layer) <= limit * bf16_bytes, quantized_bytes(layer) / bf16_bytes
    ops = _profiled_ops(layer, torch.randn(2, 576))
    assert kernel in ops
    assert not ops & FLOAT_MATMULS, ops
    # the check sees a fake: the same layer dequantizing, then multiplying in floats
    weight = layer.dequantized()
    fake = _profiled_ops(lambda x: F.linear(x, weight.to(x.dtype)), torch.randn(2, 576))
    assert kernel not in fake and fake & FLOAT_MATMULS


FLOAT_MATMULS = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm"}


def _profiled_ops(fn, x: torch.Tensor) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.inference_mode():
        fn(x)
    return {event.key for event in profile.key_averages()}


# --------------------------------------------------------------------------------------------------------------
# Whole models.
# --------------------------------------------------------------------------------------------------------------

VOCAB = 48


def decoder(*, tie: bool = True, fused: bool = True, seed: int = 0, **overrides) -> qkv.DecoderLM:
    torch.manual_seed(seed)
    sizes = {"d_model": 64, "n_heads": 4, "d_ff": 128, "n_decoder_layers": 2, "max_seq_len": 96, **overrides}
    config = qkv.ModelConfig.preset("tiny-decoder", vocab_size=VOCAB, positional="rope", tie_embeddings=tie,
                                    fused_qkv=fused, **sizes)
    return qkv.DecoderLM(config).eval()


def seq2seq(seed: int = 0) -> qkv.Transformer:
    torch.manual_seed(seed)
    config = qkv.ModelConfig.preset("tiny-seq2seq", vocab_size=VOCAB, d_model=64, n_heads=4, d_ff=128,
                                    n_encoder_layers=2, n_decoder_layers=2, max_seq_len=64, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0)
    return qkv.Transformer(config).eval()


PROMPT = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
SOURCE = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])


@pytest.mark.parametrize("mode,output", [("int8", "int8"), ("int4", "int8"), ("int4", "int4"), ("int8", "int4")])
@pytest.mark.parametrize("tie", [True, False])
def test_quantize_swaps_every_linear_and_keeps_the_embedding_lookup_exact(mode, output, tie):
    model = decoder(tie=tie)
    embedding = model.embed.token.weight.detach().clone()
    output_weight = model.lm_head.weight.detach().clone()  # the embedding itself when tied
    kind = {"int8": Int8Linear, "int4": Int4Linear}
    out = qkv.quantize(model, mode, output=output) if output == "int4" else qkv.quantize(model, mode)
    assert out is model
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert type(model.lm_head) is kind[output]  # int8 unless output="int4": its rounding goes into the logits
    assert {type(m) for n, m in model.named_modules() if n.startswith("layers.")} >= {kind[mode]}
    assert not {type(m) for n, m in model.named_modules() if n.startswith("layers.")} & {kind[output]} - {kind[mode]}
    assert torch.equal(model.embed.token.weight, embedding)  # the lookup reads the exact rows
    # the output layer is its own quantized copy of the matrix, within half a step of it
    assert _faults(model.lm_head, _as_linear(output_weight), torch.randn(3, 64)) == []


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def test_a_quantized_model_is_never_saved_and_dequantizes_back_to_linear_layers(tmp_path):
    model = qkv.quantize(decoder(), "int4")
    with pytest.raises(RuntimeError, match="packed for this CPU and never saved.*quantize it when loading"):
        model.state_dict()
    with pytest.raises(ValueError, match="W_Q is a view of a plain nn.Linear.*dequantize"):
        _ = model.layers.layers[0].self_attn.W_Q
    with torch.inference_mode():
        before = model(PROMPT)
    dequantize(model)
    assert not [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert model.layers.layers[0].self_attn.W_Q.shape == (64, 64)
    with torch.inference_mode():
        after = model(PROMPT)
    torch.testing.assert_close(after, before, atol=0.05, rtol=0)  # the same weights, fp32 activations


def test_quantize_refuses_what_it_cannot_pack_in_one_line():
    with pytest.raises(ValueError, match="quantize='int3' is not a quantization qkv knows; choose one of int8, int4"):
        qkv.quantize(decoder(), "int3")
    with pytest.raises(ValueError, match="group_size=48 is not one the int4 kernel takes; choose one of 32, 64"):
        qkv.quantize(decoder(), "int4", group_size=48)
    with pytest.raises(ValueError, match="quantize='int8' packs weights for the CPU.*device='cpu'"):
        qkv.load("tests/fixtures/checkpoints/decoder/run", device="meta", quantize="int8")
    with pytest.raises(ValueError, match="quantized layers run on the CPU's packed kernels, but the model is on meta"):
        qkv.quantize(decoder().to("meta"), "int8")
    with pytest.raises(RuntimeError, match="is an Int8Linear, packed for this CPU and never saved"):
        qkv.quantize(decoder(), "int8").state_dict()


def test_quantizing_a_model_with_adapters_asks_to_merge_them_first():
    peft = pytest.importorskip("peft")
    adapted = peft.get_peft_model(decoder(), peft.LoraConfig(r=2, target_modules=["self_attn.qkv"]))
    with pytest.raises(ValueError, match=r"holds adapters \(peft LoRA\); merge them first \(merge_and_unload\(\)\)"):
        qkv.quantize(adapted, "int8")
    merged = qkv.quantize(adapted.merge_and_unload(), "int8")
    assert not [m for m in merged.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("mode", MODES)
def test_quantized_decoders_and_encoder_decoders_run_greedy_beam_and_seq2seq(mode):
    model = qkv.quantize(decoder(), mode)
    greedy = generate(model, PROMPT, 12, temperature=0, stop_token_ids=())
    assert greedy.shape == (2, 17) and torch.equal(greedy[:, :5], PROMPT)
    assert torch.equal(generate(model, PROMPT, 12, temperature=0, stop_token_ids=(), use_cache=False), greedy)
    beams = beam_search(model, PROMPT, 8, num_beams=3, stop_token_ids=())
    assert beams.shape[0] == 2
    translation = qkv.quantize(seq2seq(), mode)
    greedy = generate_seq2seq(translation, SOURCE, SOURCE != 0, max_new_tokens=8)
    beam = generate_seq2seq(translation, SOURCE, SOURCE != 0, num_beams=3, max_new_tokens=8)
    assert len(greedy) == len(beam) == 2
    encoder = qkv.quantize(qkv.Encoder(qkv.ModelConfig.preset("tiny-encoder", vocab_size=VOCAB)).eval(), mode)
    with torch.inference_mode():
        assert encoder(PROMPT).shape == (2, 5, 64)


def test_a_compiled_quantized_decoding_step_traces_at_most_two_graphs():
    torch._dynamo.reset()
    counters.clear()
    model = qkv.quantize(decoder(max_seq_len=40), "int4")  # both kernels in one graph: the output layer int8
    assert {type(m) for m in model.modules()} >= {Int8Linear, Int4Linear}
    states = [model.new_decode_state(2, 37) for _ in range(2)]
    compiled = torch.compile(lambda ids: model(ids, decode_state=states[0])[:, -1], fullgraph=True, backend="eager")
    with torch.inference_mode():
        got, want = [compiled(PROMPT)], [model(PROMPT, decode_state=states[1])[:, -1]]
        for _ in range(32):
            token = want[-1].argmax(-1, keepdim=True)
            got.append(compiled(token))
            want.append(model(token, decode_state=states[1])[:, -1])
    assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]["unique_graphs"]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Quality: a small model trained on tiny Shakespeare here, its perplexity on held-out text.
# --------------------------------------------------------------------------------------------------------------

CONTEXT = 32


@pytest.fixture(scope="module")
def shakespeare():
    """A 2-layer character model trained for 200 steps (a few seconds on one thread), the text's last 10% held
    out, and the tokenizer."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        text = read_corpus().text
        tokenizer = Tokenizer.char(text)
        ids = torch.tensor(tokenizer.encode(text))
        split = int(len(ids) * 0.9)
        train, held = ids[:split], ids[split:]
        config = qkv.ModelConfig.preset("tiny-decoder", vocab_size=tokenizer.vocab_size, d_model=64, n_heads=4,
                                        d_ff=256, n_decoder_layers=2, max_seq_len=128, dropout=0.0)
        torch.manual_seed(0)
        model = qkv.DecoderLM(config)
        steps = 200
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps, pct_start=0.1)
        draw = torch.Generator().manual_seed(0)
        for _ in range(steps):
            starts = torch.randint(0, len(train) - CONTEXT - 1, (16,), generator=draw).tolist()
            batch = torch.stack([train[s:s + CONTEXT + 1] for s in starts])
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        yield model.eval(), tokenizer, held
    finally:
        torch.set_num_threads(previous)


def _perplexity(model: nn.Module, held: torch.Tensor, windows: int = 100) -> float:
    x = held[: windows * CONTEXT + 1]
    inputs, targets = x[:-1].reshape(windows, CONTEXT), x[1:].reshape(windows, CONTEXT)
    with torch.inference_mode():
        logits = model(inputs).float()  # the loss in fp32: a bf16 loss moves in steps of 1.6% of the perplexity
    return math.exp(float(F.cross_entropy(logits.flatten(0, 1), targets.flatten())))


def test_a_quantized_trained_model_keeps_its_perplexity(shakespeare):
    model, tokenizer, held = shakespeare
    counts = torch.bincount(held, minlength=tokenizer.vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    unigram = math.exp(float(-(p * p.log()).sum()))
    reference = _perplexity(copy.deepcopy(model).bfloat16(), held)
    assert reference < unigram, (reference, unigram)  # trained: it beats the characters' unigram perplexity
    for mode, limit in (("int8", 0.01), ("int4", 0.05)):  # int4: every layer, the output layer too
        quantized = _perplexity(qkv.quantize(copy.deepcopy(model).bfloat16(), mode, output=mode), held)
        assert abs(quantized / reference - 1) <= limit, (mode, quantized, reference)


@pytest.mark.parametrize("mode", MODES)
def test_a_quantized_trained_model_decodes_the_same_with_and_without_the_cache(shakespeare, mode):
    model, tokenizer, _ = shakespeare
    quantized = qkv.quantize(copy.deepcopy(model), mode)
    ids = torch.tensor([tokenizer.encode("ROMEO:")])
    cached = generate(quantized, ids, 48, temperature=0, stop_token_ids=())
    assert torch.equal(generate(quantized, ids, 48, temperature=0, stop_token_ids=(), use_cache=False), cached)


def test_int8_greedy_text_equals_the_float_models_for_32_tokens_on_the_readme_prompt(shakespeare):
    model, tokenizer, _ = shakespeare
    ids = torch.tensor([tokenizer.encode("ROMEO:")])  # the README's prompt
    want = generate(model, ids, 32, temperature=0, stop_token_ids=())
    got = generate(qkv.quantize(copy.deepcopy(model), "int8"), ids, 32, temperature=0, stop_token_ids=())
    assert torch.equal(got, want), (tokenizer.decode(got[0].tolist()), tokenizer.decode(want[0].tolist()))


# --------------------------------------------------------------------------------------------------------------
# GGUF: Q4_0 / Q4_1 blocks become int4 layers as they are.
# --------------------------------------------------------------------------------------------------------------


def write_quantized_gguf(path, kinds: dict[str, str]) -> None:
    """A tiny LLaMA GGUF (d_model 64, 2 layers, tied embedding) whose tensors are stored in ``kinds[part]``
    ("Q4_0", "Q4_1", "Q8_0"; norms F32), the rows of W_Q and W_K as llama.cpp's converter orders them."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import pre_tokenizers

    writer = gguf.GGUFWriter(str(path), arch="llama")
    for add, value in (("block_count", 2), ("context_length", 32), ("embedding_length", 64),
                       ("feed_forward_length", 96), ("head_count", 4), ("head_count_kv", 2),
                       ("layer_norm_rms_eps", 1e-5), ("rope_freq_base", 10000.0)):
        getattr(writer, f"add_{add}")(value)
    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "<|end|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([])
    writer.add_eos_token_id(len(tokens) - 1)
    torch.manual_seed(0)
    shapes = {"token_embd": (len(tokens), 64), "output_norm": (64,)}
    for i in range(2):
        shapes |= {f"blk.{i}.attn_norm": (64,), f"blk.{i}.ffn_norm": (64,), f"blk.{i}.attn_q": (64, 64),
                   f"blk.{i}.attn_k": (32, 64), f"blk.{i}.attn_v": (32, 64), f"blk.{i}.attn_output": (64, 64),
                   f"blk.{i}.ffn_gate": (96, 64), f"blk.{i}.ffn_up": (96, 64), f"blk.{i}.ffn_down": (64, 96)}
    for name, shape in shapes.items():
        offset = 1.0 if name.endswith("norm") else 0.3 * torch.rand(shape[:1] + (1,) * (len(shape) - 1))
        w = torch.randn(shape) * 0.2 + offset  # rows off zero: Q4_1's minimum matters
        kind = "F32" if len(shape) == 1 else kinds[name.split(".")[-1]]
        if kind == "F32":
            writer.add_tensor(f"{name}.weight", w.numpy())
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(f"{name}.weight", gguf.quants.quantize(w.numpy(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("embedding,output", [("Q8_0", "int8"), ("Q8_0", "int4"), ("Q4_0", "int4")])
def test_a_ggufs_q4_blocks_become_int4_layers_without_a_round_trip_through_floats(tmp_path, embedding, output):
    from qkv.interop.gguf import load_gguf

    kinds = {"token_embd": embedding, "attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1", "attn_output": "Q4_0",
             "ffn_gate": "Q4_0", "ffn_up": "Q4_0", "ffn_down": "Q4_1"}
    write_quantized_gguf(tmp_path / "tiny.gguf", kinds)
    floats, _ = load_gguf(tmp_path / "tiny.gguf", tokenizer=False)  # the gguf package's dequantized weights
    model, tokenizer = qkv.load(tmp_path / "tiny.gguf", quantize="int4", output=output)
    assert tokenizer is not None
    linears = {n: m for n, m in floats.named_modules() if isinstance(m, nn.Linear)}
    anew = output == "int4" and embedding == "Q8_0"  # the output layer, a copy of a Q8_0 embedding: quantized anew
    for name, layer in model.named_modules():
        if name not in linears:
            continue
        if name == "lm_head" and output == "int8":
            assert isinstance(layer, Int8Linear) and _faults(layer, linears[name], torch.randn(3, 64)) == []
            continue
        assert isinstance(layer, Int4Linear), name
        # Q4 blocks (the tied output layer's too, when the embedding is Q4): group size 32, their weights within the
        # bf16 rounding of the blocks' scales and zeros (|q − 8| <= 8: U (8 |s| + |z|))
        assert layer.group_size == (64 if name == "lm_head" and anew else 32), name
        sz = layer.scales_and_zeros.double()
        scale = sz[..., 0].T.repeat_interleave(layer.group_size, dim=1)[: layer.out_features, : layer.in_features]
        zero = sz[..., 1].T.repeat_interleave(layer.group_size, dim=1)[: layer.out_features, : layer.in_features]
        error = (layer.dequantized().double() - linears[name].weight.double()).abs()
        allowed = scale / 2 + U * zero.abs() if name == "lm_head" and anew else U * (8 * scale.abs() + zero.abs())
        allowed = allowed + 1e-7
        assert bool((error <= allowed).all()), (name, float((error - allowed).max()))
    assert torch.equal(model.embed.token.weight, floats.embed.token.weight)  # the lookup: the file's exact values
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = model(ids), floats(ids)
    assert (got - want).abs().max() < 0.1 * want.abs().max()


# --------------------------------------------------------------------------------------------------------------
# --quantize on every command that loads a model for inference.
# --------------------------------------------------------------------------------------------------------------

FIXTURES = "tests/fixtures/checkpoints"
INFERENCE_COMMANDS = ["generate", "chat", "serve", "eval", "explain", "show attention", "embed", "translate"]


def test_every_inference_command_takes_quantize_with_the_librarys_modes():
    from qkv.cli import build_parser

    for command in INFERENCE_COMMANDS:
        sub = build_parser()
        for word in command.split():  # "show attention": a command's own subcommand
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
        option = next((a for a in sub._actions if "--quantize" in a.option_strings), None)
        assert option is not None, command
        assert tuple(option.choices) == MODES and option.default is None, command


def _cli(capsys, *argv: str) -> str:
    from qkv.cli import main

    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_the_commands_run_a_quantized_model(capsys, tmp_path):
    decoder_run, encoder_run = f"{FIXTURES}/decoder/run", f"{FIXTURES}/encoder/run"
    # explain: the query vector is computed by the quantized W_Q, so its numbers move
    args = ["explain", "--checkpoint", decoder_run, "To be", "--layer", "0", "--head", "0", "--token", "1", "--json"]
    plain, int8 = (_cli(capsys, *args, *flag) for flag in ([], ["--quantize", "int8"]))
    assert plain != int8
    # embed: the vectors move by the rounding
    args = ["embed", "--checkpoint", encoder_run, "Now is", "--precision", "8"]
    assert _cli(capsys, *args) != _cli(capsys, *args, "--quantize", "int4")
    # generate: the same text as the library's quantized model
    model, tokenizer = qkv.load(decoder_run, quantize="int4")
    from qkv.generation import generate_text

    want = "To be" + generate_text(model, tokenizer, "To be", 12, temperature=0)
    assert _cli(capsys, "generate", "--checkpoint", decoder_run, "To be", "--greedy", "--max-new-tokens", "12",
                "--quantize", "int4").rstrip("\n") == want
    # eval: the loss of the quantized model, which differs from the float model's in its last digits
    evaluated = [_cli(capsys, "eval", "--checkpoint", decoder_run, *flag) for flag in ([], ["--quantize", "int4"])]
    assert evaluated[0] != evaluated[1] and all(out.startswith("loss ") for out in evaluated)
    assert _cli(capsys, "translate", "--checkpoint", f"{FIXTURES}/seq2seq/run", "one two", "--beam", "2",
                "--quantize", "int8").strip()
    assert "wrote" in _cli(capsys, "show", "attention", "--checkpoint", encoder_run, "Now is",
                           "--out", str(tmp_path / "a.png"), "--quantize", "int8")


def test_the_explorer_quantizes_every_model_it_loads():
    from qkv.serve import Explorer

    explorer = Explorer(checkpoint=f"{FIXTURES}/decoder/run", quantize="int4")
    assert {type(m) for m in explorer.model.modules()} >= {Int4Linear}
    explorer.load(f"{FIXTURES}/encoder/run")  # one picked in the page
    assert not [m for m in explorer.model.modules() if isinstance(m, nn.Linear)]


def test_the_smollm2_benchmark_times_each_contender_in_a_fresh_process(tmp_path):
    from qkv.bench.generation import format_generation_table, smollm2_rows

    write_quantized_gguf(tmp_path / "tiny.gguf", {"token_embd": "Q8_0", "attn_q": "Q4_1", "attn_k": "Q4_1",
                                                  "attn_v": "Q4_1", "attn_output": "Q4_0", "ffn_gate": "Q4_0",
                                                  "ffn_up": "Q4_0", "ffn_down": "Q4_1"})
    rows = smollm2_rows(tmp_path / "tiny.gguf", threads=1, new_tokens=6, rounds=1, contenders=("int4",))
    row = rows[0]
    assert row["contender"] == "int4" and row["tokens_per_s"] > 0 and 0 < row["first_token_s"] < row["load_s"] + 60
    assert row["compile_s"] is None and len(rows) == 1  # llama.cpp not asked for: no row, no note
    table = format_generation_table(rows)
    assert "each run a fresh process with OMP_WAIT_POLICY=PASSIVE" in table and "load average" in table
    with pytest.raises(ValueError, match="unknown contenders"):
        smollm2_rows(tmp_path / "tiny.gguf", contenders=("int3",))


def test_chat_runs_a_quantized_model_and_quantize_reaches_inside_wrappers(shakespeare, tmp_path, monkeypatch, capsys):
    import io

    from qkv.checkpoint import save_checkpoint

    model, tokenizer, _ = shakespeare
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    monkeypatch.setattr("sys.stdin", io.StringIO("ROMEO:\n"))
    reply = _cli(capsys, "chat", "--checkpoint", str(tmp_path / "ckpt"), "--greedy", "--max-new-tokens", "8",
                 "--quantize", "int4")
    assert reply.strip()
    compiled = torch.compile(copy.deepcopy(model), backend="eager")  # qkv.models.unwrap finds the model inside
    qkv.quantize(compiled, "int8")
    assert not [m for m in compiled._orig_mod.modules() if isinstance(m, nn.Linear)]
