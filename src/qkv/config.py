"""``ModelConfig``: the one dataclass every qkv model is built from, and its named presets."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .positions import POSITIONAL_KINDS

__all__ = ["ModelConfig", "PRESETS", "FORMAT_VERSION"]

FORMAT_VERSION = 1
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("post", "pre")


@dataclass
class ModelConfig:
    """Every hyperparameter of a qkv model. The model classes read nothing else.

    Which layers a model uses follows from its class: ``Encoder`` uses ``n_encoder_layers``, ``DecoderLM`` uses
    ``n_decoder_layers``, ``Transformer`` (encoder-decoder) both.
    """

    vocab_size: int = 65
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads
    d_ff: int = 512
    n_encoder_layers: int = 0
    n_decoder_layers: int = 4
    max_seq_len: int = 256
    dropout: float = 0.0
    attention_dropout: float | None = None  # defaults to ``dropout``
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_position: str = "pre"  # "post": LN(x + f(x)) as in the paper; "pre": x + f(LN(x)) as in GPT-2
    layer_norm_eps: float = 1e-5
    positional: str = "learned"
    rope_base: float = 10000.0
    tie_embeddings: bool = True  # share the token embedding with the output projection (and across sides)
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model), as the paper does
    bias: bool = True  # biases in attention and feed-forward projections
    fused_qkv: bool = True  # one [W_Q | W_K | W_V] module; False: q, k, v modules (an adapter per part)
    final_norm: bool | None = None  # a norm after the last block; default: True for pre-LN, False for post-LN
    embedding_norm: bool = False  # a norm right after the embeddings (BERT)
    n_token_types: int = 0  # segment embeddings (BERT uses 2)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for f in fields(self):  # first the types, so that the checks below compare numbers with numbers
            _check_type(f.name, getattr(self, f.name), _field_types()[f.name])

        def positive(name: str) -> None:
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")

        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_seq_len"):
            positive(name)
        for name in ("n_encoder_layers", "n_decoder_layers", "n_token_types"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"pick d_model a multiple of {self.n_heads} (each head gets d_k = d_model / n_heads)"
            )
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads != 0):
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must lie in [0, 1)")
        for name, allowed in (
            ("activation", ACTIVATIONS),
            ("norm", NORMS),
            ("norm_position", NORM_POSITIONS),
            ("positional", POSITIONAL_KINDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.positional == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"positional='sinusoidal' pairs sin/cos dimensions: d_model={self.d_model} must be even")
        if self.positional == "rope" and self.d_k % 2:
            raise ValueError(f"positional='rope' rotates pairs of dimensions: d_k={self.d_k} must be even")
        if not 0 < self.layer_norm_eps < math.inf:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps} must be a positive finite number (e.g. 1e-5)")
        if not 0 < self.rope_base < math.inf:
            raise ValueError(f"rope_base={self.rope_base} must be a positive finite number (e.g. 10000.0)")
        if not 0 <= self.init_std < math.inf:
            raise ValueError(f"init_std={self.init_std} must be a finite number >= 0 (e.g. 0.02)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} must lie in [0, vocab_size={self.vocab_size})")

    # Derived values -------------------------------------------------------------------------------------------
    @property
    def d_k(self) -> int:
        """The size of each head's queries, keys and values: d_model / n_heads."""
        return self.d_model // self.n_heads

    @property
    def use_final_norm(self) -> bool:
        return self.norm_position == "pre" if self.final_norm is None else self.final_norm

    @property
    def attn_dropout(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    # Presets and (de)serialisation ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named configuration (see ``PRESETS``), with any field overridden by keyword."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown preset {name!r}{hint}; available: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str | Path | None = None) -> ModelConfig:
        """Build from a mapping; an unknown key is an error that names the closest field.

        ``source`` (the file the values were read from) is named in every error: a value of the wrong type
        (TypeError) or out of range (ValueError).
        """
        values = {k: v for k, v in values.items() if k not in ("format", "format_version", "model_type")}
        known = cls.field_names()
        where = "" if source is None else f"{source}: "
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
                raise ValueError(f"{where}unknown ModelConfig field {key!r}{hint}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            if source is None:
                raise
            raise type(err)(f"{where}{err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> ModelConfig:
        return self.from_dict({**self.to_dict(), **overrides})

    def save(self, path: str | Path, model_type: str | None = None) -> None:
        data = {"format": "qkv", "format_version": FORMAT_VERSION}
        if model_type is not None:
            data["model_type"] = model_type
        Path(path).write_text(json.dumps({**data, **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a config.json that ``save`` wrote; errors name the file and the field."""
        return cls.from_dict(json.loads(Path(path).read_text()), source=path)


@functools.cache
def _field_types() -> dict[str, Any]:
    """Each field's annotation, resolved (``int | None`` → a union of int and NoneType)."""
    return typing.get_type_hints(ModelConfig)


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """Raise TypeError unless ``value`` is of the field's annotated type.

    Strict where Python is lax: a bool must be a real bool (the string "false" is truthy and would read as True),
    an int a real int (not True, not "2"); a float field takes ints (JSON writes 10000.0 as 10000) but not bools
    or strings.
    """
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return
        if kind is bool and isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if kind is str and isinstance(value, str):
            return
    expected = " or ".join({type(None): "null", bool: "a bool (true/false)", int: "an integer",
                            float: "a number", str: "a string"}[k] for k in allowed)
    raise TypeError(f"ModelConfig field {name}={value!r} must be {expected}, got {type(value).__name__}")


_VASWANI = dict(
    vocab_size=37000, d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6,
    max_seq_len=512, dropout=0.1, activation="relu", norm_position="post", positional="sinusoidal",
    tie_embeddings=True, scale_embeddings=True, layer_norm_eps=1e-6,
)

PRESETS: dict[str, dict[str, Any]] = {
    # "Attention Is All You Need", base and big (Table 3), one shared source/target vocabulary.
    "vaswani-base": _VASWANI,
    "vaswani-big": {**_VASWANI, "d_model": 1024, "n_heads": 16, "d_ff": 4096, "dropout": 0.3},
    # The base model scaled down to train on 2 CPU cores in an hour (qkv.translation's recipe): same shape,
    # post-LN, sinusoidal, shared embeddings, dropout 0.1; a shared BPE vocabulary of 8000. init_std 0.06 is about
    # the paper's Xavier init at d_model 256 (sqrt(2 / (256 + 256))); 0.02 measured ~50 steps behind at step 100.
    "vaswani-small": {**_VASWANI, "vocab_size": 8000, "d_model": 256, "n_heads": 4, "d_ff": 1024,
                      "n_encoder_layers": 3, "n_decoder_layers": 3, "max_seq_len": 256, "init_std": 0.06},
    # GPT-2 small (124M): decoder-only, pre-LN, learned positions, tanh-approximated GELU.
    "gpt2-small": dict(
        vocab_size=50257, d_model=768, n_heads=12, d_ff=3072, n_encoder_layers=0, n_decoder_layers=12,
        max_seq_len=1024, dropout=0.1, activation="gelu_tanh", norm_position="pre", positional="learned",
        tie_embeddings=True, layer_norm_eps=1e-5, bos_token_id=50256, eos_token_id=50256,
    ),
    # BERT base: encoder-only, post-LN, learned positions, segment embeddings, LayerNorm on the embeddings.
    "bert-base": dict(
        vocab_size=30522, d_model=768, n_heads=12, d_ff=3072, n_encoder_layers=12, n_decoder_layers=0,
        max_seq_len=512, dropout=0.1, activation="gelu", norm_position="post", positional="learned",
        layer_norm_eps=1e-12, n_token_types=2, embedding_norm=True, pad_token_id=0,
    ),
    # Small models for tests, the demo and teaching.
    "tiny-decoder": dict(
        vocab_size=65, d_model=64, n_heads=4, d_ff=256, n_encoder_layers=0, n_decoder_layers=2,
        max_seq_len=128, positional="learned", norm_position="pre",
    ),
    "tiny-encoder": dict(
        vocab_size=65, d_model=64, n_heads=4, d_ff=256, n_encoder_layers=2, n_decoder_layers=0,
        max_seq_len=128, positional="sinusoidal", norm_position="pre",
    ),
    "tiny-seq2seq": dict(
        vocab_size=32, d_model=64, n_heads=4, d_ff=256, n_encoder_layers=2, n_decoder_layers=2,
        max_seq_len=64, positional="sinusoidal", norm_position="pre", activation="relu",
    ),
}
