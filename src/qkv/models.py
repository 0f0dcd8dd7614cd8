"""The three Transformer shapes, all built from one ``ModelConfig``.

- ``Encoder``: embeddings → N encoder blocks → hidden states (BERT).
- ``DecoderLM``: embeddings → N causal decoder blocks → final linear → logits over the vocabulary (GPT).
- ``Transformer``: the encoder-decoder of "Attention Is All You Need" (translation).

Masks follow one rule everywhere (see ``qkv.attention``): ``attention_mask`` is boolean ``(batch, seq)`` with
True at real tokens (or Hugging Face's 1/0 integers; float masks are refused).

Decoding step by step: ``state = model.new_decode_state(batch, max_len)``, then ``model(ids, mask,
decode_state=state)`` with the prompt and each new token (``Transformer.decode(..., decode_state=state)``); the
state keeps the caches, positions and mask, and slides past the context (``qkv.decode_state``). A step has the
same shapes every time, so ``torch.compile(fullgraph=True)`` traces it once. Whether a request fits the context
at all: ``model.check_fits(n_tokens, max_new_tokens)``.

Every weight is used by calling its module: the output layer is the module ``lm_head`` (an ``nn.Linear`` whose
weight *is* the token embedding's when ``tie_embeddings``), attention's projections are ``nn.Linear`` modules
(``qkv.attention.MultiHeadAttention``), so a peft adapter or a quantized layer can stand in for any of them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .attention import KVCache, check_mask, padding_mask
from .blocks import AttentionInputs, DecoderBlock, EncoderBlock, Stack, make_norm
from .config import ModelConfig
from .decode_state import DecodeState
from .errors import OptionError
from .positions import PositionalEncoding, build_positional

__all__ = ["Embeddings", "positional_encoding", "Encoder", "DecoderLM", "Transformer", "MODEL_TYPES",
           "model_class_for", "build_model", "unwrap", "model_type_of", "evaluating",
           "parameter_counts", "check_finite_weights"]


def positional_encoding(config: ModelConfig) -> PositionalEncoding:
    """The positional encoding the config names, for its max_seq_len, d_model and heads."""
    return build_positional(config.positional, max_positions=config.max_seq_len, d_model=config.d_model,
                            n_heads=config.n_heads, rope_base=config.rope_base)


class Embeddings(nn.Module):
    """x = E[token] · s + PE(pos) (+ S[segment]), then optional LayerNorm and dropout; s = sqrt(d_model) or 1."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.d_model)
        self.positional = positional_encoding(config)
        self.token_type = nn.Embedding(config.n_token_types, config.d_model) if config.n_token_types else None
        self.norm = make_norm(config) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = math.sqrt(config.d_model) if config.scale_embeddings else 1.0

    def forward(self, ids: Tensor, positions: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        x = self.token(ids)
        if self.scale != 1.0:
            x = x * self.scale
        x = self.positional.embed(x, positions)
        if self.token_type is not None:
            x = x + self.token_type(torch.zeros_like(ids) if token_type_ids is None else token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x) if self.training and isinstance(self.dropout, nn.Dropout) else x


class _Model(nn.Module):
    """What the three models share: embeddings, input checks, positions, masks, initialisation."""

    model_type = ""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"expected a qkv.ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = Embeddings(config)
        self.lm_head: nn.Module | None = None  # the output layer (models that predict tokens)

    # -- checks ---------------------------------------------------------------------------------------------
    def _check_ids(self, ids: Tensor, name: str = "ids") -> None:
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, seq), got {tuple(ids.shape)}; "
                             "add a batch dimension with ids.unsqueeze(0)")
        if ids.dtype not in (torch.long, torch.int32):  # what nn.Embedding accepts
            raise TypeError(f"{name} must hold token ids as torch.long (or int32), got dtype {ids.dtype}; "
                            "convert with ids.long()")
        # The range check reads the values back: free on the CPU, a device sync every forward elsewhere (where
        # the embedding's own bounds check catches a bad id), and a graph break under torch.compile.
        if ids.numel() and ids.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"{name} holds token ids outside [0, vocab_size={self.config.vocab_size}): "
                                 f"min {low}, max {high}")

    def check_fits(self, n_tokens: int, max_new_tokens: int = 0, *, sliding_window: bool = False,
                   what: str = "sequence") -> None:
        """Does a request fit the model's context? Raise ValueError, naming the numbers and the fix, when not.

        ``n_tokens`` tokens are fed at once (a prompt, a source sentence, a target's start token), then
        ``max_new_tokens`` are generated one by one; the last is never fed back, so they need
        n_tokens + max_new_tokens - 1 positions of ``max_seq_len``. With ``sliding_window`` generation goes past
        the context (see ``qkv.decode_state``), so only the ``n_tokens`` must fit.
        """
        limit = self.config.max_seq_len
        if n_tokens > limit:
            raise ValueError(f"{what} of {n_tokens} tokens is longer than max_seq_len={limit} allows; shorten it "
                             f"(keep its last {limit} tokens at most) or build the model with a larger max_seq_len")
        used = n_tokens + max_new_tokens - 1
        if not sliding_window and used > limit:
            raise OptionError(f"{what} of {n_tokens} tokens + {{max_new_tokens}} need {used} positions but the "
                              f"model's context is max_seq_len={limit}; lower {{max_new_tokens:name}} to at most "
                              f"{limit - n_tokens + 1}, shorten the {what}, or slide a window past the context "
                              "({sliding_window:True})", max_new_tokens=max_new_tokens)

    def _positions(self, ids: Tensor, past: int, positions: Tensor | None) -> Tensor:
        self.check_fits(past + ids.shape[1])
        if positions is None:
            return torch.arange(past, past + ids.shape[1], device=ids.device).unsqueeze(0)
        if positions.shape[-1] != ids.shape[1]:
            raise ValueError(f"positions {tuple(positions.shape)} must match ids {tuple(ids.shape)}")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.config.max_seq_len):
            raise ValueError(f"positions must lie in [0, max_seq_len={self.config.max_seq_len}), got "
                             f"min {int(positions.min())}, max {int(positions.max())}")
        return positions

    @staticmethod
    def _key_mask(attention_mask: Tensor | None, batch: int, n_keys: int, name: str) -> Tensor | None:
        if attention_mask is None:
            return None
        attention_mask = check_mask(attention_mask, name)  # bool or 1/0 integers; float masks are refused
        if attention_mask.shape != (batch, n_keys):
            raise ValueError(f"{name} must have shape (batch, keys) = {(batch, n_keys)}, got "
                             f"{tuple(attention_mask.shape)} (True at real tokens, False at padding)")
        return padding_mask(attention_mask)

    def _inputs(self, positions: Tensor, n_queries: int, n_keys: int, *, mask: Tensor | None = None,
                causal: bool = False, need_weights: bool = False, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> AttentionInputs:
        """What every block of a forward pass without a decode state reads, with what the positional encoding
        does inside attention (RoPE's rotation of queries and keys, ALiBi's distance bias)."""
        pe = self.embed.positional
        return AttentionInputs(mask=mask, causal=causal, rotate=pe.rotary(positions),
                               bias=pe.attention_bias(n_queries, n_keys, positions.device), need_weights=need_weights,
                               context=context, context_mask=context_mask)

    # -- output ---------------------------------------------------------------------------------------------
    def logits(self, hidden: Tensor) -> Tensor:
        """logits = h W_out^T, by the output layer ``lm_head``; softmax(logits) is the next-token distribution
        (the loss applies it)."""
        return self.lm_head(hidden)

    def _make_lm_head(self, tied: bool) -> None:
        """The output layer: an ``nn.Linear`` (d_model → vocab), whose weight is the token embedding's own
        Parameter when ``tie_embeddings`` (one matrix, E, both reads and writes tokens: the paper's 3.4).

        Tied, checkpoints hold the matrix once (``embed.token.weight``, as before the output layer was a module):
        the state dict leaves ``lm_head.weight`` out and loading fills it from the embedding. An adapter or a
        quantized copy put in ``lm_head``'s place leaves the embedding lookup exact.
        """
        c = self.config
        if not tied:
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
            return
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False, device="meta")  # no matrix, no random draw
        self.lm_head.weight = self.embed.token.weight
        self._register_state_dict_hook(_drop_tied_output)
        self.register_load_state_dict_post_hook(_tied_output_is_not_missing)

    # -- initialisation -------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """N(0, init_std) for weights, zero biases, unit norms; residual outputs scaled by 1/sqrt(2·layers).

        The scaling (GPT-2) keeps the residual stream's variance from growing with depth. Embeddings that are
        multiplied by sqrt(d_model) start at std d_model^-0.5, so the scaled embedding has unit size.
        """
        c = self.config
        std = c.init_std
        n_layers = max(1, c.n_encoder_layers * isinstance(self, (Encoder, Transformer))
                       + c.n_decoder_layers * isinstance(self, (DecoderLM, Transformer)))
        for name, module in self.named_modules():
            if module is self.lm_head and self.lm_head.weight is self.embed.token.weight:
                continue  # its weight is the token embedding, initialised as one
            if isinstance(module, nn.Linear):
                scaled = name.endswith(("attn.out", "ffn.w2"))
                nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * n_layers) if scaled else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, c.d_model ** -0.5 if c.scale_embeddings else std)

    def num_parameters(self, *, exclude_positions: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_positions:
            total -= sum(p.numel() for p in self.embed.positional.parameters())
        return total

    def new_cache(self, *args: object, **kwargs: object) -> None:
        """Gone: decoding keeps its caches in a decode state, ``model.new_decode_state(batch, max_len)``."""
        raise TypeError(_NO_CACHE)

    # -- decoding with a DecodeState --------------------------------------------------------------------------
    def new_decode_state(self, batch: int, max_len: int | None = None, *, sliding_window: bool = True
                         ) -> DecodeState:
        """The state for decoding ``batch`` rows step by step (see ``qkv.decode_state``), to pass as
        ``decode_state=`` to ``DecoderLM.forward`` / ``Transformer.decode``.

        ``max_len``: the most tokens a row will feed (prompt + new tokens - 1; default and at most: max_seq_len
        positions are allocated). Past ``max_seq_len`` the state slides a window of the last max_seq_len tokens;
        ``sliding_window=False`` refuses instead (here when ``max_len`` is already too long).
        """
        if self.model_type == "encoder":
            raise TypeError(f"a {type(self).__name__} does not decode step by step; use a DecoderLM or Transformer")
        c = self.config
        max_len = c.max_seq_len if max_len is None else max_len
        if not isinstance(batch, int) or batch < 1 or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"batch={batch!r} and max_len={max_len!r} must be positive integers")
        if not sliding_window:
            self.check_fits(max_len, what="max_len")
        capacity = min(max_len, c.max_seq_len)
        # The caches take their dtype and device from the first keys written (the activations), not a weight.
        caches = [KVCache(capacity) for _ in range(c.n_decoder_layers)]
        cross = [KVCache(0) for _ in range(c.n_decoder_layers)] if self.model_type == "seq2seq" else None
        return DecodeState(batch=batch, capacity=capacity, max_len=max_len, max_seq_len=c.max_seq_len,
                           positional=c.positional, sliding_window=sliding_window, caches=caches,
                           cross_caches=cross)

    def _decode_step(self, stack: Stack, ids: Tensor, mask: Tensor | None, state: DecodeState, need_weights: bool,
                     name: str, context: Tensor | None = None, context_mask: Tensor | None = None
                     ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Feed the new tokens ``ids`` (batch, t) through ``stack`` with the state's caches → (hidden, weights)."""
        b, t = ids.shape
        if not state.checked:  # the first call checks; later steps skip the checks
            self._check_ids(ids, name)
            if b != state.batch:
                raise ValueError(f"{name} has {b} rows but the decode state was created for batch={state.batch}")
            if mask is not None:
                mask = self._key_mask(mask, b, t, name.replace("ids", "attention_mask"))[:, 0, 0]
                if not torch.compiler.is_compiling() and bool(mask.all()):
                    mask = None  # nothing is padding: the fast path needs no mask
            state.checked = True
        elif mask is not None:
            mask = mask.bool()
        if torch.compiler.is_compiling():
            if state.keeps_ids:
                raise ValueError("a compiled decoding step cannot re-encode the window of a model with "
                                 f"{self.config.positional} positions past its context; create the decode state "
                                 "with max_len < max_seq_len or sliding_window=False, or decode it eagerly")
        else:
            state.sync()
            if state.length + t > state.capacity:  # past the context: slide the window
                if t > 1:  # one token at a time, so each sees the window it would see alone
                    outs = [self._decode_step(stack, ids[:, i : i + 1], None if mask is None else mask[:, i : i + 1],
                                              state, need_weights, name, context, context_mask) for i in range(t)]
                    return torch.cat([o[0] for o in outs], 1), [w for o in outs for w in o[1]], [
                        w for o in outs for w in o[2]]
                if not state.ring and state.free(state.length + t - state.capacity):
                    # absolute positions: re-encode the window from position 0, then take the new token's output
                    old_ids, old_mask = state.window()
                    if mask is not None or old_mask is not None:
                        mask = torch.cat([torch.ones_like(old_ids, dtype=torch.bool) if old_mask is None else old_mask,
                                          torch.ones_like(ids, dtype=torch.bool) if mask is None else mask], 1)
                    x, sw, cw = self._decode_step(stack, torch.cat([old_ids, ids], 1), mask, state, need_weights,
                                                  name, context, context_mask)
                    return x[:, -t:], sw, cw
        positions, slots, columns = state.add(ids, mask)
        attend_mask, causal, n_keys = state.attention_view(columns)
        pe = self.embed.positional
        x = self.embed(ids, positions)
        return stack(x, AttentionInputs(
            mask=attend_mask, causal=causal, rotate=pe.rotary(positions, state.position_limit),
            bias=pe.attention_bias(t, state.capacity if n_keys is None else n_keys, ids.device,
                                   query_positions=columns, key_positions=state.slot_column),
            need_weights=need_weights, caches=state.caches, cross_caches=state.cross_caches, slots=slots,
            n_keys=n_keys, context=context, context_mask=context_mask, checked=True))


class Encoder(_Model):
    """Encoder-only Transformer: h = EncoderBlock^N(Embed(x)), every token attending to every real token."""

    model_type = "encoder"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        if config.n_encoder_layers < 1:
            raise ValueError("an Encoder needs n_encoder_layers >= 1")
        self.layers = Stack(config, config.n_encoder_layers, lambda: EncoderBlock(config))
        self._make_lm_head(tied=True)  # the masked-LM logits read the token embedding (BERT ties them too)
        self.init_weights()

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, *, token_type_ids: Tensor | None = None,
                positions: Tensor | None = None, return_attention: bool = False):
        """ids (batch, seq) → hidden states (batch, seq, d_model) [, attention per layer]."""
        self._check_ids(ids)
        b, t = ids.shape
        positions = self._positions(ids, 0, positions)
        x = self.embed(ids, positions, token_type_ids)
        x, weights, _ = self.layers(x, self._inputs(positions, t, t, need_weights=return_attention,
                                                    mask=self._key_mask(attention_mask, b, t, "attention_mask")))
        return (x, weights) if return_attention else x


class DecoderLM(_Model):
    """Decoder-only language model: P(x_t | x_<t) = softmax(DecoderBlock^N(Embed(x))_t W_out^T)."""

    model_type = "decoder"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        if config.n_decoder_layers < 1:
            raise ValueError("a DecoderLM needs n_decoder_layers >= 1")
        self.layers = Stack(config, config.n_decoder_layers,
                            lambda: DecoderBlock(config, cross_attention=False))
        self._make_lm_head(config.tie_embeddings)
        self.init_weights()

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, *, positions: Tensor | None = None,
                decode_state: DecodeState | None = None, return_attention: bool = False,
                return_hidden: bool = False, logits_to_keep: int = 0, cache: None = None):
        """ids (batch, seq) → logits (batch, seq, vocab) [, attention per layer].

        ``logits_to_keep=n`` computes the output layer for the last n positions only (batch, n, vocab): a
        prompt's prefill needs only its last one (0, the default: every position).

        With ``decode_state`` (from ``new_decode_state()``), ids are the *new* tokens only (the prompt, then one
        token per step), ``attention_mask`` covers those same tokens (left padding of the prompt), and the
        state keeps the keys, values, positions and mask of the earlier ones; it slides past the context.
        """
        if cache is not None:
            raise TypeError(_NO_CACHE)
        if decode_state is not None:
            _alone(positions)
            x, weights, _ = self._decode_step(self.layers, ids, attention_mask, decode_state, return_attention,
                                              "ids")
        else:
            x, weights = self._forward(ids, attention_mask, positions, return_attention)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        out = x if return_hidden else self.logits(x)
        return (out, weights) if return_attention else out

    def _forward(self, ids: Tensor, attention_mask: Tensor | None, positions: Tensor | None,
                 return_attention: bool) -> tuple[Tensor, list[Tensor]]:
        """The forward pass without a decode state → (hidden states, attention weights per layer)."""
        self._check_ids(ids)
        b, t = ids.shape
        positions = self._positions(ids, 0, positions)
        x = self.embed(ids, positions)
        x, weights, _ = self.layers(x, self._inputs(
            positions, t, t, mask=self._key_mask(attention_mask, b, t, "attention_mask"), causal=True,
            need_weights=return_attention))
        return x, weights


class Transformer(_Model):
    """Encoder-decoder: P(y_t | y_<t, x) = softmax(Decoder(Embed(y), Encoder(Embed(x)))_t W_out^T).

    Source, target and output share one embedding matrix when ``tie_embeddings`` (the paper, section 3.4).
    """

    model_type = "seq2seq"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        if config.n_encoder_layers < 1 or config.n_decoder_layers < 1:
            raise ValueError("a Transformer needs n_encoder_layers >= 1 and n_decoder_layers >= 1")
        self.encoder = Stack(config, config.n_encoder_layers, lambda: EncoderBlock(config))
        self.decoder = Stack(config, config.n_decoder_layers, lambda: DecoderBlock(config, cross_attention=True))
        self._make_lm_head(config.tie_embeddings)
        self.init_weights()

    def encode(self, src_ids: Tensor, src_attention_mask: Tensor | None = None, *,
               return_attention: bool = False):
        """src_ids (batch, src_seq) → memory (batch, src_seq, d_model) [, encoder self-attention per layer]."""
        self._check_ids(src_ids, "src_ids")
        b, s = src_ids.shape
        positions = self._positions(src_ids, 0, None)
        x = self.embed(src_ids, positions)
        x, weights, _ = self.encoder(x, self._inputs(
            positions, s, s, mask=self._key_mask(src_attention_mask, b, s, "src_attention_mask"),
            need_weights=return_attention))
        return (x, weights) if return_attention else x

    def decode(self, tgt_ids: Tensor, memory: Tensor | None, src_attention_mask: Tensor | None = None,
               tgt_attention_mask: Tensor | None = None, *, positions: Tensor | None = None,
               decode_state: DecodeState | None = None, return_attention: bool = False, cache: None = None,
               cross_cache: None = None):
        """tgt_ids (batch, tgt_seq) + memory → logits (batch, tgt_seq, vocab) [, (self, cross) weights].

        With ``decode_state`` (from ``new_decode_state()``) tgt_ids are the new tokens only; on the first call
        the encoder's keys and values (from ``memory``) and ``src_attention_mask`` go into the state, and
        ``memory`` may be None afterwards.
        """
        if cache is not None or cross_cache is not None:
            raise TypeError(_NO_CACHE)
        if decode_state is not None:
            _alone(positions)
            state = decode_state
            first = state.cross_caches[0].keys is None
            if first:
                if memory is None:
                    raise ValueError("the first decode step with a decode state needs the encoder output: pass "
                                     "memory=model.encode(src_ids, src_attention_mask)")
                source_mask = self._key_mask(src_attention_mask, state.batch, memory.shape[1], "src_attention_mask")
                state.source_mask = None if source_mask is None else source_mask.clone()  # reorder writes in place
            x, self_w, cross_w = self._decode_step(self.decoder, tgt_ids, tgt_attention_mask, state, return_attention,
                                                   "tgt_ids", memory if first else None, state.source_mask)
            logits = self.logits(x)
            return (logits, self_w, cross_w) if return_attention else logits
        self._check_ids(tgt_ids, "tgt_ids")
        if memory is None:
            raise ValueError("decode needs the encoder output: pass memory=model.encode(src_ids, src_attention_mask)")
        b, t = tgt_ids.shape
        positions = self._positions(tgt_ids, 0, positions)
        x = self.embed(tgt_ids, positions)
        x, self_w, cross_w = self.decoder(x, self._inputs(
            positions, t, t, mask=self._key_mask(tgt_attention_mask, b, t, "tgt_attention_mask"),
            causal=True, context=memory, context_mask=self._key_mask(src_attention_mask, b, memory.shape[1],
                                                                      "src_attention_mask"),
            need_weights=return_attention))
        logits = self.logits(x)
        return (logits, self_w, cross_w) if return_attention else logits

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, src_attention_mask: Tensor | None = None,
                tgt_attention_mask: Tensor | None = None, *, return_attention: bool = False):
        """(source ids, target ids) → logits (batch, tgt_seq, vocab) [, {encoder, decoder_self, cross}]."""
        self._check_ids(src_ids, "src_ids")
        self._check_ids(tgt_ids, "tgt_ids")
        if src_ids.shape[0] != tgt_ids.shape[0]:
            raise ValueError(f"src_ids and tgt_ids need the same batch size: {src_ids.shape[0]} vs "
                             f"{tgt_ids.shape[0]}")
        if not return_attention:
            return self.decode(tgt_ids, self.encode(src_ids, src_attention_mask), src_attention_mask,
                               tgt_attention_mask)
        memory, enc_w = self.encode(src_ids, src_attention_mask, return_attention=True)
        logits, self_w, cross_w = self.decode(tgt_ids, memory, src_attention_mask, tgt_attention_mask,
                                              return_attention=True)
        return logits, {"encoder": enc_w, "decoder_self": self_w, "cross": cross_w}


def _alone(positions: Tensor | None) -> None:
    """A decode state keeps its own positions: refuse them given beside it."""
    if positions is not None:
        raise ValueError("decode_state keeps its own positions; pass positions= only without it")


_NO_CACHE = ("cache= and new_cache() are gone: decoding keeps its key/value caches in a decode state, "
             "state = model.new_decode_state(batch, max_len), then model(ids, decode_state=state) with the new "
             "tokens (Transformer.decode(..., decode_state=state))")


def _drop_tied_output(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A tied output layer's weight is the token embedding: the state dict holds it once, as embed.token.weight."""
    state_dict.pop(prefix + "lm_head.weight", None)


def _tied_output_is_not_missing(module: nn.Module, incompatible) -> None:
    """Loading a tied model fills lm_head.weight through the embedding, so its absence is expected; loading with
    ``assign=True`` puts a new embedding Parameter in place, which the output layer then shares again."""
    for key in [k for k in incompatible.missing_keys if k.endswith("lm_head.weight")]:
        incompatible.missing_keys.remove(key)
    if isinstance(module.lm_head, nn.Linear):  # an adapter or a quantized copy in its place keeps its own
        module.lm_head.weight = module.embed.token.weight


MODEL_TYPES: dict[str, type[_Model]] = {"encoder": Encoder, "decoder": DecoderLM, "seq2seq": Transformer}


def unwrap(model: nn.Module) -> _Model:
    """The qkv model inside the wrappers others put around it → the ``Encoder``, ``DecoderLM`` or ``Transformer``.

    Wrappers: peft's ``PeftModel`` / ``LoraModel`` (adapters are injected into the qkv model's own layers, so the
    model returned computes with them), ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``), DDP and FSDP's
    ``module`` (FSDP2's ``fully_shard`` keeps the model's own class). Code that needs the config, the decode
    state or the model's kind asks this helper; code that runs the model calls the wrapper it was given.
    Raises TypeError naming the class when no qkv model is inside.
    """
    inner = model
    for _ in range(8):  # wrappers nest (a compiled peft model, DDP around a compiled model, ...)
        if isinstance(inner, _Model):
            return inner
        if hasattr(inner, "get_base_model"):  # peft's PeftModel
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):  # torch.compile
            inner = inner._orig_mod
        elif isinstance(getattr(inner, "model", None), nn.Module) and hasattr(inner, "peft_config"):  # LoraModel
            inner = inner.model
        elif isinstance(getattr(inner, "module", None), nn.Module):  # DDP, FSDP (1)
            inner = inner.module
        else:
            break
    raise TypeError(f"expected a qkv Encoder, DecoderLM or Transformer (or one wrapped by peft, torch.compile, "
                    f"DDP or FSDP), got {type(model).__name__}")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run the model in eval mode (no dropout), then give every module back the training flag it had.

    Only the model's own state changes, so a generator may hold it across its yields. Gradient and inference
    mode are the caller's: they belong to the thread, and a generator that held them across a yield would leave
    the code that drives it in that mode; it takes them from a decorator instead (``@torch.inference_mode()``
    enters the mode for each step of a generator and leaves it at each yield).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def model_type_of(model: nn.Module) -> str:
    """"encoder" | "decoder" | "seq2seq": the kind of the qkv model inside ``model`` (see :func:`unwrap`)."""
    return unwrap(model).model_type


def model_class_for(config: ModelConfig) -> type[_Model]:
    """The model shape a config describes: both stacks → Transformer, encoder only → Encoder, else DecoderLM."""
    if config.n_encoder_layers and config.n_decoder_layers:
        return Transformer
    return Encoder if config.n_encoder_layers else DecoderLM


def build_model(config: ModelConfig, model_type: str | None = None) -> _Model:
    """Build the model named by ``model_type`` ("encoder" | "decoder" | "seq2seq"), or the one the config implies."""
    if model_type is None:
        return model_class_for(config)(config)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type](config)


def parameter_counts(model: nn.Module) -> OrderedDict[str, int]:
    """Parameters per component (token embedding, positions, each stack's attention / feed-forward / norms)."""
    counts: OrderedDict[str, int] = OrderedDict()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "embed":
            group = {"token": "embedding: tokens", "positional": "embedding: positions",
                     "token_type": "embedding: segments", "norm": "embedding: norm"}[parts[1]]
        elif parts[0] in ("layers", "encoder", "decoder") and len(parts) > 3 and parts[1] == "layers":
            stack = {"layers": model.model_type if hasattr(model, "model_type") else "layers"}.get(parts[0],
                                                                                                    parts[0])
            component = {"self_attn": "self-attention", "cross_attn": "cross-attention", "ffn": "feed-forward"}
            group = f"{stack} blocks: {component.get(parts[3], 'norms')}"
        elif parts[0] in ("layers", "encoder", "decoder"):
            group = "final norm"
        elif parts[0] == "lm_head":
            group = "output projection"
        else:
            group = parts[0]
        counts[group] = counts.get(group, 0) + p.numel()
    return counts


def check_finite_weights(weights: Mapping[str, Tensor], source: str | Path) -> None:
    """Refuse weights that hold NaN or ±inf: such a model generates nothing useful and its loss is nan.

    Every loader passes the tensors it read through here (``qkv.checkpoint.load_checkpoint`` and the Hugging
    Face / GGUF path, ``qkv.interop.hf.build_with_weights``). Raises ValueError naming the tensors and ``source``.
    """
    bad = [name for name, t in weights.items()
           if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) and not bool(t.isfinite().all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{source} holds non-finite weights (NaN or inf) in {shown}; the model is broken "
                         "(a diverged run?): load an earlier checkpoint")
