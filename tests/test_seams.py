"""The seams real models meet qkv at: every weight used by calling its module (so peft adapters and quantized
layers can stand in for any ``nn.Linear``), the projection layouts, and a decoding step with one shape every
step (so ``torch.compile(fullgraph=True)`` traces it once)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import qkv
from qkv.attention import MultiHeadAttention
from qkv.generation import beam_search, generate, generate_seq2seq

POSITIONALS = ("sinusoidal", "learned", "rope", "alibi", "none")
VOCAB = 40


def decoder(positional: str = "rope", *, tie: bool = True, fused: bool = True, max_seq_len: int = 96,
            seed: int = 0, **overrides) -> qkv.DecoderLM:
    torch.manual_seed(seed)
    sizes = {"d_model": 32, "n_heads": 4, "d_ff": 64, "n_decoder_layers": 2, **overrides}
    config = qkv.ModelConfig.preset("tiny-decoder", vocab_size=VOCAB, max_seq_len=max_seq_len,
                                    positional=positional, tie_embeddings=tie, fused_qkv=fused, **sizes)
    return qkv.DecoderLM(config).eval()


def seq2seq(*, fused: bool = True, tie: bool = True, seed: int = 0) -> qkv.Transformer:
    torch.manual_seed(seed)
    config = qkv.ModelConfig.preset("tiny-seq2seq", vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64,
                                    n_encoder_layers=2, n_decoder_layers=2, max_seq_len=64, fused_qkv=fused,
                                    tie_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return qkv.Transformer(config).eval()


def encoder(seed: int = 0) -> qkv.Encoder:
    torch.manual_seed(seed)
    return qkv.Encoder(qkv.ModelConfig.preset("tiny-encoder", vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64,
                                              n_encoder_layers=2, max_seq_len=64)).eval()


PROMPT = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
SOURCE = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])


# --------------------------------------------------------------------------------------------------------------
# Every weight through its module.
# --------------------------------------------------------------------------------------------------------------

# Where a layer's .weight may be read: initialisation, loading and saving, the W_Q..W_O views, the tie itself.
WEIGHT_READS_ALLOWED = {
    ("models.py", "_make_lm_head"),  # lm_head shares the embedding's Parameter (tie_embeddings)
    ("models.py", "init_weights"),
    ("models.py", "_tied_output_is_not_missing"),  # re-tie after load_state_dict(assign=True)
    ("attention.py", "_plain_weight"),  # the W_Q..W_O views
    ("positions.py", "table"),  # the learned position table, for pictures
}


def _weight_reads(root: Path) -> list[tuple[str, str, int]]:
    """(file, enclosing function, line) of every ``<something other than self>.weight`` read in the package."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]:
            for node in ast.walk(function):
                if (isinstance(node, ast.Attribute) and node.attr == "weight" and isinstance(node.ctx, ast.Load)
                        and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
                    found.append((str(path.relative_to(root)), function.name, node.lineno))
    return found


def test_no_forward_reads_a_layers_weight_around_its_module() -> None:
    root = Path(qkv.__file__).parent
    formula_files = {"models.py", "attention.py", "blocks.py", "positions.py", "decode_state.py"}
    reads = [r for r in _weight_reads(root) if r[0] in formula_files]
    outside = [r for r in reads if (r[0], r[1]) not in WEIGHT_READS_ALLOWED]
    assert not outside, f"weights read around their module: {outside}"
    assert not [name for _, name in WEIGHT_READS_ALLOWED if name in ("forward", "logits") or "project" in name]
    # and the scan sees what it looks for: the views read a weight (the allow-list is not empty by accident)
    assert ("attention.py", "_plain_weight") in {(f, n) for f, n, _ in reads}


def test_the_output_layer_is_a_module_sharing_the_embedding_when_tied() -> None:
    tied, untied = decoder(tie=True), decoder(tie=False)
    assert isinstance(tied.lm_head, nn.Linear) and tied.lm_head.weight is tied.embed.token.weight
    assert untied.lm_head.weight is not untied.embed.token.weight
    # a tied checkpoint holds the matrix once, and loads back tied
    state = tied.state_dict()
    assert "lm_head.weight" not in state and "embed.token.weight" in state
    again = decoder(tie=True, seed=1)
    again.load_state_dict(state)
    assert again.lm_head.weight is again.embed.token.weight
    torch.testing.assert_close(again(PROMPT), tied(PROMPT), atol=0, rtol=0)
    with torch.device("meta"):
        shell = qkv.DecoderLM(tied.config)
    shell.load_state_dict(state, assign=True)  # the Hugging Face loaders' way: new Parameters, tied again
    assert shell.lm_head.weight is shell.embed.token.weight


@pytest.mark.parametrize("layout", ["qkv", "q_kv", "q_k_v"])
def test_every_projection_layout_computes_the_same_attention(layout: str) -> None:
    torch.manual_seed(0)
    reference = MultiHeadAttention(32, 4, n_kv_heads=2)
    other = MultiHeadAttention(32, 4, n_kv_heads=2, layout=layout)
    other.load_state_dict(reference.state_dict())  # regrouped by name: the same rows
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    for args in ((x,), (x, context)):
        torch.testing.assert_close(other(*args)[0], reference(*args)[0], atol=1e-6, rtol=0)
    for view in ("W_Q", "W_K", "W_V", "W_O"):
        assert torch.equal(getattr(other, view), getattr(reference, view))
    reference.set_layout(layout)  # in place, the same function
    torch.testing.assert_close(reference(x, context)[0], other(x, context)[0], atol=0, rtol=0)


def test_a_model_with_split_projections_equals_the_fused_one_and_loads_its_checkpoint() -> None:
    fused, split = decoder("rope"), decoder("rope", fused=False, seed=1)
    split.load_state_dict(fused.state_dict())
    assert {"layers.layers.0.self_attn.q.weight", "layers.layers.0.self_attn.v.weight"} <= set(split.state_dict())
    torch.testing.assert_close(split(PROMPT), fused(PROMPT), atol=1e-6, rtol=0)
    translation, translation_split = seq2seq(), seq2seq(fused=False, seed=1)
    assert hasattr(translation.decoder.layers[0].cross_attn, "kv")  # W_Q and [W_K | W_V]: each on its own input
    translation_split.load_state_dict(translation.state_dict())
    torch.testing.assert_close(translation_split(SOURCE, PROMPT), translation(SOURCE, PROMPT), atol=1e-6, rtol=0)


def test_a_view_of_a_projection_that_is_not_a_plain_linear_says_so() -> None:
    attention = MultiHeadAttention(32, 4)
    attention.out = Int8Linear(attention.out)
    with pytest.raises(ValueError, match="W_O is a view of a plain nn.Linear.*merge the adapter"):
        _ = attention.W_O


# --------------------------------------------------------------------------------------------------------------
# peft's LoRA on any linear layer: the adapted model equals its own merge.
# --------------------------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _linear_names(model: nn.Module, *, skip_tied_output: bool) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.embed.token.weight
    return [n for n in names if not (skip_tied_output and tied and n == "lm_head")]


def _adapt(model: nn.Module, targets: list[str]):
    # init_lora_weights=False: B is random too, so the adapter changes the output from the first step
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _outputs(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        if kind == "encoder":
            return {"hidden": model(PROMPT, PROMPT != 0)}
        if kind == "seq2seq":
            return {"logits": model(SOURCE, PROMPT, SOURCE != 0),
                    "greedy": torch.tensor(generate_seq2seq(model, SOURCE, SOURCE != 0, max_new_tokens=8)),
                    "beam": torch.tensor(generate_seq2seq(model, SOURCE, SOURCE != 0, num_beams=3,
                                                          max_new_tokens=8))}
        return {"logits": model(PROMPT),
                "greedy": generate(model, PROMPT, 12, temperature=0, stop_token_ids=()),
                "beam": beam_search(model, PROMPT, 8, num_beams=3, stop_token_ids=())}


@pytest.mark.parametrize("kind", ["decoder-tied", "decoder-untied", "encoder", "seq2seq"])
def test_lora_on_every_linear_layer_changes_the_model_and_equals_its_merge(kind: str) -> None:
    model = {"decoder-tied": lambda: decoder(tie=True), "decoder-untied": lambda: decoder(tie=False),
             "encoder": encoder, "seq2seq": seq2seq}[kind]()
    base = _outputs(model, kind.split("-")[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # A tied output layer is the embedding itself: merging an adapter into it would change the input side too
    # (peft#2018), so it is left out here; an untied one is adapted like every other layer.
    targets = _linear_names(model, skip_tied_output=True)
    assert ("lm_head" in targets) == (kind == "decoder-untied")
    adapted_model = _adapt(model, targets)
    adapted = _outputs(adapted_model.get_base_model(), kind.split("-")[0])
    first = next(iter(adapted))
    assert (adapted[first] - base[first]).abs().max() > 1e-3  # the adapter is not silently ignored
    merged = _outputs(adapted_model.merge_and_unload(), kind.split("-")[0])
    for name in adapted:
        if adapted[name].is_floating_point():
            torch.testing.assert_close(merged[name], adapted[name], atol=1e-5, rtol=0, msg=name)
        else:  # token ids: the adapted and the merged model choose the same tokens, through the cache and beams
            assert torch.equal(merged[name], adapted[name]), name
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # merged into the base


def test_lora_on_queries_and_values_only_goes_through_the_split_projections() -> None:
    model = decoder("rope", fused=False)
    adapted_model = _adapt(model, ["self_attn.q", "self_attn.v"])  # the LoRA paper's choice, by module name
    adapted_names = {n for n, m in adapted_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert adapted_names and all(n.endswith(("self_attn.q", "self_attn.v")) for n in adapted_names)
    adapted = _outputs(adapted_model.get_base_model(), "decoder")
    merged = _outputs(adapted_model.merge_and_unload(), "decoder")
    torch.testing.assert_close(merged["logits"], adapted["logits"], atol=1e-5, rtol=0)
    assert torch.equal(merged["greedy"], adapted["greedy"])


# --------------------------------------------------------------------------------------------------------------
# A weight-only int8 layer with no .weight stands in for every nn.Linear.
# --------------------------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """y = x (q · s)^T + b: int8 weights q with one scale s per output channel, and no ``weight`` attribute."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _swap_linears(model: nn.Module) -> nn.Module:
    """Every nn.Linear (the tied output layer included: an inference copy) → Int8Linear, in place."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child))
    return model


def _dequantized_twin(quantized: nn.Module, original: nn.Module) -> nn.Module:
    """The float model whose linear layers hold exactly the int8 layers' dequantized weights."""
    import copy

    twin = copy.deepcopy(original)
    layers = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            if type(module) is nn.Linear:
                if name == "lm_head" and module.weight is twin.embed.token.weight:  # untie: the copy is quantized
                    twin.lm_head = module = nn.Linear(module.in_features, module.out_features, bias=False)
                module.weight.copy_(layers[name].dequantized())
    return twin


@pytest.mark.parametrize("kind", ["decoder", "seq2seq"])
def test_an_int8_layer_without_weight_runs_every_path_within_its_quantization_error(kind: str) -> None:
    import copy

    original = decoder("rope") if kind == "decoder" else seq2seq()
    quantized = _swap_linears(copy.deepcopy(original))
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    twin = _dequantized_twin(quantized, original)
    outputs, reference, floats = _outputs(quantized, kind), _outputs(twin, kind), _outputs(original, kind)
    for name in outputs:  # the int8 model computes exactly what its dequantized weights say
        if outputs[name].is_floating_point():
            torch.testing.assert_close(outputs[name], reference[name], atol=1e-5, rtol=0)
            error = (outputs[name] - floats[name]).abs().max()
            assert 0 < error < 0.05, error  # and differs from the float model by its rounding only
        else:
            assert torch.equal(outputs[name], reference[name]), name
    with torch.inference_mode():  # the cache takes the activations' dtype (no weight to ask)
        state = quantized.new_decode_state(2, 8)
        if kind == "decoder":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                quantized(PROMPT, decode_state=state)
            assert state.caches[0].keys.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------------------
# A decoding step with one shape: torch.compile traces it once.
# --------------------------------------------------------------------------------------------------------------


def _decode(model, steps: int, step_fn, mask=None) -> list[torch.Tensor]:
    """Greedy decoding through ``step_fn(ids, mask)`` → the logits of every call."""
    logits = [step_fn(PROMPT, mask)]
    for _ in range(steps):
        logits.append(step_fn(logits[-1].argmax(-1, keepdim=True), None))
    return logits


def _compiled_and_eager(make_model, steps: int, mask=None, *, backend: str = "eager"):
    torch._dynamo.reset()
    counters.clear()
    model = make_model()
    states = [model.new_decode_state(2, PROMPT.shape[1] + steps) for _ in range(2)]

    def step(ids, mask=None):
        return model(ids, mask, decode_state=states[0])[:, -1]

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    with torch.inference_mode():
        got = _decode(model, steps, compiled, mask)
        want = _decode(model, steps, lambda ids, m: model(ids, m, decode_state=states[1])[:, -1], mask)
    return got, want, counters["stats"]["unique_graphs"]


LEFT_PADDED = torch.tensor([[True] * 5, [False, False, True, True, True]])


@pytest.mark.parametrize("case", [*POSITIONALS, "past-the-context"])
def test_a_compiled_decoding_step_traces_one_graph_for_the_prompt_and_one_for_every_step(case: str) -> None:
    positional = case if case in POSITIONALS else "rope"
    max_seq_len = 24 if case == "past-the-context" else 96  # 64 steps: the ring wraps about three times
    mask = None if case in ("none", "past-the-context") else LEFT_PADDED  # a left-padded batch, and one without
    got, want, graphs = _compiled_and_eager(lambda: decoder(positional, max_seq_len=max_seq_len), 64, mask)
    assert graphs <= 2, graphs
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_compiled_encoder_decoder_step_traces_at_most_two_graphs() -> None:
    torch._dynamo.reset()
    counters.clear()
    model = seq2seq()
    with torch.inference_mode():
        memory = model.encode(SOURCE, SOURCE != 0)
        outs = {}
        for how in ("compiled", "eager"):
            state = model.new_decode_state(2, 40)

            def step(ids, memory=None, state=state):
                return model.decode(ids, memory, SOURCE != 0, decode_state=state)[:, -1]

            fn = torch.compile(step, fullgraph=True, backend="eager") if how == "compiled" else step
            logits = [fn(torch.ones(2, 1, dtype=torch.long), memory)]
            for _ in range(39):
                logits.append(fn(logits[-1].argmax(-1, keepdim=True)))
            outs[how] = torch.stack(logits)
    assert counters["stats"]["unique_graphs"] <= 2
    torch.testing.assert_close(outs["compiled"], outs["eager"], atol=1e-5, rtol=0)


def test_a_compiled_step_refuses_a_window_it_would_have_to_re_encode() -> None:
    torch._dynamo.reset()
    model = decoder("sinusoidal", max_seq_len=16)
    state = model.new_decode_state(2, 40)  # past the context: absolute positions re-encode their window
    compiled = torch.compile(lambda ids: model(ids, decode_state=state), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="cannot re-encode the window.*decode it eagerly"):
        compiled(PROMPT)


# --------------------------------------------------------------------------------------------------------------
# One eval-mode helper: whatever runs a model for inference gives each module back its own training flag.
# --------------------------------------------------------------------------------------------------------------


def test_inference_paths_give_each_module_back_its_training_flag() -> None:
    from qkv.interop.bert import embed_texts
    from qkv.tokenizers import Tokenizer
    from qkv.training import OBJECTIVES, TrainConfig, mean_loss
    from qkv.training.objectives import MASK_TOKEN

    tokenizer = Tokenizer.char("abcdefgh ", special_tokens=[MASK_TOKEN])
    model = encoder().train()
    model.layers.layers[0].eval()  # a part kept in eval mode on purpose (a frozen layer)
    flags = {name: m.training for name, m in model.named_modules()}
    embed_texts(model, tokenizer, ["abc", "de f"])  # was: left the whole model in eval mode
    assert {name: m.training for name, m in model.named_modules()} == flags
    mean_loss(model, OBJECTIVES["encoder"](tokenizer, TrainConfig()), [torch.randint(1, 9, (2, 8))])
    assert {name: m.training for name, m in model.named_modules()} == flags  # was: layer 0 back in training
