"""A model inside a wrapper (peft's PeftModel, torch.compile's OptimizedModule, DDP) generates, draws, explains,
embeds, translates and saves as the qkv model inside it does: ``qkv.models.unwrap`` finds that model, and a
decoder-only model runs through the wrapper it was given (compiled, or with the wrapper's hooks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import qkv
from qkv import ModelConfig, build_model
from qkv.checkpoint import save_checkpoint
from qkv.data import left_pad
from qkv.explain import explain_head
from qkv.generation import beam_search, generate, generate_seq2seq, generate_text, stream, stream_text
from qkv.interop import embed_texts, save_gpt2
from qkv.recipes.translation import translate
from qkv.tokenizers import Tokenizer
from qkv.viz.maps import attention_maps

peft = pytest.importorskip("peft", reason="the finetune extra (pip install 'qkv[finetune]')")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the cat sat on the mat"
TOKENIZER = Tokenizer.char(TEXT + "abxyz", ["<pad>", "<bos>", "<eos>"])
SMALL = {"vocab_size": TOKENIZER.vocab_size, "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 48}
ROLES = {"pad_token_id": TOKENIZER.pad_id, "bos_token_id": TOKENIZER.bos_id, "eos_token_id": TOKENIZER.eos_id}
# Layers whose adapters reach the output on every model shape (cross-attention's keys and values come from a
# slice of its fused projection's weight, so its qkv layer is left out).
TARGETS = r".*\.(self_attn\.(qkv|out)|cross_attn\.out|ffn\.w1|ffn\.w2)"


def decoder():
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("tiny-decoder", **SMALL)).eval()


def seq2seq():
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("tiny-seq2seq", **SMALL, **ROLES)).eval()


def adapted(model):
    """(the model wrapped by peft with LoRA adapters, a copy with the adapters merged into its weights). The
    adapters start with random B (init_lora_weights=False), so they change the output."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    return wrapped, copy.deepcopy(wrapped).merge_and_unload().eval()


def test_a_peft_model_generates_what_its_merged_copy_generates():
    """generate (greedy, sampling, without the cache), beam_search, stream, generate_text and stream_text on a
    PeftModel: token for token what the merged model gives, and not what the model without adapters gives."""
    base = decoder()
    wrapped, merged = adapted(base)
    ids, mask = left_pad([[5, 6, 7], [8, 9]], pad_id=0)
    greedy = generate(wrapped, ids, 10, temperature=0, attention_mask=mask)
    assert torch.equal(greedy, generate(merged, ids, 10, temperature=0, attention_mask=mask))
    assert not torch.equal(greedy, generate(base, ids, 10, temperature=0, attention_mask=mask))
    for options in ({"temperature": 1.0, "seed": 3}, {"temperature": 0, "use_cache": False}):
        assert torch.equal(generate(wrapped, ids, 6, attention_mask=mask, **options),
                           generate(merged, ids, 6, attention_mask=mask, **options))
    assert torch.equal(beam_search(wrapped, ids, 8, num_beams=3, attention_mask=mask),
                       beam_search(merged, ids, 8, num_beams=3, attention_mask=mask))
    streamed = torch.stack(list(stream(wrapped, ids, 10, temperature=0, attention_mask=mask)), 1)
    assert torch.equal(streamed, greedy[:, ids.shape[1]:])
    texts = generate_text(wrapped, TOKENIZER, ["the", "a cat"], 8, temperature=0)
    assert texts == generate_text(merged, TOKENIZER, ["the", "a cat"], 8, temperature=0)
    assert "".join(stream_text(wrapped, TOKENIZER, "the", 8, temperature=0)) == texts[0]


def test_a_peft_encoder_decoder_translates_as_its_merged_copy():
    """generate_seq2seq (greedy and beam search), translate and the attention maps of all three kinds on a
    PeftModel around a Transformer."""
    base = seq2seq()
    wrapped, merged = adapted(base)
    sources = [[5, 6, 7, 8], [9, 10]]
    greedy = generate_seq2seq(wrapped, sources, max_new_tokens=10)
    assert greedy == generate_seq2seq(merged, sources, max_new_tokens=10)
    assert greedy != generate_seq2seq(base, sources, max_new_tokens=10)
    assert generate_seq2seq(wrapped, sources, num_beams=3, max_new_tokens=10) == \
        generate_seq2seq(merged, sources, num_beams=3, max_new_tokens=10)
    assert translate(wrapped, TOKENIZER, ["the cat", "a mat"], beam=1) == \
        translate(merged, TOKENIZER, ["the cat", "a mat"], beam=1)
    maps = attention_maps(wrapped, TOKENIZER, TEXT, target="a cat")
    assert maps.kinds == ["encoder", "decoder_self", "cross"]
    for kind, found in attention_maps(merged, TOKENIZER, TEXT, target="a cat").maps.items():
        torch.testing.assert_close(maps.maps[kind], found, rtol=0, atol=1e-5)


def test_a_compiled_model_runs_compiled_and_generates_what_the_plain_model_generates():
    """torch.compile's OptimizedModule: the decoding steps go through the compiled forward (the backend sees
    graphs), the tokens are the plain model's, and the wrapper's training flag comes back. (An encoder-decoder's
    encode/decode are methods no wrapper routes: they run as the model inside.)"""
    graphs = []

    def backend(graph, example_inputs):  # TorchDynamo's eager backend, counting the graphs it is handed
        graphs.append(graph)
        return graph.forward

    model, s2s = decoder(), seq2seq()
    compiled = torch.compile(model, backend=backend).train()
    ids = torch.tensor([[5, 6, 7]])
    out = generate(compiled, ids, 3, temperature=0)
    assert graphs and compiled.training
    assert torch.equal(out, generate(model.eval(), ids, 3, temperature=0))
    assert generate_seq2seq(torch.compile(s2s, backend=backend), [[5, 6, 7]], max_new_tokens=6) == \
        generate_seq2seq(s2s, [[5, 6, 7]], max_new_tokens=6)


@pytest.fixture
def one_process_group():
    """A gloo process group of one process, in this process (what DDP needs to wrap a model)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_ddp_model_generates_and_saves_as_the_model_inside(one_process_group, tmp_path):
    model, s2s = decoder(), seq2seq()
    ids = torch.tensor([[5, 6, 7]])
    wrapped = DistributedDataParallel(model)
    assert torch.equal(generate(wrapped, ids, 6, temperature=0), generate(model, ids, 6, temperature=0))
    assert torch.equal(beam_search(wrapped, ids, 4, num_beams=2), beam_search(model, ids, 4, num_beams=2))
    assert generate_seq2seq(DistributedDataParallel(s2s), [[5, 6, 7]], max_new_tokens=6) == \
        generate_seq2seq(s2s, [[5, 6, 7]], max_new_tokens=6)
    loaded, _ = qkv.load(save_checkpoint(tmp_path / "ddp", wrapped, TOKENIZER))  # no "module." prefix
    assert torch.equal(loaded(ids), model(ids))


def test_saving_a_compiled_model_writes_the_model_inside_and_a_peft_model_is_refused(tmp_path):
    """A compiled model is saved under the qkv model's own tensor names (its state dict says _orig_mod.*); a
    PeftModel is refused in one line naming merge_and_unload(), with nothing written, and its merged copy saves
    and loads to the adapted logits."""
    model = decoder()
    ids = torch.tensor([[5, 6, 7]])
    loaded, _ = qkv.load(save_checkpoint(tmp_path / "compiled", torch.compile(model, backend="eager"), TOKENIZER))
    assert torch.equal(loaded(ids), model(ids))
    wrapped, merged = adapted(model)
    with pytest.raises(ValueError, match=r"carries peft adapters .*save_checkpoint\(DIR, model\.merge_and_unload\(\), "
                                         r"tokenizer\), or keep the adapters alone with peft's model\.save_pretrained"):
        save_checkpoint(tmp_path / "adapted", wrapped, TOKENIZER)
    assert not (tmp_path / "adapted").exists()
    with pytest.raises(ValueError, match=r"save_gpt2\(model\.merge_and_unload\(\), DIR\)"):
        save_gpt2(wrapped, tmp_path / "adapted-gpt2")
    loaded, _ = qkv.load(save_checkpoint(tmp_path / "merged", merged, TOKENIZER))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), wrapped(ids), rtol=0, atol=1e-5)


def test_attention_maps_explanations_and_embeddings_see_through_a_wrapper():
    """attention_maps, explain_head and embed_texts on a PeftModel give the merged model's numbers."""
    wrapped, merged = adapted(decoder())
    maps = attention_maps(wrapped, TOKENIZER, TEXT)
    assert maps.model_type == "decoder"
    torch.testing.assert_close(maps.maps["decoder_self"], attention_maps(merged, TOKENIZER, TEXT).maps["decoder_self"],
                               rtol=0, atol=1e-5)
    found = explain_head(wrapped, TOKENIZER, TEXT, layer=1, head=1, token=4)
    assert found.matches_model
    torch.testing.assert_close(found.weights, explain_head(merged, TOKENIZER, TEXT, layer=1, head=1, token=4).weights,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(embed_texts(wrapped, TOKENIZER, [TEXT, "a cat"]),
                               embed_texts(merged, TOKENIZER, [TEXT, "a cat"]), rtol=0, atol=1e-5)


def test_generation_gives_each_module_its_training_flag_back_and_the_caller_stays_out_of_inference_mode():
    """One helper (qkv.generation.prompt.evaluating) puts the model in eval mode for a call and gives every module
    back its own flag (a part kept in eval mode inside a training model stays so); a stream holds it across its
    yields, while inference mode is entered only around each step, never left on in the code that drives it."""
    model = decoder().train()
    model.embed.eval()  # e.g. a frozen part of a model being fine-tuned
    before = {name: m.training for name, m in model.named_modules()}
    tokens = stream(model, torch.tensor([[5, 6]]), 4, temperature=0)
    next(tokens)
    assert not model.training and not torch.is_inference_mode_enabled()
    list(tokens)
    assert {name: m.training for name, m in model.named_modules()} == before
    beam_search(model, torch.tensor([[5, 6]]), 3, num_beams=2)
    assert {name: m.training for name, m in model.named_modules()} == before
