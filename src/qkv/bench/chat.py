"""What a conversation's kept KV cache buys: time to the first token of a reply late in a chat, with the cache of the
earlier turns reused (:class:`~qkv.generation.conversation.Conversation`) and with the whole conversation fed again.

A chat of ``turns`` user messages is played greedily (each reply at most ``max_new_tokens`` tokens); at the last
turn the time from the call to the first reply piece (wall clock, and the process's CPU time, steadier on a shared
machine) is measured both ways, interleaved, ``repeats`` times:

- **reuse**: the conversation that answered the earlier turns answers the last one; it feeds only the tokens after
  the cached ones (the last user message and the markup around it);
- **fresh**: a new conversation feeds the whole rendered conversation.

Both give the same first token (greedy). ``python benchmarks/bench_chat.py [--checkpoint PATH]`` runs it on
SmolLM2-135M-Instruct from the bundled GGUF unless a checkpoint is named.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..chat_template import ChatTemplate
from ..generation import GenerationConfig
from ..generation.conversation import Conversation

__all__ = ["QUESTIONS", "chat_reuse_benchmark", "main"]

QUESTIONS = ("What is the capital of France?", "Tell me one fact about it.", "And what is the capital of Italy?",
             "Which of the two cities is older?", "Summarise our conversation in one sentence.")


def _play(conversation: Conversation, template: ChatTemplate, questions: Sequence[str], config: GenerationConfig
          ) -> tuple[list[dict[str, str]], list[int]]:
    """Answer every question but the last → the messages so far, the last question added, and its prompt ids."""
    messages: list[dict[str, str]] = []
    for question in questions[:-1]:
        messages.append({"role": "user", "content": question})
        ids = template.render(messages, add_generation_prompt=True).ids
        messages.append({"role": "assistant", "content": "".join(p.text for p in conversation.reply(ids, config))})
    messages.append({"role": "user", "content": questions[-1]})
    return messages, template.render(messages, add_generation_prompt=True).ids


def _first_piece(conversation: Conversation, ids: list[int], config: GenerationConfig
                 ) -> tuple[float, float, Any]:
    """→ (wall seconds, CPU seconds of this process, the piece) to the first piece of the reply to ``ids``."""
    start, cpu = time.perf_counter(), time.process_time()
    pieces = conversation.reply(ids, config)
    piece = next(pieces)
    elapsed, used = time.perf_counter() - start, time.process_time() - cpu
    pieces.close()
    return elapsed, used, piece


def chat_reuse_benchmark(model: torch.nn.Module, tokenizer: Any, questions: Sequence[str] = QUESTIONS, *,
                         max_new_tokens: int = 32, repeats: int = 3) -> dict[str, Any]:
    """Time to first token at the last of ``questions``, reused vs fresh (medians of ``repeats`` interleaved
    runs) → a dict of the numbers."""
    template = ChatTemplate(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0)
    reuse, fresh, reuse_cpu, fresh_cpu, reused = [], [], [], [], 0
    for _ in range(repeats):
        conversation = Conversation(model, tokenizer)
        _, ids = _play(conversation, template, questions, config)
        held = conversation.cached  # what the cache holds before the last turn
        reused = next((i for i, (a, b) in enumerate(zip(held, ids, strict=False)) if a != b), len(held))
        seconds, cpu, piece = _first_piece(conversation, ids, config)
        reuse.append(seconds)
        reuse_cpu.append(cpu)
        seconds, cpu, other = _first_piece(Conversation(model, tokenizer), ids, config)
        fresh.append(seconds)
        fresh_cpu.append(cpu)
        if other.token_id != piece.token_id:
            raise RuntimeError("the reused and the fresh conversation chose different first tokens")
    return {"turn": len(questions), "prompt_tokens": len(ids), "reused_tokens": reused,
            "ttft_reuse_s": statistics.median(reuse), "ttft_fresh_s": statistics.median(fresh),
            "speedup": statistics.median(fresh) / statistics.median(reuse),
            "cpu_reuse_s": statistics.median(reuse_cpu), "cpu_fresh_s": statistics.median(fresh_cpu),
            "threads": torch.get_num_threads()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time to first token late in a chat, with and without reusing the "
                                                 "conversation's KV cache.")
    parser.add_argument("--checkpoint", default=None, help="a model to chat with (default: SmolLM2-135M-Instruct, "
                                                           "the bundled GGUF)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs (median)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="the most tokens of each earlier reply")
    args = parser.parse_args(argv)
    from ..loading import load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        from ..interop.gguf import smollm2_gguf

        args.checkpoint = str(smollm2_gguf())
    model, tokenizer = load(args.checkpoint)
    row = chat_reuse_benchmark(model, tokenizer, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    print(f"{args.checkpoint}: turn {row['turn']}, prompt {row['prompt_tokens']} tokens, {row['reused_tokens']} "
          f"from the cache; time to first token {row['ttft_reuse_s'] * 1000:.0f} ms reused, "
          f"{row['ttft_fresh_s'] * 1000:.0f} ms fresh ({row['speedup']:.1f}x); CPU time "
          f"{row['cpu_reuse_s'] * 1000:.0f} ms reused, {row['cpu_fresh_s'] * 1000:.0f} ms fresh; "
          f"{row['threads']} threads")
    return 0
