"""Greedy decoding and sampling: the loop that feeds the model one token per row per step, and the entries
:func:`generate` (→ ids; dispatches to beam search when ``num_beams > 1``), :func:`stream` (→ each step's tokens)
and :func:`generate_seq2seq` (translation: → target id lists).

Each step: logits → processed (repetition penalty, stop tokens forbidden before ``min_new_tokens``) → argmax
(temperature 0) or a draw from softmax(filter(logits / temperature)) with the call's own generator → stop checks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data import right_pad
from ..models import unwrap
from .beam import search
from .config import GenerationConfig, resolve
from .logits import choose_checked, read_checked
from .prompt import Prompt, Stepper, check_fits, evaluating, generating_kind, prepare
from .stopping import StopStrings, check_tokenizer, until_stop_token

__all__ = ["generate", "stream", "generate_seq2seq", "run", "steps", "stream_prepared"]


@torch.inference_mode()  # entered for each step and left at each yield: the caller never runs in it
def steps(model: nn.Module, prompt: Prompt, cfg: GenerationConfig, tokenizer: Any = None,
          stop_strings: StopStrings | None = None) -> Iterator[Tensor]:
    """Yield (batch,) next tokens, one step at a time; rows that stopped get the pad id; ends when all did, or
    after ``max_new_tokens``. Nothing runs before the first token is asked for.

    Each step reads from the tensors once: the chosen tokens and whether every logit was finite come to the host
    together (the stop checks run there), so a step waits on the device at most once. ``stop_strings``: the
    call's :class:`StopStrings` when the caller wants to read its texts too (``stream_text``)."""
    if cfg.max_new_tokens == 0:
        return
    stop, pad = prompt.stop, prompt.pad
    batch, n_new, device = prompt.ids.shape[0], cfg.max_new_tokens, prompt.ids.device
    if stop_strings is None:
        stop_strings = StopStrings(cfg.stop_strings, tokenizer, prompt.tails() if cfg.stop_strings else None)
    stop_set = set(stop)
    with evaluating(model):
        stepper = Stepper(model, prompt.ids, prompt.mask, n_new, cfg.use_cache, bool(cfg.sliding_window),
                          check=False)  # the loop checks the logits it reads
        logits = stepper.prefill(prompt.target_start)  # the model checks the token ids here
        generator = None if cfg.seed is None else torch.Generator(device).manual_seed(cfg.seed)
        stop_ids = torch.tensor(stop, dtype=torch.long, device=device) if stop else None
        seen = prompt.seen_tokens(stepper.core.config.vocab_size) if cfg.repetition_penalty != 1.0 else None
        track = bool(stop or stop_strings)
        finished = torch.zeros(batch, dtype=torch.bool, device=device) if track else None
        done_rows = [False] * batch
        rows = torch.arange(batch, device=device) if seen is not None else None
        for step in range(n_new):
            token = choose_checked(logits, step, cfg, seen, stop_ids, generator)
            if finished is not None:
                token = token.masked_fill(finished, pad)
            values = read_checked(token, logits)  # the step's one read: the tokens, the NaN/inf test with them
            if track:
                hits = stop_strings.hit(values, [not d for d in done_rows]) if stop_strings else [False] * batch
                if step >= cfg.min_new_tokens:
                    now = [d or v in stop_set or h for d, v, h in zip(done_rows, values, hits, strict=True)]
                    if now != done_rows:
                        done_rows = now
                        finished = torch.tensor(done_rows, device=device)
            if seen is not None:
                seen[rows, token] = True
            yield token
            if step + 1 == n_new or (track and all(done_rows)):
                return
            logits = stepper.step(token.unsqueeze(1))


def stream(model: nn.Module, ids: Tensor, max_new_tokens: int | None = None, *,
           config: GenerationConfig | None = None, attention_mask: Tensor | None = None, tokenizer: Any = None,
           **options: Any) -> Iterator[Tensor]:
    """Yield each step's new tokens, a (batch,) LongTensor, as soon as they are chosen.

    ``model``: a DecoderLM or Transformer, or one wrapped by peft, torch.compile, DDP or FSDP (see
    :func:`~qkv.models.unwrap`); a decoder-only model runs through its wrapper.
    ``ids``: (batch, prompt) for a DecoderLM (left-padded with ``attention_mask`` when lengths differ, see
    :func:`~qkv.data.left_pad`; other padding is moved to the left), or the (batch, source) sentence for a
    Transformer (padded on either side, with ``attention_mask``). Options are :class:`GenerationConfig` fields.
    Rows that have stopped yield the pad id; the iterator ends when every row stopped or after
    ``max_new_tokens``. Options, shapes, masks and the context are checked here; the token ids by the model
    when the first token is asked for (nothing runs before). Beam search cannot stream (the best
    hypothesis is known only at the end); use :func:`~qkv.generation.beam_search`.
    """
    cfg = resolve(config, max_new_tokens, options)
    return stream_prepared(model, prepare(model, ids, attention_mask, cfg), cfg, tokenizer)


def stream_prepared(model: nn.Module, prompt: Prompt, cfg: GenerationConfig, tokenizer: Any = None,
                    stop_strings: StopStrings | None = None) -> Iterator[Tensor]:
    """:func:`stream` on a prepared prompt: the remaining checks now, then an iterator over the steps."""
    if cfg.num_beams > 1:
        raise ValueError(f"num_beams={cfg.num_beams}: beam search cannot stream, since the best hypothesis is "
                         "known only at the end; call beam_search() or generate(), or use num_beams=1")
    check_fits(model, prompt, cfg)
    check_tokenizer(cfg, tokenizer)
    return steps(model, prompt, cfg, tokenizer, stop_strings)


def generate(model: nn.Module, ids: Tensor, max_new_tokens: int | None = None, *,
             config: GenerationConfig | None = None, attention_mask: Tensor | None = None, tokenizer: Any = None,
             **options: Any) -> Tensor:
    """Continue each row → (batch, prompt + new) ids for a DecoderLM, (batch, 1 + new) targets for a Transformer.

    ``generate(model, ids, 50, temperature=0)`` is greedy; ``temperature``, ``top_k``, ``top_p``, ``seed`` and
    every other :class:`GenerationConfig` field may be given by keyword or as ``config=``. Rows that stopped
    early (a stop token, kept, or a stop string) are filled with the pad id; the tensor ends when the last
    row stopped. A Transformer's target starts with its start token (``bos_token_id``). ``num_beams > 1``
    runs :func:`~qkv.generation.beam_search`. A right-padded batch continues each row from its last real token
    (as it would alone); the prompt part of the result is then left-padded. The model may be wrapped by peft,
    torch.compile, DDP or FSDP.
    """
    cfg = resolve(config, max_new_tokens, options)
    return run(model, prepare(model, ids, attention_mask, cfg), cfg, tokenizer)


def run(model: nn.Module, prompt: Prompt, cfg: GenerationConfig, tokenizer: Any = None) -> Tensor:
    """:func:`generate` on a prepared prompt (greedy, sampling or beam search) → prompt (or start) + new ids."""
    if cfg.num_beams > 1:
        return search(model, prompt, cfg)
    new = list(stream_prepared(model, prompt, cfg, tokenizer))
    return torch.cat([prompt.start, torch.stack(new, 1)], dim=1) if new else prompt.start.clone()


def generate_seq2seq(model: nn.Module, src_ids: Tensor | Sequence[Sequence[int]],
                     src_attention_mask: Tensor | None = None, *, num_beams: int = 1, length_penalty: float = 0.6,
                     max_new_tokens: int | None = None, bos_token_id: int | None = None,
                     eos_token_id: int | None = None, **options: Any) -> list[list[int]]:
    """Translate a batch with the encoder-decoder Transformer → each row's target ids (no start, no end token).

    ``src_ids``: (batch, source) ids with ``src_attention_mask`` True at real tokens (pad on either side), or
    a list of id lists (padded here). ``num_beams=1`` is greedy; ``num_beams=4, length_penalty=0.6`` is the
    paper's beam search. ``bos_token_id`` / ``eos_token_id`` default to the model config's; decoding stops
    at EOS. ``max_new_tokens`` defaults to source length + 50 (as in the paper), capped by the context.
    Other options are :class:`GenerationConfig` fields (e.g. ``temperature`` for sampling when num_beams=1;
    the default is greedy). The model may be wrapped by peft, torch.compile, DDP or FSDP.
    """
    if generating_kind(model) != "seq2seq":
        raise TypeError(f"generate_seq2seq needs a qkv Transformer (encoder-decoder), got "
                        f"{type(unwrap(model)).__name__}; use generate() for a DecoderLM")
    config = unwrap(model).config
    if not isinstance(src_ids, Tensor):
        src_ids, src_attention_mask = right_pad(src_ids, config.pad_token_id or 0)
    if max_new_tokens is None:
        max_new_tokens = min(src_ids.shape[1] + 50, config.max_seq_len)
    eos = eos_token_id if eos_token_id is not None else config.eos_token_id
    options.setdefault("temperature", 0.0)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                           bos_token_id=bos_token_id, stop_token_ids=None if eos is None else (eos,)).replace(
        **options)
    out = generate(model, src_ids, config=cfg, attention_mask=src_attention_mask)
    stop = () if eos is None else (eos,)
    return [until_stop_token(row, stop) for row in out[:, 1:].tolist()]
