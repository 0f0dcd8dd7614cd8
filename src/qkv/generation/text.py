"""Text in, text out: :func:`generate_text` and :func:`stream_text`.

Each prompt is encoded as the model's own tokenizer specifies (``add_special_tokens=True``: the BOS that a
LLaMA-style post-processor adds, as transformers does), prepared once, and its continuation decoded after the end
of the prompt (:func:`~qkv.tokenizers.decode_continuation`), so the space at the seam survives SentencePiece-style
decoders. The continuation is cut before a stop token or stop string (:mod:`qkv.generation.stopping`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data import left_pad, right_pad
from ..models import unwrap
from ..tokenizers import IncrementalText, decode_continuation
from .config import GenerationConfig, resolve
from .prompt import generating_kind, prepare
from .sampling import run, stream_prepared
from .stopping import StopStrings, until_stop_token, with_turn_ends

__all__ = ["generate_text", "stream_text"]


def _text_defaults(cfg: GenerationConfig, model: nn.Module, tokenizer: Any) -> GenerationConfig:
    """Text goes on past the context (a sliding window) unless the call says ``sliding_window=False``; the
    tokenizer's BOS starts an empty prompt (or a target) when neither the call nor the model names one; a reply
    also stops at the end-of-turn tokens the tokenizer's files state."""
    if cfg.sliding_window is None:
        cfg = cfg.replace(sliding_window=True)
    if cfg.bos_token_id is None and unwrap(model).config.bos_token_id is None and tokenizer.bos_id is not None:
        cfg = cfg.replace(bos_token_id=tokenizer.bos_id)
    return with_turn_ends(cfg, unwrap(model).config.eos_token_id, tokenizer)


def generate_text(model: nn.Module, tokenizer: Any, prompts: str | Sequence[str],
                  max_new_tokens: int | None = None, *, config: GenerationConfig | None = None,
                  **options: Any) -> str | list[str]:
    """Text in, generated text out (the continuation only, cut before a stop token or stop string).

    One string gives one string; a list gives a list, decoded as one padded batch. For a Transformer the
    prompts are source sentences and the result their targets. Past the model's context the text goes on over
    a sliding window of the last max_seq_len tokens (``sliding_window=False``: an error instead). The model
    may be wrapped by peft, torch.compile, DDP or FSDP.
    """
    cfg = _text_defaults(resolve(config, max_new_tokens, options), model, tokenizer)
    single = isinstance(prompts, str)
    encoded = [tokenizer.encode(t, add_special_tokens=True) for t in ([prompts] if single else list(prompts))]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (tokenizer.pad_id or 0)
    seq2seq = generating_kind(model) == "seq2seq"
    prompt = prepare(model, *(right_pad if seq2seq else left_pad)(encoded, pad), cfg)
    out = run(model, prompt, cfg, tokenizer)
    stop_strings = StopStrings(cfg.stop_strings)
    results = []
    for context, tokens in zip(encoded, out[:, prompt.start.shape[1]:].tolist(), strict=True):
        text = decode_continuation(tokenizer, [] if seq2seq else context, until_stop_token(tokens, prompt.stop))
        cut = stop_strings.find(text)
        results.append(text if cut < 0 else text[:cut])
    return results[0] if single else results


def stream_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int | None = None,
                *, config: GenerationConfig | None = None, **options: Any) -> Iterator[str]:
    """Yield the continuation of one prompt as pieces of text, as soon as they are certain.

    The prompt is encoded and every input checked here, before the first piece (an error comes before any
    output). A piece is held back while it might still turn out to begin a stop string, or while it ends
    inside a multi-byte character (byte-level BPE); the stop string itself is never yielded.
    """
    cfg = _text_defaults(resolve(config, max_new_tokens, options), model, tokenizer)
    encoded = tokenizer.encode(prompt, add_special_tokens=True)
    prepared = prepare(model, torch.tensor([encoded], dtype=torch.long), None, cfg)
    context = [] if prepared.seq2seq else encoded
    # One incremental decode and one search per token, shared with the loop that stops on the stop strings.
    finder = StopStrings(cfg.stop_strings, tokenizer, [context])
    tokens = stream_prepared(model, prepared, cfg, tokenizer, finder)  # checks the rest now
    return _pieces(tokens, tokenizer, context, prepared.stop, finder)


def _pieces(tokens: Iterator[Tensor], tokenizer: Any, context: list[int], stop: tuple[int, ...],
            stop_strings: StopStrings) -> Iterator[str]:
    """The pieces :func:`stream_text` yields, from the (1,) token tensors of :func:`~qkv.generation.stream`; with
    stop strings, the loop already decoded each token's text into ``stop_strings`` and found where one begins."""
    own = None if stop_strings else IncrementalText(tokenizer, context)
    text, emitted = "", 0
    for token in tokens:
        t = int(token[0])
        if t in stop:
            break
        text = stop_strings.text(0) if own is None else own.add(t)
        cut = stop_strings.cuts[0] if own is None else -1
        if cut >= 0:
            text = text[:cut]
            break
        safe = len(text) - stop_strings.hold - (1 if text.endswith("\ufffd") else 0)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    if len(text) > emitted:
        yield text[emitted:]
