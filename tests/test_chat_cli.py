"""``qkv chat``: piped lines answered in turn with the whole history in the model's chat template, /reset and
/system, the oldest turns dropped (with a note) when the history outgrows the context.

In-process, over tiny qkv checkpoints written here (a 2-layer random decoder with a byte-level BPE, with and without
a ChatML template). Each expected reply is a fresh greedy recompute (no cache) of the conversation it answers.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from qkv import ModelConfig
from qkv.chat_template import ChatTemplate
from qkv.checkpoint import save_checkpoint
from qkv.cli import main
from qkv.generation import generate
from qkv.generation.stopping import until_stop_token
from qkv.models import DecoderLM
from qkv.tokenizers import Tokenizer, TokenRoles, decode_continuation

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("You are a helpful assistant. What is two and two? It is four, of course. Tell me a story about a cat "
        "who sat on a mat, then say goodbye. The end.\n") * 4
NEW = 8  # --max-new-tokens


def write(directory: Path, template: str | None) -> tuple[Path, DecoderLM, Tokenizer]:
    tok = Tokenizer.bpe(TEXT, vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = tok.with_roles(TokenRoles.of(eos="<|im_end|>", chat_template=template))
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.preset("tiny-decoder", vocab_size=len(tok), max_seq_len=128, positional="rope",
                                         init_std=0.3)).eval()  # weights large enough that replies differ
    save_checkpoint(directory, model, tok)
    return directory, model, tok


@pytest.fixture(scope="module")
def chatml(tmp_path_factory) -> tuple[Path, DecoderLM, Tokenizer]:
    return write(tmp_path_factory.mktemp("chat") / "chatml", CHATML)


def chat(monkeypatch, capsys, checkpoint: Path, lines: list[str], *flags: str) -> tuple[int, str, str]:
    """``qkv chat`` with ``lines`` piped in (greedy unless ``flags`` name a temperature) → (status, stdout, stderr)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    greedy = [] if "--temperature" in flags else ["--greedy"]
    code = main(["chat", "--checkpoint", str(checkpoint), *greedy, "--max-new-tokens", str(NEW), *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def expected(model: DecoderLM, tok: Tokenizer, messages: list[dict[str, str]]) -> str:
    """The reply to ``messages``, recomputed from scratch: greedy, no cache, cut at the template's stop ids."""
    template = ChatTemplate(tok)
    ids = template.render(messages, add_generation_prompt=True).ids
    room = min(NEW, model.config.max_seq_len - len(ids) + 1)
    out = generate(model, torch.tensor([ids]), room, temperature=0, use_cache=False,
                   stop_token_ids=template.stop_ids)[0, len(ids):].tolist()
    return decode_continuation(tok, ids, until_stop_token(out, template.stop_ids)).rstrip("\ufffd")


def converse(model, tok, system: str | None, questions: list[str]) -> list[str]:
    messages = [{"role": "system", "content": system}] if system else []
    replies = []
    for q in questions:
        messages.append({"role": "user", "content": q})
        replies.append(expected(model, tok, messages))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def test_piped_lines_are_answered_in_turn_each_with_the_whole_history(monkeypatch, capsys, chatml):
    checkpoint, model, tok = chatml
    questions = ["What is two and two?", "Tell me a story.", "Say goodbye."]
    code, out, err = chat(monkeypatch, capsys, checkpoint, questions)
    assert (code, err) == (0, "")
    assert out == "".join(f"{r}\n" for r in converse(model, tok, None, questions))
    # Without the history, the third reply would be another text.
    assert converse(model, tok, None, questions)[2] != converse(model, tok, None, questions[2:])[0]


def test_reset_forgets_the_turns_and_system_sets_the_system_message(monkeypatch, capsys, chatml):
    checkpoint, model, tok = chatml
    lines = ["What is two and two?", "/system You are a cat.", "Tell me a story.", "/reset", "Tell me a story.",
             "/system", "/nonsense", "//reset", "/exit", "never read"]
    code, out, err = chat(monkeypatch, capsys, checkpoint, lines)
    first = converse(model, tok, None, ["What is two and two?"])[0]
    second = expected(model, tok, [{"role": "system", "content": "You are a cat."},
                                   {"role": "user", "content": "What is two and two?"},
                                   {"role": "assistant", "content": first},
                                   {"role": "user", "content": "Tell me a story."}])
    third = converse(model, tok, "You are a cat.", ["Tell me a story."])[0]
    fourth = expected(model, tok, [{"role": "user", "content": "Tell me a story."},
                                   {"role": "assistant", "content": third}, {"role": "user", "content": "/reset"}])
    assert code == 0
    assert out == f"{first}\n{second}\n{third}\n{fourth}\n"
    assert err.splitlines() == [
        "note: system message set; the conversation goes on",
        "note: the conversation starts again (the system message stays)",
        "note: system message removed; the conversation goes on",
        "note: unknown command /nonsense; the commands are /reset, /system TEXT, /exit (//text sends /text)"]


def test_the_oldest_turns_go_with_a_note_when_the_history_outgrows_the_context(monkeypatch, capsys, chatml):
    checkpoint, model, tok = chatml
    questions = [f"Question {i}: tell me a story about a cat who sat on a mat." for i in range(5)]
    code, out, err = chat(monkeypatch, capsys, checkpoint, questions, "--system", "Be brief.")
    assert code == 0
    notes = err.splitlines()
    assert notes and all(n == "note: the conversation outgrew the context (128 tokens): the oldest 1 turn left it, "
                                 "the system message stays" for n in notes)
    # Replay: each reply answers the system message and the most recent turns that fit beside room for a reply.
    template, system = ChatTemplate(tok), {"role": "system", "content": "Be brief."}
    history: list[dict[str, str]] = []
    replies = []
    for q in questions:
        history.append({"role": "user", "content": q})
        while len(template.render([system, *history], add_generation_prompt=True).ids) > 128 - NEW + 1:
            history = history[2:]
        replies.append(expected(model, tok, [system, *history]))
        history.append({"role": "assistant", "content": replies[-1]})
    assert out == "".join(f"{r}\n" for r in replies)
    assert len(notes) == len(questions) - len(history) // 2


def test_a_message_longer_than_the_context_is_one_line_and_the_chat_goes_on(monkeypatch, capsys, chatml):
    checkpoint, model, tok = chatml
    code, out, err = chat(monkeypatch, capsys, checkpoint, ["a cat " * 80, "Hi"])
    assert code == 2
    assert err.startswith("qkv chat: error: this message takes ") and err.endswith(
        " tokens and the context holds 128; shorten it\n")
    assert out == converse(model, tok, None, ["Hi"])[0] + "\n"


def test_a_model_without_a_template_chats_in_the_plain_format_with_a_note(monkeypatch, capsys, tmp_path):
    checkpoint, model, tok = write(tmp_path / "plain", None)
    code, out, err = chat(monkeypatch, capsys, checkpoint, ["Hi there"])
    assert code == 0 and err.splitlines() == [f"note: {ChatTemplate(tok).note}"]
    ids = ChatTemplate(tok).render([{"role": "user", "content": "Hi there"}], add_generation_prompt=True).ids
    assert tok.decode(ids) == "User: Hi there\n\nAssistant:"


def test_the_same_seed_gives_the_same_chat(monkeypatch, capsys, chatml):
    checkpoint = chatml[0]
    lines = ["What is two and two?", "Tell me a story."]
    runs = [chat(monkeypatch, capsys, checkpoint, lines, "--temperature", "1.0", "--seed", s)[1]
            for s in ("5", "5", "6")]
    assert runs[0] == runs[1] != runs[2]


def test_a_message_the_tokenizer_cannot_write_is_one_line_and_the_chat_goes_on(monkeypatch, capsys, tmp_path):
    tok = Tokenizer.char(TEXT + "User: Assistant: System: Hi")  # a character vocabulary with no "é"
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.preset("tiny-decoder", vocab_size=len(tok), max_seq_len=128)).eval()
    save_checkpoint(tmp_path / "chars", model, tok)
    code, out, err = chat(monkeypatch, capsys, tmp_path / "chars", ["café?", "/system é", "Hi"])
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("qkv chat: error:")]
    assert len(errors) == 2 and all("'é'" in line for line in errors)  # the message, then the system message
    assert "the system message stays as it was" in errors[1]
    assert len(out.splitlines()) == 1 and out.strip()  # "Hi" was still answered
