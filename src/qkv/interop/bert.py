"""Hugging Face BERT → qkv ``Encoder``, tensor for tensor, and sentence embeddings by mean pooling.

BERT is a post-LN encoder: x = LayerNorm(E[token] + P[pos] + S[segment]), then N blocks of
x ← LayerNorm(x + SelfAttention(x)); x ← LayerNorm(x + FFN(x)) with exact (erf) GELU. Names map like this:

    embeddings.word_embeddings / position_embeddings / token_type_embeddings / LayerNorm
                                              → embed.token / positional.weight / token_type / norm
    encoder.layer.i.attention.self.{query,key,value}  → layers.layers.i.self_attn.qkv  ([W_Q | W_K | W_V])
    encoder.layer.i.attention.output.dense / LayerNorm → self_attn.out / self_attn_norm
    encoder.layer.i.intermediate.dense / output.dense  → ffn.w1 / ffn.w2
    encoder.layer.i.output.LayerNorm                   → ffn_norm

The pooler and the pre-training heads (``pooler.*``, ``cls.*``) are not part of the encoder and are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ModelConfig
from ..models import DecoderLM, Encoder, Transformer, evaluating, unwrap
from ..tokenizers import Tokenizer
from .hf import Rule, build_with_weights, layer_rules, load_weights, matches, model_type_of, read_config, strip_prefix
from .hf_tokenizers import bert_tokenizer, check_fits

__all__ = ["config_from_bert", "bert_rules", "load_bert", "mean_pool", "embed_texts", "encode_batch"]

_ACTIVATION_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}

_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                 initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute")


def config_from_bert(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A BERT ``config.json`` → the qkv ``ModelConfig`` of the same encoder; unsupported options are errors."""
    c = {**_DEFAULTS, **hf}
    if c["position_embedding_type"] != "absolute":
        raise ValueError(f"{source}: position_embedding_type={c['position_embedding_type']!r} is not supported; "
                         "qkv reads BERT models with learned absolute positions ('absolute')")
    for field in ("is_decoder", "add_cross_attention"):
        if c.get(field):
            raise ValueError(f"{source}: {field}=true is not supported; qkv reads BERT as an encoder only")
    if c["hidden_act"] not in _ACTIVATION_IN:
        raise ValueError(f"{source}: hidden_act={c['hidden_act']!r} is not supported; qkv reads "
                         f"{', '.join(_ACTIVATION_IN)}")
    pad = c.get("pad_token_id")
    return ModelConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_heads=c["num_attention_heads"],
        d_ff=c["intermediate_size"], n_encoder_layers=c["num_hidden_layers"], n_decoder_layers=0,
        max_seq_len=c["max_position_embeddings"], dropout=c["hidden_dropout_prob"],
        attention_dropout=c["attention_probs_dropout_prob"], activation=_ACTIVATION_IN[c["hidden_act"]],
        norm="layernorm", norm_position="post", layer_norm_eps=c["layer_norm_eps"], positional="learned",
        n_token_types=c["type_vocab_size"], embedding_norm=True, final_norm=False, bias=True,
        scale_embeddings=False, init_std=c["initializer_range"],
        pad_token_id=pad if isinstance(pad, int) and 0 <= pad < c["vocab_size"] else None,
    )


def bert_rules(config: ModelConfig) -> list[Rule]:
    """Where each qkv ``Encoder`` tensor lives in a BERT file (names without the ``bert.`` prefix)."""

    def layer(i: int) -> list[Rule]:
        q, h = f"layers.layers.{i}.", f"encoder.layer.{i}."
        rules = []
        for part in ("weight", "bias"):
            rules += [
                Rule(q + f"self_attn.qkv.{part}",
                     tuple(h + f"attention.self.{m}.{part}" for m in ("query", "key", "value"))),
                Rule(q + f"self_attn.out.{part}", (h + f"attention.output.dense.{part}",)),
                Rule(q + f"self_attn_norm.{part}", (h + f"attention.output.LayerNorm.{part}",)),
                Rule(q + f"ffn.w1.{part}", (h + f"intermediate.dense.{part}",)),
                Rule(q + f"ffn.w2.{part}", (h + f"output.dense.{part}",)),
                Rule(q + f"ffn_norm.{part}", (h + f"output.LayerNorm.{part}",)),
            ]
        return rules

    e = "embeddings."
    rules = [Rule("embed.token.weight", (e + "word_embeddings.weight",)),
             Rule("embed.positional.weight.weight", (e + "position_embeddings.weight",))]
    if config.n_token_types:
        rules.append(Rule("embed.token_type.weight", (e + "token_type_embeddings.weight",)))
    rules += [Rule("embed.norm.weight", (e + "LayerNorm.weight",)), Rule("embed.norm.bias", (e + "LayerNorm.bias",))]
    return rules + layer_rules(config.n_encoder_layers, layer)


def _modern_names(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original Google BERT conversions call LayerNorm's weight and bias ``gamma`` and ``beta``."""
    def rename(name: str) -> str:
        if ".LayerNorm." in name:
            return name.replace(".gamma", ".weight").replace(".beta", ".bias")
        return name

    return {rename(k): v for k, v in weights.items()}


def load_bert(directory: str | Path, *, dtype: torch.dtype | None = torch.float32,
              tokenizer: bool = True) -> tuple[Encoder, Tokenizer | None]:
    """A Hugging Face BERT directory → (qkv ``Encoder`` in eval mode, its WordPiece tokenizer)."""
    directory = Path(directory)
    hf = read_config(directory)
    model_type_of(hf, directory, ["bert"])
    config = config_from_bert(hf, str(directory / "config.json"))
    weights = _modern_names(strip_prefix(load_weights(directory), ["bert."]))
    ignore = matches(r"embeddings\.position_ids", r"pooler\..*", r"cls\..*")
    model = build_with_weights(Encoder, config, weights, bert_rules(config), ignore=ignore, source=str(directory),
                               dtype=dtype)
    return model, (check_fits(bert_tokenizer(directory), config.vocab_size, directory) if tokenizer else None)


# --------------------------------------------------------------------------------------------------------------
# Sentence embeddings.
# --------------------------------------------------------------------------------------------------------------


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """e = Σ_t m_t h_t / Σ_t m_t: the average of the hidden states of the real (unpadded) tokens."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str], max_len: int,
                 pad_id: int | None = None) -> tuple[Tensor, Tensor]:
    """Texts → right-padded ids (batch, seq) and the mask (True at real tokens), with the tokenizer's own
    special tokens (BERT: [CLS] … [SEP]). A text longer than ``max_len`` tokens is an error."""
    if isinstance(texts, str) or not texts:
        raise ValueError("pass a non-empty list of texts")
    try:
        batch = tokenizer.backend.encode_batch(list(texts), add_special_tokens=True)
    except Exception:
        for text in texts:  # the precise error (which characters the vocabulary lacks) for the text at fault
            tokenizer.encode(text)
        raise
    # keep only real tokens, in case the tokenizer file switches padding on
    encoded = [[i for i, real in zip(e.ids, e.attention_mask, strict=True) if real] for e in batch]
    for i, ids in enumerate(encoded):
        if len(ids) > max_len:
            raise ValueError(f"text {i + 1} is {len(ids)} tokens long, more than the model's max_seq_len={max_len}; "
                             "shorten it or split it into parts")
        if not ids:
            raise ValueError(f"text {i + 1} ({texts[i]!r}) has no tokens; pass non-empty text")
    pad = pad_id if pad_id is not None else (tokenizer.pad_id or 0)
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    return ids, mask


@torch.no_grad()
def embed_texts(model: Encoder | DecoderLM | Transformer, tokenizer: Tokenizer, texts: Sequence[str], *,
                pooling: str = "mean", normalize: bool = True, batch_size: int = 32) -> Tensor:
    """Sentence embeddings (n_texts, d_model): the encoder's hidden states mean-pooled over real tokens
    (``pooling="cls"``: the first token's), then L2-normalised so that dot products are cosine similarities."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling={pooling!r} is not one of 'mean', 'cls'")
    core = unwrap(model)  # the qkv model inside a wrapper (peft, torch.compile, DDP); the wrapper runs it
    out = []
    with evaluating(model):
        for start in range(0, len(texts), batch_size):
            ids, mask = encode_batch(tokenizer, texts[start : start + batch_size], core.config.max_seq_len,
                                     core.config.pad_token_id)
            if core.model_type == "encoder":
                hidden = model(ids, mask)
            elif core.model_type == "decoder":
                hidden = model(ids, mask, return_hidden=True)
            else:  # an encoder-decoder: its encoder's output (a method no wrapper routes)
                hidden = core.encode(ids, mask)
            pooled = mean_pool(hidden, mask) if pooling == "mean" else hidden[:, 0]
            out.append(F.normalize(pooled, dim=-1) if normalize else pooled)
    return torch.cat(out)
