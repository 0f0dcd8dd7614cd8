"""Writing text one token at a time: x_{t+1} ~ softmax(processed(logits_t)), with a key/value cache.

One configuration, a few entry points:

- :class:`GenerationConfig`: every knob (greedy or sampling, temperature, top-k, top-p, repetition penalty,
  min/max new tokens, stop token ids and stop strings, seed, beams, length penalty, cache on/off).
- :func:`generate` → a tensor of token ids; :func:`stream` → an iterator yielding each step's new tokens;
  :func:`beam_search` → the best hypothesis per row. ``generate`` dispatches to ``beam_search`` when
  ``num_beams > 1``.
- :func:`generate_text` / :func:`stream_text`: the same with a tokenizer, text in and text out.
- :func:`generate_seq2seq`: the entry point for translation with the encoder-decoder :class:`~qkv.Transformer`
  (greedy or beam search, batched sources with padding masks) → lists of target ids.

Every function takes a ``DecoderLM`` (ids = the prompt; the result is prompt + continuation) or a
``Transformer`` (ids = the source sentence; the result is the target, starting with its start token), or
either one wrapped by peft, ``torch.compile``, DDP or FSDP (:func:`~qkv.models.unwrap` finds the model inside;
a decoder-only model runs through its wrapper, compiled or with the wrapper's hooks).
Batches of prompts of different lengths are **left**-padded (:func:`~qkv.data.left_pad`) with an
``attention_mask`` (True at real tokens); each row then decodes exactly as it would alone, because absolute
positions are counted from each row's first real token. Other padding (``right_pad``'s) is moved to the left.

The modules, in the order a token passes through them:

- ``config``: :class:`GenerationConfig`;
- ``prompt``: the inputs checked once per call, and the model fed one token at a time;
- ``logits``: repetition penalty, temperature, top-k, top-p (formulas on (batch, vocab) tensors);
- ``stopping``: stop token ids and stop strings;
- ``sampling``: the greedy / sampling loop, :func:`generate`, :func:`stream`, :func:`generate_seq2seq`;
- ``beam``: beam search with GNMT's length penalty;
- ``compiled``: :func:`compile_decoder`, the one-token step as one compiled graph (the prompt runs eagerly);
- ``text``: text in, text out, decoded incrementally.

Example::

    from qkv.generation import generate, GenerationConfig
    out = generate(model, ids, 50, temperature=0)                  # greedy
    out = generate(model, ids, config=GenerationConfig(max_new_tokens=50, temperature=0.8, top_p=0.9, seed=1))
    for tokens in stream(model, ids, 50, temperature=0):           # (batch,) tensor per step
        ...
    targets = generate_seq2seq(transformer, src_ids, src_mask, num_beams=4)   # alpha = 0.6 (GNMT)
"""

from ..data import left_pad, right_pad
from ..tokenizers import decode_continuation
from .beam import beam_search, gnmt_length_penalty
from .compiled import compile_decoder
from .config import GenerationConfig
from .logits import apply_repetition_penalty, filter_top_k, filter_top_p, next_token_probs
from .sampling import generate, generate_seq2seq, stream
from .stopping import find_stop
from .text import generate_text, stream_text

__all__ = [
    "GenerationConfig",
    "generate",
    "stream",
    "beam_search",
    "generate_text",
    "stream_text",
    "generate_seq2seq",
    "left_pad",
    "right_pad",
    "next_token_probs",
    "filter_top_k",
    "filter_top_p",
    "apply_repetition_penalty",
    "gnmt_length_penalty",
    "find_stop",
    "decode_continuation",
    "compile_decoder",
]
