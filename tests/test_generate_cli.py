"""``qkv generate`` end to end on a saved checkpoint, the text helpers, stop strings, and the benchmark's quick mode."""

from __future__ import annotations

import copy
import io
import re
import sys

import pytest
import torch

from qkv import DecoderLM, ModelConfig
from qkv.checkpoint import save_checkpoint
from qkv.cli import main
from qkv.generate import generate, generate_text, stream_text
from qkv.loading import load
from qkv.tokenizers import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. "


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A tiny character model fitted for a few steps to one sentence, so greedy text is that sentence's pattern."""
    tokenizer = Tokenizer.char(TEXT)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, d_ff=64,
                                  n_decoder_layers=1, max_seq_len=96))
    ids = torch.tensor([tokenizer.encode(TEXT * 2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def test_stream_text_pieces_join_to_generate_text(trained):
    model, tokenizer = trained
    whole = generate_text(model, tokenizer, "the q", 30, temperature=0)
    pieces = list(stream_text(model, tokenizer, "the q", 30, temperature=0))
    assert len(pieces) > 1 and "".join(pieces) == whole
    ids = torch.tensor([tokenizer.encode("the q")])
    assert whole == tokenizer.decode(generate(model, ids, 30, temperature=0)[0, 5:].tolist())


def test_stop_strings_cut_the_text_and_stop_generating(trained):
    model, tokenizer = trained
    free = generate_text(model, tokenizer, "the q", 40, temperature=0)
    stop = free[6:8]  # two characters that occur in the free-running text
    cut = free.index(stop)
    assert generate_text(model, tokenizer, "the q", 40, temperature=0, stop_strings=[stop]) == free[:cut]
    assert "".join(stream_text(model, tokenizer, "the q", 40, temperature=0, stop_strings=[stop])) == free[:cut]
    ids = torch.tensor([tokenizer.encode("the q")])
    stopped = generate(model, ids, 40, temperature=0, stop_strings=[stop], tokenizer=tokenizer)
    assert stopped.shape[1] == 5 + cut + len(stop)  # the token that completed the stop string is the last one


def test_batched_text_equals_one_by_one(trained):
    model, tokenizer = trained
    prompts = ["the quick brown", "a", "lazy do"]
    batched = generate_text(model, tokenizer, prompts, 20, temperature=0)
    assert batched == [generate_text(model, tokenizer, p, 20, temperature=0) for p in prompts]


def test_cli_streams_the_prompt_and_its_continuation(trained, tmp_path, capsys):
    model, tokenizer = trained
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    expected = "the q" + generate_text(model, tokenizer, "the q", 25, temperature=0)
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--greedy", "--max-new-tokens", "25",
                 "the q"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_cli_generates_with_bf16_weights(trained, tmp_path, capsys):
    """--dtype bf16: the CLI loads the model in bf16 and prints what it generates."""
    model, tokenizer = trained
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loaded, _ = load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    expected = "the q" + generate_text(copy.deepcopy(model).to(torch.bfloat16), tokenizer, "the q", 25, temperature=0)
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--greedy", "--max-new-tokens", "25",
                 "--dtype", "bf16", "the q"]) == 0
    out = capsys.readouterr().out
    assert out == expected + "\n"
    assert out.startswith("the q") and len(out) > len("the q") + 20


def test_cli_reads_prompts_from_stdin_and_seeds_sampling(trained, tmp_path, capsys, monkeypatch):
    model, tokenizer = trained
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("the\nlazy\n"))
    args = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--max-new-tokens", "15", "--seed", "3",
            "--top-k", "5", "--temperature", "1.2"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [p + generate_text(model, tokenizer, p, 15, temperature=1.2, top_k=5, seed=3) for p in ("the", "lazy")]
    assert lines == expected


@pytest.mark.parametrize("extra", [[], ["--num-beams", "2"]])
def test_cli_too_many_new_tokens_fails_in_one_line_before_any_output(trained, tmp_path, capsys, extra):
    """With --no-sliding-window (strict), a request past the context is refused before the prompt is echoed."""
    model, tokenizer = trained
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--max-new-tokens", "200", *extra,
                 "--no-sliding-window", "the q"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the prompt is not echoed before the refusal
    assert "--max-new-tokens 200" in captured.err and "max_seq_len=96" in captured.err
    assert "max_new_tokens" not in captured.err  # the command's flag, never the Python name
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_cli_prints_200_new_tokens_past_a_context_of_64(tmp_path, capsys, positional):
    """The demo's hint, `qkv generate --checkpoint runs/demo 'ROMEO:'`, on a model with max_seq_len 64: 200 new
    characters, each greedy choice the argmax over a window of the last 64 tokens; for learned positions that is
    the plain forward pass over those 64 tokens (computed here without any cache)."""
    tokenizer = Tokenizer.char(TEXT + "ROMEO:")
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, d_ff=64,
                                  n_decoder_layers=2, max_seq_len=64, positional=positional)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--greedy", "ROMEO:"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 200 + 1
    if positional == "learned":
        ids = tokenizer.encode("ROMEO:")
        with torch.no_grad():
            for _ in range(200):
                ids.append(int(model(torch.tensor([ids[-64:]]))[0, -1].argmax()))
        assert out == tokenizer.decode(ids) + "\n"


@pytest.mark.parametrize("option, value, words, python", [
    ("--top-p", "1.5", "--top-p 1.5 must lie in (0, 1]", "top_p=1.5 must lie in (0, 1]"),
    ("--temperature", "-1", "--temperature -1.0 must be >= 0", "temperature=-1.0 must be >= 0"),
    ("--top-k", "0", "--top-k 0 must be an integer >= 1, or without --top-k to keep every token",
     "top_k=0 must be an integer >= 1, or top_k=None to keep every token"),
    ("--max-new-tokens", "-1", "--max-new-tokens -1 must be an integer >= 0", "max_new_tokens=-1 must be"),
    ("--stop", "", "--stop '' must be non-empty strings", "stop_strings=('',) must be non-empty strings")])
def test_bad_options_are_named_by_their_flag_on_the_command_line_and_their_keyword_in_python(
        trained, tmp_path, capsys, option, value, words, python):
    model, tokenizer = trained
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), option, value, "the"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert "_" not in err.split(": error: ")[1], err  # no Python name: top_p, max_new_tokens, stop_strings
    keyword = {"--top-p": "top_p", "--temperature": "temperature", "--top-k": "top_k",
               "--max-new-tokens": "max_new_tokens", "--stop": "stop_strings"}[option]
    typed = float(value) if option in ("--top-p", "--temperature") else value if option == "--stop" else int(value)
    with pytest.raises(ValueError, match=re.escape(python)):
        generate_text(model, tokenizer, "the", **{"max_new_tokens": 5, keyword: [typed] if keyword == "stop_strings"
                                                  else typed})


def test_the_command_line_spells_library_options_as_the_flags_of_the_command_that_ran():
    """qkv.errors.OptionError names options; each command says them its own way (qkv.cli.flag_spelling)."""
    from qkv.cli import build_parser, flag_spelling
    from qkv.errors import OptionError

    def said(argv: list[str], template: str, **options) -> str:
        return OptionError(template, **options).spelled(flag_spelling(build_parser().parse_args(argv).cli_parser))

    generate_args = ["generate", "--checkpoint", "DIR", "p"]
    refused = "{n} positions do not fit; lower {max_new_tokens:name}, or slide a window ({sliding_window:True})"
    assert said(generate_args, refused, n=300, max_new_tokens=300) == \
        "n=300 positions do not fit; lower --max-new-tokens, or slide a window (without --no-sliding-window)"
    assert str(OptionError(refused, n=300)) == \
        "n=300 positions do not fit; lower max_new_tokens, or slide a window (sliding_window=True)"
    assert said(generate_args, "{sliding_window:False} refuses; {use_cache:False} recomputes") == \
        "--no-sliding-window refuses; --no-cache recomputes"
    assert said(generate_args, "{stop_strings} and {stop_token_ids}", stop_strings=("a b", "c"),
                stop_token_ids=(3,)) == "--stop 'a b' --stop c and --stop-id 3"
    assert said(generate_args, "no start token ({bos_token_id:...})") == \
        "no start token (bos_token_id in the checkpoint's config.json)"
    assert str(OptionError("no start token ({bos_token_id:...})")) == "no start token (bos_token_id=...)"
    translate_args = ["translate", "--checkpoint", "DIR"]
    assert said(translate_args, "{num_beams} and {length_penalty}", num_beams=0, length_penalty=-1.0) == \
        "--beam 0 and --alpha -1.0"
    assert said(["train", "--max-steps", "5"], "lower {warmup_steps}", warmup_steps=500) == \
        "lower --warmup-steps 500"
    assert said(["show", "attention", "--checkpoint", "DIR", "t"], "{layer} is out of range", layer=9) == \
        "--layer 9 is out of range"


def test_generation_benchmark_quick_mode_runs_and_prints(capsys):
    from qkv.bench.generation import format_generation_table, generation_benchmark

    rows = generation_benchmark(quick=True, threads=1, sections=("small", "cache"))
    table = format_generation_table(rows)
    head = next(r for r in rows if r["section"] == "vs Hugging Face")
    assert head["same_tokens"], "Hugging Face greedy on the same weights must give the same ids"
    assert all(r["same_tokens"] for r in rows if r["section"] == "KV cache")
    assert "qkv/HF" in table and "no cache tok/s" in table and "mean cost of tokens" in table
