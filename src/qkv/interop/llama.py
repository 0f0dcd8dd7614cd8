"""Hugging Face LLaMA-style models ⇄ qkv ``DecoderLM``, tensor for tensor (LLaMA 2/3 layout, SmolLM2, TinyLlama).

LLaMA is a pre-norm decoder-only Transformer with RMSNorm, rotary positions (RoPE, "rotate half" pairing),
grouped-query attention (``num_key_value_heads`` ≤ ``num_attention_heads``), a SwiGLU feed-forward
(silu(x W_gate) ⊙ x W_up) W_down and no biases. Its names map onto qkv's like this:

    model.embed_tokens                      → embed.token
    model.layers.i.input_layernorm          → layers.layers.i.self_attn_norm
    model.layers.i.self_attn.{q,k,v}_proj   → layers.layers.i.self_attn.qkv   ([W_Q | W_K | W_V], rows h·d_k,
                                                                                 h_kv·d_k, h_kv·d_k)
    model.layers.i.self_attn.o_proj         → layers.layers.i.self_attn.out
    model.layers.i.post_attention_layernorm → layers.layers.i.ffn_norm
    model.layers.i.mlp.{gate,up}_proj       → layers.layers.i.ffn.w1          ([W_gate | W_up])
    model.layers.i.mlp.down_proj            → layers.layers.i.ffn.w2
    model.norm                              → layers.norm
    lm_head (untied only)                   → lm_head

Options qkv does not compute (RoPE scaling, biases, a head size other than hidden_size / heads) are errors
naming the field, never silently different numbers.
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
    write_hf_directory,
)
from .hf_tokenizers import check_fits, config_with_roles, load_tokenizer_json

__all__ = ["config_from_llama", "config_to_llama", "llama_rules", "load_llama", "save_llama"]

# LlamaConfig's defaults, for configs that leave a field out.
_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                 initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                 mlp_bias=False, attention_dropout=0.0, bos_token_id=1, eos_token_id=2)


def _rope_theta(c: dict[str, Any], source: str) -> float:
    """RoPE's base θ from either spelling (``rope_theta`` + ``rope_scaling``, or transformers 5's
    ``rope_parameters``); any rescaling of the frequencies (linear, dynamic, yarn, llama3) is an error."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"{source}: RoPE scaling {kind!r} is not supported; qkv computes plain RoPE "
                         "(rope_type 'default'), so this model's positions would come out different")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def config_from_llama(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A LLaMA ``config.json`` → the qkv ``ModelConfig`` of the same network; unsupported options are errors."""
    c = {**_DEFAULTS, **hf}
    for field in ("attention_bias", "mlp_bias"):
        if c[field]:
            raise ValueError(f"{source}: {field}=true is not supported; qkv reads LLaMA models without biases")
    if c["hidden_act"] != "silu":
        raise ValueError(f"{source}: hidden_act={c['hidden_act']!r} is not supported; LLaMA's SwiGLU uses 'silu'")
    heads, d = c["num_attention_heads"], c["hidden_size"]
    head_dim = c.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise ValueError(f"{source}: head_dim={head_dim} with {heads} heads is not hidden_size={d}; qkv's heads "
                         "split d_model evenly (d_k = hidden_size / num_attention_heads)")
    kv_heads = c["num_key_value_heads"] or heads
    vocab = c["vocab_size"]

    def token(name: str) -> int | None:
        value = c.get(name)
        value = value[0] if isinstance(value, list) and value else value  # some configs list several eos ids
        return value if isinstance(value, int) and 0 <= value < vocab else None

    return ModelConfig(
        vocab_size=vocab, d_model=d, n_heads=heads, n_kv_heads=None if kv_heads == heads else kv_heads,
        d_ff=c["intermediate_size"], n_encoder_layers=0, n_decoder_layers=c["num_hidden_layers"],
        max_seq_len=c["max_position_embeddings"], dropout=0.0, attention_dropout=c["attention_dropout"],
        activation="swiglu", norm="rmsnorm", norm_position="pre", layer_norm_eps=c["rms_norm_eps"],
        positional="rope", rope_base=_rope_theta(c, source), tie_embeddings=bool(c["tie_word_embeddings"]),
        scale_embeddings=False, bias=False, final_norm=True, init_std=c["initializer_range"],
        bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"),
        pad_token_id=token("pad_token_id"),
    )


def config_to_llama(config: ModelConfig) -> dict[str, Any]:
    """A qkv ``ModelConfig`` → a LLaMA ``config.json``; an option LLaMA cannot express is an error naming it."""
    needed = {"positional": "rope", "norm": "rmsnorm", "norm_position": "pre", "activation": "swiglu",
              "bias": False, "scale_embeddings": False, "embedding_norm": False, "n_token_types": 0,
              "n_encoder_layers": 0}
    check_exportable(config, "LLaMA", needed, "an RMSNorm (model.norm)")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_decoder_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads or config.n_heads, "head_dim": config.d_k,
        "hidden_act": "silu", "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.layer_norm_eps,
        "rope_theta": config.rope_base, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": config.attn_dropout, "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id, "use_cache": True,
    }


def llama_rules(config: ModelConfig) -> list[Rule]:
    """Where each qkv tensor of a LLaMA-shaped ``DecoderLM`` lives in a LLaMA file (full names)."""
    q_rows, kv_rows = config.n_heads * config.d_k, (config.n_kv_heads or config.n_heads) * config.d_k

    def layer(i: int) -> list[Rule]:
        q, h = f"layers.layers.{i}.", f"model.layers.{i}."
        return [
            Rule(q + "self_attn_norm.weight", (h + "input_layernorm.weight",)),
            Rule(q + "self_attn.qkv.weight", tuple(h + f"self_attn.{m}_proj.weight" for m in "qkv"),
                 rows=(q_rows, kv_rows, kv_rows)),
            Rule(q + "self_attn.out.weight", (h + "self_attn.o_proj.weight",)),
            Rule(q + "ffn_norm.weight", (h + "post_attention_layernorm.weight",)),
            Rule(q + "ffn.w1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")),
            Rule(q + "ffn.w2.weight", (h + "mlp.down_proj.weight",)),
        ]

    rules = [Rule("embed.token.weight", ("model.embed_tokens.weight",))]
    rules += layer_rules(config.n_decoder_layers, layer)
    rules.append(Rule("layers.norm.weight", ("model.norm.weight",)))
    if not config.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return rules


def load_llama(directory: str | Path, *, dtype: torch.dtype | None = torch.float32,
               tokenizer: bool = True) -> tuple[DecoderLM, Tokenizer | None]:
    """A Hugging Face LLaMA-style directory → (qkv ``DecoderLM`` in eval mode, its tokenizer or None).

    The tokenizer is the directory's ``tokenizer.json`` (None when there is none: a SentencePiece-only
    ``tokenizer.model`` is not read); the model's bos/eos/pad ids are the ones its files state (config.json's
    where they say nothing, or with ``tokenizer=False``). ``dtype=None`` keeps the stored precision (SmolLM2
    ships bf16).
    """
    directory = Path(directory)
    hf = read_config(directory)
    model_type_of(hf, directory, ["llama"])
    config = config_from_llama(hf, str(directory / "config.json"))
    found = load_tokenizer_json(directory) if tokenizer else None
    config = config_with_roles(config, found)  # the bos/eos/pad ids the tokenizer's files state
    # rotary_emb.inv_freq: a buffer older files carry; a tied lm_head repeats embed_tokens.
    ignore = matches(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
                     *(["lm_head\\.weight"] if config.tie_embeddings else []))
    model = build_with_weights(DecoderLM, config, load_weights(directory), llama_rules(config), ignore=ignore,
                               source=str(directory), dtype=dtype)
    return model, (check_fits(found, config.vocab_size, directory) if found is not None else None)


def save_llama(model: DecoderLM, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write a qkv ``DecoderLM`` as a Hugging Face LLaMA directory (``LlamaForCausalLM.from_pretrained`` reads it).

    Files: ``config.json``, ``model.safetensors`` (names as ``save_pretrained`` writes them), and the
    tokenizer's ``tokenizer.json`` when one is given. A model wrapped by torch.compile, DDP or FSDP is saved as
    the model inside; one with peft adapters is refused (merge them first: ``model.merge_and_unload()``).
    """
    model = decoder_to_save(model, "LLaMA", "save_llama(model.merge_and_unload(), DIR)")
    hf_config = config_to_llama(model.config)  # refuses what LLaMA cannot express before anything is written
    tensors = from_qkv_state_dict(model.state_dict(), llama_rules(model.config))
    return write_hf_directory(directory, hf_config, tensors, tokenizer)
