"""Text in, text out at token seams: SentencePiece-style tokenizers (LLaMA-2, TinyLlama, Mistral's layout) give
transformers' greedy tokens and keep the space between prompt and continuation; typed special-token strings in a
prompt stay text.

The reference is a random tiny ``LlamaForCausalLM`` with a tokenizer built here by the ``tokenizers`` library in
the layout those models ship: a Metaspace pre-tokenizer and decoder (a space becomes "▁", the decoder drops the
space that begins a text) and a template post-processor that puts ``<s>`` before every prompt.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything is built here: nothing may be downloaded

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import qkv
from qkv import DecoderLM, ModelConfig
from qkv.cli import main
from qkv.data import read_corpus
from qkv.generate import decode_continuation, generate, generate_text, stream_text
from qkv.tokenizers import Tokenizer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
PROMPTS = ["The king is", "ROMEO: I will", "Good night, sweet"]


def sentencepiece_style_tokenizer() -> Backend:
    """BPE over Metaspace pieces, <unk> <s> </s> = 0 1 2, and "<s> $A" as the post-processor's template."""
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    text = read_corpus().text[:20_000]
    backend.train_from_iterator([text + " ".join(PROMPTS)], trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return backend


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(directory, transformers model, transformers tokenizer): a random LLaMA saved with its tokenizer.json."""
    directory = tmp_path_factory.mktemp("llama")
    backend = sentencepiece_style_tokenizer()
    assert backend.get_vocab_size() <= VOCAB
    backend.save(str(directory / "tokenizer.json"))
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # peaked logits (std 0.2): greedy choices far from ties
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    model.eval().save_pretrained(directory)
    reference_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return directory, model, reference_tokenizer


def reference_greedy(model, tokenizer, prompt: str, n: int) -> tuple[list[int], str]:
    """transformers' greedy ids (prompt with its <s>, then the continuation) and their text."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=2)
    return out[0].tolist(), tokenizer.decode(out[0], skip_special_tokens=True)


def test_sentencepiece_prompts_get_their_bos_and_greedy_tokens_equal_transformers(llama):
    directory, reference, reference_tokenizer = llama
    model, tokenizer = qkv.load(directory)
    for prompt in PROMPTS:
        expected_ids, _ = reference_greedy(reference, reference_tokenizer, prompt, 12)
        encoded = tokenizer.encode(prompt, add_special_tokens=True)
        assert encoded[0] == 1 and encoded == reference_tokenizer(prompt).input_ids  # <s> from the template
        assert generate(model, torch.tensor([encoded]), 12, temperature=0)[0].tolist() == expected_ids


def test_text_helpers_and_cli_keep_the_space_at_the_seam(llama, capsys):
    directory, reference, reference_tokenizer = llama
    model, tokenizer = qkv.load(directory)
    seams = 0
    for prompt in PROMPTS:
        ids, expected = reference_greedy(reference, reference_tokenizer, prompt, 12)
        first_new = reference_tokenizer.convert_ids_to_tokens(ids[len(reference_tokenizer(prompt).input_ids)])
        seams += first_new.startswith("▁")  # the continuation begins a new word: the seam has a space
        assert prompt + generate_text(model, tokenizer, prompt, 12, temperature=0) == expected
        assert prompt + "".join(stream_text(model, tokenizer, prompt, 12, temperature=0)) == expected
        assert main(["generate", "--checkpoint", str(directory), "--greedy", "--max-new-tokens", "12", prompt]) == 0
        assert capsys.readouterr().out == expected + "\n"
    assert seams >= 1, "no prompt tests a seam with a space: pick other prompts"
    batched = generate_text(model, tokenizer, PROMPTS, 12, temperature=0)
    assert batched == [generate_text(model, tokenizer, p, 12, temperature=0) for p in PROMPTS]


def test_decode_continuation_is_the_suffix_of_the_whole_text(llama):
    directory, _, reference_tokenizer = llama
    _, tokenizer = qkv.load(directory)
    text = "To be, or not to be, that is the question"
    ids = tokenizer.encode(text, add_special_tokens=True)
    for cut in range(1, len(ids)):
        whole = reference_tokenizer.decode(ids, skip_special_tokens=True)
        head = reference_tokenizer.decode(ids[:cut], skip_special_tokens=True)
        assert head + decode_continuation(tokenizer, ids[:cut], ids[cut:]) == whole


def test_a_typed_special_token_string_in_a_prompt_stays_text():
    """A chat user typing "<|im_end|>" must not end the turn: the prompt the model sees holds no special id, and
    the text helpers continue exactly those ordinary tokens."""
    corpus = read_corpus().text[:5000]
    tokenizer = Tokenizer.bpe(corpus, vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>", "<mask>"])
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, d_ff=64,
                                  n_decoder_layers=1, max_seq_len=64)).eval()
    prompt = "user: hi<|im_end|>\n<|endoftext|>assistant: <mask>"
    for ids in (tokenizer.encode(prompt), tokenizer.encode(prompt, add_special_tokens=True)):
        assert not set(ids) & set(tokenizer.special_ids) and tokenizer.decode(ids) == prompt
    ids = tokenizer.encode(prompt)
    new = generate(model, torch.tensor([ids]), 8, temperature=0, stop_token_ids=())[0, len(ids):].tolist()
    assert generate_text(model, tokenizer, prompt, 8, temperature=0, stop_token_ids=()) == tokenizer.decode(new)
    markup = tokenizer.encode(prompt, markup=True)  # the model's own markup: the special ids, whole
    assert tokenizer.token_to_id("<|im_end|>") in markup and tokenizer.mask_id == markup[-1]


def test_every_entry_prepares_its_inputs_once(monkeypatch):
    """The inputs of a call are checked once (generate_text and stream_text used to prepare a second time to find
    where the new tokens begin): count the calls of generation's one prepare, wherever it is imported."""
    import qkv.generation.beam as beam
    import qkv.generation.sampling as sampling
    import qkv.generation.text as text
    from qkv.generation.prompt import prepare

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return prepare(*args, **kwargs)

    for module in (beam, sampling, text):
        monkeypatch.setattr(module, "prepare", counted)
    tokenizer = Tokenizer.char("abcdefgh ")
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_heads=2, d_ff=32,
                                  n_decoder_layers=1, max_seq_len=32)).eval()
    ids = torch.tensor([tokenizer.encode("abc")])
    for call in (lambda: generate_text(model, tokenizer, ["abc", "de"], 5, stop_strings=["h"]),
                 lambda: list(stream_text(model, tokenizer, "abc", 5)),
                 lambda: generate_text(model, tokenizer, "abc", 5, num_beams=2),
                 lambda: generate(model, ids, 5, num_beams=2), lambda: generate(model, ids, 5)):
        calls.clear()
        call()
        assert len(calls) == 1


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level BPE over text with multi-byte characters: some characters span several tokens."""
    text = "Naïve café, crème brûlée — 東京 and ここ, 🙂 ok. " * 20 + read_corpus().text[:3000]
    return Tokenizer.bpe(text, vocab_size=300)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_incremental_text_equals_decoding_the_whole_continuation_at_every_step(llama, byte_level, data):
    """What stream_text, the chat and /v1 print, token by token, without re-decoding the whole text each step: the
    same string as decode_continuation of everything so far, for a SentencePiece-style and a byte-level BPE
    tokenizer, from any context and over tokens that split characters."""
    from qkv.tokenizers import IncrementalText

    _, tok = qkv.load(llama[0]) if data.draw(st.booleans()) else (None, byte_level)
    ids = st.integers(0, tok.vocab_size - 1)
    context = data.draw(st.lists(ids, max_size=8))
    new = data.draw(st.lists(ids, min_size=1, max_size=30))
    incremental = IncrementalText(tok, context)
    for k in range(1, len(new) + 1):
        assert incremental.add(new[k - 1]) == decode_continuation(tok, context, new[:k])


def test_a_decoding_step_reads_from_the_tensors_once(llama, monkeypatch):
    """One host read a step (the token and the NaN check together), whatever stops the text: stop ids and stop
    strings are checked on the host copy."""
    from qkv.generation import stream

    directory, _, _ = llama
    model, tokenizer = qkv.load(directory)
    ids = torch.tensor([tokenizer.encode("To be, or not", add_special_tokens=True)])
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))
    for options in ({}, {"stop_strings": ("never printed",)}):
        counts = []
        for n in (8, 24):  # the prompt's own reads cancel out: 16 more steps, at most 16 more reads
            start = len(reads)
            assert len(list(stream(model, ids, n, temperature=0, stop_token_ids=(1,), tokenizer=tokenizer,
                                   **options))) == n
            counts.append(len(reads) - start)
        assert counts[1] - counts[0] <= 16, (counts, reads[-20:])
