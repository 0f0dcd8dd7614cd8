"""The attention a model pays for one text, with the token labels to draw it: the data every picture uses.

``attention_maps(model, tokenizer, text)`` runs the model once with ``return_attention=True`` and returns every
map it computed, per kind of attention:

- ``Encoder``: ``"encoder"`` (self-attention, every token sees every token);
- ``DecoderLM``: ``"decoder_self"`` (masked self-attention: a token sees itself and the tokens before it);
- ``Transformer``: ``"encoder"``, ``"decoder_self"`` and ``"cross"`` (decoder queries, encoder keys).

Each map is a tensor ``(layers, heads, queries, keys)`` whose rows are softmax distributions (each sums to 1).
Nothing here needs matplotlib, so the web explorer uses the same data as the PNG pictures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..attention import causal_mask
from ..generation.prompt import evaluating
from ..models import model_type_of, unwrap
from ..tokenizers import Tokenizer

__all__ = ["ModelInput", "AttentionMaps", "encode_input", "attention_maps", "attention_kinds", "KIND_TITLES",
           "check_index"]

KIND_TITLES = {
    "encoder": "encoder self-attention",
    "decoder_self": "decoder masked self-attention",
    "cross": "cross-attention (decoder → encoder)",
}


KINDS_OF = {"seq2seq": ["encoder", "decoder_self", "cross"], "encoder": ["encoder"], "decoder": ["decoder_self"]}


def attention_kinds(model: nn.Module) -> list[str]:
    """The kinds of attention a model computes, in the order they run (a wrapped model's: see ``unwrap``)."""
    return list(KINDS_OF[model_type_of(model)])


@dataclass
class ModelInput:
    """Token ids and their labels: the source side (and, for an encoder-decoder, the target side)."""

    ids: Tensor  # (1, seq)
    labels: list[str]
    target_ids: Tensor | None = None  # (1, tgt_seq), encoder-decoder only
    target_labels: list[str] = field(default_factory=list)

    def labels_for(self, kind: str) -> tuple[list[str], list[str]]:
        """(query labels, key labels) of a map of this kind."""
        if kind == "encoder" or self.target_ids is None:
            return self.labels, self.labels
        if kind == "cross":
            return self.target_labels, self.labels
        return self.target_labels, self.target_labels


def _labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each id's text, decoded alone and keeping special tokens: the same rule as ``Tokenizer.pieces``."""
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def _with_specials(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids as the model saw them in training: the tokenizer's own post-processing ([CLS] … [SEP] for BERT)."""
    ids = tokenizer.encode(text)  # raises a clear error for text the vocabulary cannot represent
    with_specials = tokenizer.backend.encode(text, add_special_tokens=True).ids
    return with_specials if len(with_specials) >= len(ids) else ids


def _model_output(model: nn.Module, tokenizer: Tokenizer, src_ids: list[int]) -> list[int] | None:
    """The encoder-decoder's own greedy output for the source (target ids, no start or end token), or None when
    the tokenizer has no start/end tokens to decode with."""
    from ..generation import generate_seq2seq

    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        return None
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return generate_seq2seq(model, [src_ids], bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                            pad_token_id=pad, max_new_tokens=unwrap(model).config.max_seq_len - 1)[0]


def encode_input(model: nn.Module, tokenizer: Tokenizer, text: str, target: str | None = None) -> ModelInput:
    """Turn text into model input, checking what a user can get wrong: empty text, text past the context.

    An encoder gets the tokenizer's own special tokens ([CLS] … [SEP] for BERT). An encoder-decoder reads the
    source followed by the end token (as ``qkv.translation`` trains it), and its decoder reads the start token
    followed by ``target``, or, when no target is given, by the model's own greedy output (its translation);
    a tokenizer without start/end tokens decodes the source itself (the copy task).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text is empty; type a sentence to look at")
    max_len, model_type = unwrap(model).config.max_seq_len, model_type_of(model)
    seq2seq = model_type == "seq2seq"
    if target is not None and not seq2seq:
        raise ValueError(f"a target text is read only by an encoder-decoder's decoder; this {model_type} "
                         "model reads the text alone: leave out the target")
    ids = tokenizer.encode(text) if seq2seq else _with_specials(tokenizer, text)
    if seq2seq and tokenizer.eos_id is not None:
        ids = [*ids, tokenizer.eos_id]
    if not ids:
        raise ValueError(f"the text {text!r} gives no tokens; type a sentence to look at")
    if len(ids) > max_len:
        raise ValueError(f"the text has {len(ids)} tokens but the model's context holds {max_len} "
                         f"(max_seq_len); shorten it to at most {max_len} tokens")
    result = ModelInput(torch.tensor([ids]), _labels(tokenizer, ids))
    if seq2seq:
        if target is not None and not target.strip():
            raise ValueError("the target text is empty; type the decoder's text, or leave it out to see the "
                             "model's own translation")
        tgt = tokenizer.encode(target) if target is not None else _model_output(model, tokenizer, ids)
        if tgt is None:
            tgt = tokenizer.encode(text)
        if tokenizer.bos_id is not None:
            tgt = [tokenizer.bos_id, *tgt]
        if not tgt:
            raise ValueError("the decoder has no tokens to read; pass a target text")
        if len(tgt) > max_len:
            raise ValueError(f"the target has {len(tgt)} tokens but the model's context holds {max_len}; "
                             "shorten it")
        result.target_ids, result.target_labels = torch.tensor([tgt]), _labels(tokenizer, tgt)
    return result


def check_index(name: str, value: int, size: int) -> int:
    """``value`` must lie in [0, size); a negative value counts from the end, as in Python."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not -size <= value < size:
        raise ValueError(f"{name}={value} is out of range: there are {size} {name}s; use 0 to {size - 1} "
                         "(or a negative number to count from the end)")
    return value % size


@dataclass
class AttentionMaps:
    """Every attention map of one forward pass: ``maps[kind]`` is (layers, heads, queries, keys)."""

    model_type: str
    inputs: ModelInput
    maps: dict[str, Tensor]

    @property
    def kinds(self) -> list[str]:
        return list(self.maps)

    def labels(self, kind: str) -> tuple[list[str], list[str]]:
        return self.inputs.labels_for(kind)

    def mask(self, kind: str) -> Tensor:
        """(queries, keys) bool, True where a query may attend to the key, as the model's mask said: the causal
        mask in a decoder's self-attention, every key elsewhere (one text, no padding)."""
        n_q, n_k = self.maps[kind].shape[-2:]
        if kind == "decoder_self":
            return causal_mask(n_q, n_k)
        return torch.ones(n_q, n_k, dtype=torch.bool)

    def kind(self, kind: str | None = None) -> str:
        """The kind named, or the first one (the only one for Encoder and DecoderLM); an unknown one is an error."""
        if kind is None:
            return self.kinds[0]
        if kind not in self.maps:
            raise ValueError(f"this {self.model_type} model has no {kind!r} attention; choose one of "
                             f"{', '.join(self.kinds)}")
        return kind

    def head(self, layer: int, head: int, kind: str | None = None) -> Tensor:
        """One head's (queries, keys) map, with layer and head checked."""
        maps = self.maps[self.kind(kind)]
        layer = check_index("layer", layer, maps.shape[0])
        head = check_index("head", head, maps.shape[1])
        return maps[layer, head]

    def strongest_keys(self, kind: str, layer: int, head: int, token: int, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` keys query ``token`` attends to most in one head, as (key label, weight), strongest first."""
        row = self.head(layer, head, kind)[check_index("token", token, self.maps[kind].shape[2])]
        top = row.topk(min(k, row.numel()))
        keys = self.labels(kind)[1]
        return [(keys[j], w) for w, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]

    def to_dict(self, decimals: int = 5) -> dict:
        """Plain lists for JSON (the web explorer)."""
        def rounded(t: Tensor) -> list:
            return torch.round(t, decimals=decimals).tolist()

        return {
            "model_type": self.model_type,
            "kinds": self.kinds,
            "maps": {k: rounded(v) for k, v in self.maps.items()},
            "labels": {k: {"queries": q, "keys": kk} for k in self.kinds for q, kk in [self.labels(k)]},
            "n_layers": {k: v.shape[0] for k, v in self.maps.items()},
            "n_heads": {k: v.shape[1] for k, v in self.maps.items()},
        }


@torch.no_grad()
def run_model(model: nn.Module, inputs: ModelInput, *, return_attention: bool = True):
    """One forward pass in evaluation mode (no dropout), restoring the model's mode afterwards; a wrapped model
    runs through its wrapper."""
    with evaluating(model):
        if model_type_of(model) == "seq2seq":  # the source and its target
            return model(inputs.ids, inputs.target_ids, return_attention=return_attention)
        return model(inputs.ids, return_attention=return_attention)


def attention_maps(model: nn.Module, tokenizer: Tokenizer, text: str, target: str | None = None, *,
                   inputs: ModelInput | None = None) -> AttentionMaps:
    """Run ``text`` through the model and collect every attention map, labelled with the tokens' pieces.

    ``target``: the decoder's text for an encoder-decoder (default: the model's own greedy translation);
    ``inputs``: the text already encoded by :func:`encode_input`."""
    kinds = attention_kinds(model)
    inputs = encode_input(model, tokenizer, text, target) if inputs is None else inputs
    _, attentions = run_model(model, inputs)
    if isinstance(attentions, dict):
        per_kind = {k: attentions[k] for k in kinds}
    else:
        per_kind = {kinds[0]: attentions}
    maps = {k: torch.stack([w[0] for w in layers]).float() for k, layers in per_kind.items()}
    return AttentionMaps(model_type_of(model), inputs, maps)
