"""Hugging Face LLaMA-style models in and out: qkv gives LlamaForCausalLM's logits and greedy tokens, and
LlamaForCausalLM reads what qkv saves.

The reference models are built from configs with random weights (no download), every parameter redrawn with
std 0.2 (RMSNorm gains around 1), so that a wrong RoPE base, RMSNorm epsilon, gate/up order or key/value head
grouping moves the logits far past the tolerance; the mutation checks prove that it does.
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ["HF_HUB_OFFLINE"] = "1"  # the reference models are built from configs: nothing may be downloaded

import pytest
import torch
import transformers

import qkv
from qkv.generate import generate
from qkv.interop import load_llama, save_llama
from qkv.interop.llama import config_from_llama
from qkv.loading import load
from qkv.tokenizers import Tokenizer

TOL = 1e-4  # fp32 logits
STD = 0.2
VOCAB = 97
# A small LLaMA that sets every option away from its default: grouped-query attention (4 query heads share 2
# key/value heads), an unusual RoPE base and RMSNorm epsilon, d_ff not a multiple of d_model.
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-3,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def reference_llama(seed: int = 0, **changes) -> transformers.LlamaForCausalLM:
    """A LlamaForCausalLM with every parameter redrawn (RMSNorm gains around 1)."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, **changes}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, STD, generator=g)
    return model.eval()


def ids(seed: int = 0, batch: int = 3, seq: int = 24) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def with_config(model: qkv.DecoderLM, **changes) -> qkv.DecoderLM:
    """The same weights in a model built from a changed config (its position tables computed anew)."""
    other = qkv.DecoderLM(model.config.replace(**changes))
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.mark.parametrize("changes", [
    {},  # grouped-query attention, tied output projection
    {"num_key_value_heads": 4, "tie_word_embeddings": False},  # plain multi-head attention, untied
    {"num_key_value_heads": 1},  # multi-query attention
], ids=["gqa-tied", "mha-untied", "mqa"])
def test_llama_directory_gives_hugging_face_logits(tmp_path, changes):
    reference = reference_llama(**changes)
    reference.save_pretrained(tmp_path)
    model, tokenizer = load(tmp_path)
    assert isinstance(model, qkv.DecoderLM) and tokenizer is None  # no tokenizer.json in the directory
    c = model.config
    assert (c.norm, c.positional, c.activation, c.bias, c.rope_base, c.layer_norm_eps) == (
        "rmsnorm", "rope", "swiglu", False, 5000.0, 1e-3)
    assert (c.n_kv_heads or c.n_heads) == reference.config.num_key_value_heads
    assert model.num_parameters() == reference.num_parameters()
    x = ids()
    with torch.no_grad():
        assert max_diff(model(x), reference(x).logits) <= TOL


def test_rope_base_and_rms_epsilon_would_not_hide_under_the_tolerance(tmp_path):
    reference = reference_llama()
    reference.save_pretrained(tmp_path)
    model, _ = load_llama(tmp_path)
    x = ids()
    with torch.no_grad():
        expected = reference(x).logits
        assert max_diff(model(x), expected) <= TOL
        for changes in ({"rope_base": 10000.0}, {"layer_norm_eps": 1e-6}):
            assert max_diff(with_config(model, **changes)(x), expected) > 20 * TOL, changes


def test_greedy_generation_with_the_kv_cache_gives_hugging_faces_tokens(tmp_path):
    reference = reference_llama(seed=3)
    reference.save_pretrained(tmp_path)
    model, _ = load_llama(tmp_path)
    prompt = ids(seed=4, batch=1, seq=8)
    expected = reference.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate(model, prompt, 24, temperature=0, stop_token_ids=())
    assert ours.tolist() == expected.tolist()


def test_qkv_model_saved_as_llama_loads_in_hugging_face_with_equal_logits(tmp_path):
    config = config_from_llama({**SMALL, "tie_word_embeddings": False, "num_key_value_heads": 1})
    torch.manual_seed(0)
    model = qkv.DecoderLM(config).eval()
    tokenizer = Tokenizer.char("the cat sat on the mat, and the dog sat on the log.")
    save_llama(model, tmp_path, tokenizer)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["num_key_value_heads"] == 1
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = ids()
    with torch.no_grad():
        assert max_diff(model(x), reference(x).logits) <= TOL
    again, tokenizer_again = load(tmp_path)  # and back into qkv, with the tokenizer
    assert tokenizer_again.encode("the cat") == tokenizer.encode("the cat")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize(("changes", "message"), [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling 'linear' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling 'llama3'"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"head_dim": 32}, "head_dim=32 with 4 heads is not hidden_size=64"),
])
def test_options_qkv_does_not_compute_are_errors_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        config_from_llama({**SMALL, **changes})


def test_rope_theta_reads_from_either_spelling():
    assert config_from_llama({**SMALL, "rope_theta": 1e5}).rope_base == 1e5
    new_style = {k: v for k, v in SMALL.items() if k != "rope_theta"}
    assert config_from_llama({**new_style, "rope_parameters": {"rope_type": "default", "rope_theta": 2e5}}
                             ).rope_base == 2e5


def test_saving_a_model_llama_cannot_express_names_the_field(tmp_path):
    model = qkv.DecoderLM(qkv.ModelConfig.preset("tiny-decoder"))
    with pytest.raises(ValueError, match="cannot save as LLaMA: positional="):
        save_llama(model, tmp_path)


def test_a_weight_of_the_wrong_shape_is_named(tmp_path: pathlib.Path):
    reference_llama().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(ValueError, match="k_proj.weight' has shape \\(32, 64\\) but config.json implies \\(64, 64\\)"):
        load_llama(tmp_path)
