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

__all__ = ["ModelConfig", "PRESETS", "FORMAT_VERSION", "ConfigFileHeader", "FieldTypeError", "check_fields"]

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
        # first the types, so that the checks below compare numbers with numbers
        check_fields(ModelConfig, {f.name: getattr(self, f.name) for f in fields(self)})

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
        (``FieldTypeError``, both a TypeError and a ValueError) or out of range (ValueError). The keys a
        config.json holds beside the fields (``ConfigFileHeader``) are type-checked too, then left out.
        """
        if not isinstance(values, dict):
            where = "" if source is None else f"{source}: "
            raise ValueError(f"{where}expected a JSON object of ModelConfig fields, got {type(values).__name__}")
        header = {f.name for f in fields(ConfigFileHeader)}
        check_fields(ConfigFileHeader, {k: v for k, v in values.items() if k in header}, source=source, what="")
        values = check_fields(cls, {k: v for k, v in values.items() if k not in header}, source=source)
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            if source is None:
                raise
            raise type(err)(f"{source}: {err}") from None

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


@dataclass
class ConfigFileHeader:
    """What a qkv config.json holds beside the ``ModelConfig`` fields: who wrote it, in which version of the
    format, and the model's shape (``build_model``'s ``model_type``). Checked by name like the fields."""

    format: str | None = None  # "qkv"
    format_version: int = 0
    model_type: str | None = None  # "decoder", "encoder", "seq2seq"


# -- fields checked by name and type, from a dataclass's own annotations ------------------------------------------
class FieldTypeError(TypeError, ValueError):
    """A field holds a value of the wrong type. A TypeError, as Python calls it, and a ValueError, as a bad file
    is: code that handles either kind of bad input catches it."""


_TYPE_WORDS = {type(None): "null", bool: "a bool (true/false)", int: "an integer", float: "a number",
               str: "a string", dict: "a JSON object", list: "a list"}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation, resolved (``int | None`` → a union of int and NoneType)."""
    return typing.get_type_hints(cls)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _matches(value: Any, kind: Any) -> bool:
    """Is ``value`` of type ``kind``? Strict where Python is lax: a bool must be a real bool (the string "false"
    is truthy and would read as True), an int a real int (not True, not "2"); a float takes ints (JSON writes
    10000.0 as 10000) but not bools or strings."""
    origin = typing.get_origin(kind) or kind
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if dataclasses.is_dataclass(kind):
        return isinstance(value, dict)
    return isinstance(value, origin) if isinstance(origin, type) else True


def _describe(kind: Any) -> str:
    if dataclasses.is_dataclass(kind):
        return "a JSON object"
    origin = typing.get_origin(kind) or kind
    return _TYPE_WORDS.get(origin, getattr(origin, "__name__", str(origin)))


def check_fields(cls: type, values: dict[str, Any], *, source: str | Path | None = None,
                 unknown: str = "refuse", prefix: str = "", what: str | None = None) -> dict[str, Any]:
    """Check ``values`` by name against the fields of the dataclass ``cls`` → ``values``.

    Each value must be of its field's annotated type (``FieldTypeError`` naming the field, the file and what was
    expected); a field without a default must be there (ValueError); an unknown name is refused naming the closest
    field, or kept unchecked with ``unknown="keep"`` (metadata a later qkv may add). A field whose type is itself
    such a dataclass, or a list of them, is checked the same way, its name dotted (``run.split_seed``).
    ``source``: the file the values came from, named first in every error; ``what``: the words before "field"
    in them (default: the class's name).
    """
    where = "" if source is None else f"{source}: "
    field_of = f"{cls.__name__ if what is None else what} field".lstrip()  # "ModelConfig field", "field"
    known = {f.name: f for f in fields(cls)}
    for key in values:
        if key not in known and unknown != "keep":
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
            raise ValueError(f"{where}unknown {field_of} {prefix}{key!r}{hint}")
    for name, field in known.items():
        if name not in values:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}{field_of} {prefix}{name} is missing")
            continue
        value, annotation = values[name], _field_types(cls)[name]
        allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        kind = next((k for k in allowed if _matches(value, k)), None)
        if kind is None:
            expected = " or ".join(_describe(k) for k in allowed)
            raise FieldTypeError(f"{where}{field_of} {prefix}{name}={_short(value)} must be {expected}, "
                                 f"got {type(value).__name__}")
        item = (typing.get_args(kind) or (None,))[0] if typing.get_origin(kind) is list else None
        if dataclasses.is_dataclass(kind):
            check_fields(kind, value, source=source, unknown=unknown, prefix=f"{prefix}{name}.", what=what)
        elif item is not None:
            for i, entry in enumerate(value):
                if dataclasses.is_dataclass(item) and isinstance(entry, dict):
                    check_fields(item, entry, source=source, unknown=unknown, prefix=f"{prefix}{name}[{i}].",
                                 what=what)
                elif not _matches(entry, item):
                    raise FieldTypeError(f"{where}{field_of} {prefix}{name}[{i}]={_short(entry)} must be "
                                         f"{_describe(item)}, got {type(entry).__name__}")
    return values


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
