"""``qkv chat --checkpoint PATH``: talk to a model in the terminal, in its own chat template, the reply streamed.

Each line is a user message; the model answers with the whole conversation before it (the history), rendered by
its chat template (``qkv.chat_template``; a model without one gets the plain format, with a one-line note). The
conversation's keys and values stay cached between turns (``qkv.generation.conversation``), so a turn feeds only
its new tokens. Commands: ``/reset`` forgets the conversation, ``/system TEXT`` sets the system message
(``/system`` alone removes it), ``/exit`` ends (as does end of input); ``//text`` sends ``/text``. Piped stdin
works the same way, one message a line, each reply printed on stdout; notes go to stderr. When the history
outgrows the context, the oldest turns go (the system message stays), with a one-line note.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from .options import (
    add_checkpoint,
    add_compile,
    add_dtype,
    add_quantize,
    add_sampling,
    add_threads,
    compile_if_asked,
    first_line,
    load_checkpoint,
    load_dtype,
    sampling_options,
    use_threads,
)

COMMANDS_HELP = "/reset, /system TEXT, /exit"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to a model in its chat template, the reply streamed, the history cached",
                       description="A terminal chat: each line is a user message, answered with the whole "
                                   "conversation in the model's chat template (its keys and values cached between "
                                   f"turns). Commands: {COMMANDS_HELP} (//text sends /text). Piped stdin: one "
                                   "message a line, each reply printed.")
    add_checkpoint(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="the system message (default: none)")
    add_sampling(p, stop_id_help="the chat template's end-of-turn tokens")
    add_dtype(p, help="the weights' precision while generating: bf16 reads half the bytes per token; fp32 "
                      "(default)")
    add_quantize(p)
    add_compile(p)
    add_threads(p, help="CPU threads for torch (default: torch's choice; on a busy machine 1 can answer faster)")
    p.set_defaults(run=run)


def _lines(interactive: bool) -> Iterator[str]:
    """The user's lines: typed at a prompt (with line editing) or read from a pipe."""
    if not interactive:
        for line in sys.stdin:
            yield line.rstrip("\r\n")
        return
    try:
        import readline  # noqa: F401  (arrow keys and history at the prompt where the platform has it)
    except ImportError:
        pass
    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:  # at the prompt: drop the line being typed, as a shell does (Ctrl-D ends)
            print(file=sys.stderr)


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv.generation import GenerationConfig
    from qkv.generation.conversation import Conversation, fit_messages

    config = GenerationConfig(**sampling_options(args))  # checked before the model loads
    use_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint, dtype=load_dtype(args.dtype), quantize=args.quantize)
    model = compile_if_asked(model, args.compile)
    conversation = Conversation(model, tokenizer)
    template = conversation.template
    if template.note:
        note(template.note)
    generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)
    # Room kept for a reply: --max-new-tokens, at most half the context (a reply that needs more stops there).
    room = min(config.max_new_tokens, conversation.context // 2)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        print(f"qkv chat: {args.checkpoint}; {COMMANDS_HELP}; Ctrl-D ends, Ctrl-C stops a reply", file=sys.stderr)
    system: str | None = args.system
    history: list[dict[str, str]] = []
    failed = False
    out = sys.stdout
    for line in _lines(interactive):
        if not line.strip():
            continue
        if line.startswith("/") and not line.startswith("//"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history = []
                note("the conversation starts again" + (" (the system message stays)" if system else ""))
            elif command == "/system":
                try:  # a system message the tokenizer cannot write is refused here, not at the next message
                    tokenizer.encode(rest.strip())
                except ValueError as err:
                    print(f"qkv chat: error: {first_line(str(err))}; the system message stays as it was",
                          file=sys.stderr, flush=True)
                    failed = True
                    continue
                system = rest.strip() or None
                note(f"system message {'set' if system else 'removed'}; the conversation goes on")
            else:
                note(f"unknown command {command}; the commands are {COMMANDS_HELP} (//text sends /text)")
            continue
        text = line[1:] if line.startswith("//") else line
        head = [{"role": "system", "content": system}] if system else []
        try:
            ids, kept, dropped = fit_messages(template, [*head, *history, {"role": "user", "content": text}],
                                              conversation.context - room + 1)
        except ValueError as err:  # text the tokenizer cannot write: this message is refused, the chat goes on
            print(f"qkv chat: error: {first_line(str(err))}", file=sys.stderr, flush=True)
            failed = True
            continue
        if len(ids) > conversation.context:
            print(f"qkv chat: error: this message takes {len(ids)} tokens{' with the system message' if system else ''}"
                  f" and the context holds {conversation.context}; shorten it", file=sys.stderr, flush=True)
            failed = True
            continue
        if dropped:
            note(f"the conversation outgrew the context ({conversation.context} tokens): the oldest "
                 f"{dropped} turn{'s' if dropped > 1 else ''} left it" + (", the system message stays"
                                                                          if system else ""))
            history = [m for m in kept if m["role"] != "system"][:-1]
        reply: list[str] = []
        pieces = conversation.reply(ids, config, generator=generator)
        try:
            for piece in pieces:
                out.write(piece.text)
                out.flush()
                reply.append(piece.text)
        except KeyboardInterrupt:
            if not interactive:
                raise
            pieces.close()
            note("reply stopped")
        out.write("\n\n" if interactive else "\n")
        out.flush()
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}]
    return 2 if failed else 0
