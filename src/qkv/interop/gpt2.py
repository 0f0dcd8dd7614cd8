"""Hugging Face GPT-2 ⇄ qkv ``DecoderLM``, tensor for tensor.

GPT-2 is a pre-LN decoder-only Transformer with learned positions, the tanh approximation of GELU
("gelu_new"), a final LayerNorm (``ln_f``) and an output projection tied to the token embedding. Its names map
onto qkv's like this (``Conv1D`` weights are stored (in, out), the transpose of ``nn.Linear``'s (out, in)):

    wte / wpe                  → embed.token / embed.positional.weight
    h.i.ln_1, h.i.ln_2         → layers.layers.i.self_attn_norm, .ffn_norm
    h.i.attn.c_attn [Q|K|V]    → layers.layers.i.self_attn.qkv      (transposed)
    h.i.attn.c_proj            → layers.layers.i.self_attn.out      (transposed)
    h.i.mlp.c_fc, mlp.c_proj   → layers.layers.i.ffn.w1, ffn.w2     (transposed)
    ln_f                       → layers.norm
    lm_head (untied only)      → lm_head
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..models import DecoderLM
from ..tokenizers import Tokenizer
from .hf import (
    Rule,
    build_with_weights,
    check_exportable,
    decoder_to_save,
    from_qkv_state_dict,
    layer_rules,
    load_weights,
    matches,
    model_type_of,
    read_config,
    strip_prefix,
    write_hf_directory,
)
from .hf_tokenizers import check_fits, config_with_roles, gpt2_tokenizer

__all__ = ["config_from_gpt2", "config_to_gpt2", "gpt2_rules", "load_gpt2", "save_gpt2"]

# Hugging Face activation_function → qkv activation. gelu_new, gelu_fast and gelu_pytorch_tanh are three
# implementations of one formula: 0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³))).
_ACTIVATION_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
_ACTIVATION_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}

# GPT2Config's defaults, for configs that leave a field out.
_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                 layer_norm_epsilon=1e-5, initializer_range=0.02, tie_word_embeddings=True,
                 bos_token_id=50256, eos_token_id=50256)


def config_from_gpt2(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A GPT-2 ``config.json`` → the qkv ``ModelConfig`` of the same network; unsupported options are errors."""
    c = {**_DEFAULTS, **hf}
    unsupported = {"scale_attn_weights": (c.get("scale_attn_weights", True), True),
                   "scale_attn_by_inverse_layer_idx": (c.get("scale_attn_by_inverse_layer_idx", False), False),
                   "add_cross_attention": (c.get("add_cross_attention", False), False)}
    for field, (value, needed) in unsupported.items():
        if bool(value) != needed:
            raise ValueError(f"{source}: {field}={value!r} is not supported by qkv's GPT-2 import "
                             f"(qkv computes attention as in the original GPT-2, {field}={needed})")
    activation = c["activation_function"]
    if activation not in _ACTIVATION_IN:
        raise ValueError(f"{source}: activation_function={activation!r} is not supported; qkv reads "
                         f"{', '.join(_ACTIVATION_IN)}")
    vocab = c["vocab_size"]

    def token(name: str) -> int | None:
        value = c.get(name)
        return value if isinstance(value, int) and 0 <= value < vocab else None

    return ModelConfig(
        vocab_size=vocab, d_model=c["n_embd"], n_heads=c["n_head"], d_ff=c["n_inner"] or 4 * c["n_embd"],
        n_encoder_layers=0, n_decoder_layers=c["n_layer"], max_seq_len=c["n_positions"],
        dropout=c["resid_pdrop"], attention_dropout=c["attn_pdrop"], activation=_ACTIVATION_IN[activation],
        norm="layernorm", norm_position="pre", layer_norm_eps=c["layer_norm_epsilon"], positional="learned",
        tie_embeddings=bool(c["tie_word_embeddings"]), scale_embeddings=False, bias=True, final_norm=True,
        init_std=c["initializer_range"], bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"),
    )


def config_to_gpt2(config: ModelConfig) -> dict[str, Any]:
    """A qkv ``ModelConfig`` → a GPT-2 ``config.json``; an option GPT-2 cannot express is an error naming it."""
    needed = {"positional": "learned", "norm": "layernorm", "norm_position": "pre", "bias": True,
              "scale_embeddings": False, "embedding_norm": False, "n_token_types": 0, "n_encoder_layers": 0}
    check_exportable(config, "GPT-2", needed, "a LayerNorm (ln_f)")
    if config.n_kv_heads not in (None, config.n_heads):
        raise ValueError(f"cannot save as GPT-2: n_kv_heads={config.n_kv_heads} (grouped-query attention); GPT-2 "
                         "gives every head its own keys and values: use n_kv_heads=None")
    if config.activation not in _ACTIVATION_OUT:
        raise ValueError(f"cannot save as GPT-2: activation={config.activation!r}; GPT-2 files can say "
                         f"{', '.join(_ACTIVATION_OUT)}")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.max_seq_len, "n_embd": config.d_model,
        "n_layer": config.n_decoder_layers, "n_head": config.n_heads, "n_inner": config.d_ff,
        "activation_function": _ACTIVATION_OUT[config.activation], "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout, "attn_pdrop": config.attn_dropout,
        "layer_norm_epsilon": config.layer_norm_eps, "initializer_range": config.init_std,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "use_cache": True,
    }


def gpt2_rules(config: ModelConfig) -> list[Rule]:
    """Where each qkv tensor of a GPT-2-shaped ``DecoderLM`` lives in a GPT-2 file (names without prefix)."""

    def layer(i: int) -> list[Rule]:
        q, h = f"layers.layers.{i}.", f"h.{i}."
        return [
            Rule(q + "self_attn_norm.weight", (h + "ln_1.weight",)),
            Rule(q + "self_attn_norm.bias", (h + "ln_1.bias",)),
            Rule(q + "self_attn.qkv.weight", (h + "attn.c_attn.weight",), transpose=True),
            Rule(q + "self_attn.qkv.bias", (h + "attn.c_attn.bias",)),
            Rule(q + "self_attn.out.weight", (h + "attn.c_proj.weight",), transpose=True),
            Rule(q + "self_attn.out.bias", (h + "attn.c_proj.bias",)),
            Rule(q + "ffn_norm.weight", (h + "ln_2.weight",)),
            Rule(q + "ffn_norm.bias", (h + "ln_2.bias",)),
            Rule(q + "ffn.w1.weight", (h + "mlp.c_fc.weight",), transpose=True),
            Rule(q + "ffn.w1.bias", (h + "mlp.c_fc.bias",)),
            Rule(q + "ffn.w2.weight", (h + "mlp.c_proj.weight",), transpose=True),
            Rule(q + "ffn.w2.bias", (h + "mlp.c_proj.bias",)),
        ]

    rules = [Rule("embed.token.weight", ("wte.weight",)), Rule("embed.positional.weight.weight", ("wpe.weight",))]
    rules += layer_rules(config.n_decoder_layers, layer)
    rules += [Rule("layers.norm.weight", ("ln_f.weight",)), Rule("layers.norm.bias", ("ln_f.bias",))]
    if not config.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return rules


def load_gpt2(directory: str | Path, *, dtype: torch.dtype | None = torch.float32,
              tokenizer: bool = True) -> tuple[DecoderLM, Tokenizer | None]:
    """A Hugging Face GPT-2 directory → (qkv ``DecoderLM`` in eval mode, its tokenizer).

    The tokenizer comes from the directory's ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, else it is
    GPT-2's original one (see ``qkv.interop.hf_tokenizers``); the model's bos/eos/pad ids are the ones the
    tokenizer's files state (config.json's where they say nothing, or with ``tokenizer=False``). ``dtype=None``
    keeps the stored precision.
    """
    directory = Path(directory)
    hf = read_config(directory)
    model_type_of(hf, directory, ["gpt2"])
    config = config_from_gpt2(hf, str(directory / "config.json"))
    found = gpt2_tokenizer(directory) if tokenizer else None
    config = config_with_roles(config, found)  # the bos/eos/pad ids the tokenizer's files state
    weights = strip_prefix(load_weights(directory), ["transformer."])
    # attn.bias / attn.masked_bias are causal-mask buffers older files carry; a tied lm_head repeats wte.
    ignore = matches(r"h\.\d+\.attn\.(masked_)?bias", *(["lm_head\\.weight"] if config.tie_embeddings else []))
    model = build_with_weights(DecoderLM, config, weights, gpt2_rules(config), ignore=ignore,
                               source=str(directory), dtype=dtype)
    return model, (check_fits(found, config.vocab_size, directory) if found is not None else None)


def save_gpt2(model: DecoderLM, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write a qkv ``DecoderLM`` as a Hugging Face GPT-2 directory (``GPT2LMHeadModel.from_pretrained`` reads it).

    Files: ``config.json``, ``model.safetensors`` (tensor names as ``save_pretrained`` writes them), and the
    tokenizer's ``tokenizer.json`` when one is given. A model wrapped by torch.compile, DDP or FSDP is saved as
    the model inside; one with peft adapters is refused (merge them first: ``model.merge_and_unload()``).
    """
    model = decoder_to_save(model, "GPT-2", "save_gpt2(model.merge_and_unload(), DIR)")
    hf_config = config_to_gpt2(model.config)
    tensors = from_qkv_state_dict(model.state_dict(), gpt2_rules(model.config))
    tensors = {("lm_head.weight" if k == "lm_head.weight" else "transformer." + k): v for k, v in tensors.items()}
    return write_hf_directory(directory, hf_config, tensors, tokenizer)
