"""Weights and tokenizers in and out of other formats (Hugging Face GPT-2, BERT and LLaMA-style models, GGUF).

``qkv.load(DIR)`` reaches this package for any directory whose ``config.json`` names a Hugging Face
``model_type``, and for ``.gguf`` files; nothing here needs ``transformers`` (GGUF needs the ``gguf`` package).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..tokenizers import Tokenizer
from .bert import embed_texts, load_bert, mean_pool
from .gguf import load_gguf, smollm2_gguf
from .gpt2 import load_gpt2, save_gpt2
from .hf import model_type_of, read_config
from .hf_tokenizers import bert_tokenizer, gpt2_tokenizer
from .llama import load_llama, save_llama

__all__ = ["is_hf_directory", "load_hf", "load_gpt2", "save_gpt2", "load_bert", "load_llama", "save_llama",
           "load_gguf", "smollm2_gguf", "gpt2_tokenizer", "bert_tokenizer", "embed_texts", "mean_pool", "HF_LOADERS"]

HF_LOADERS = {"gpt2": load_gpt2, "bert": load_bert, "llama": load_llama}


def is_hf_directory(path: str | Path) -> bool:
    """Does ``path`` look like a Hugging Face model directory (a ``config.json`` with a ``model_type``)?"""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") != "qkv" and "model_type" in data


def load_hf(path: str | Path, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = torch.float32) -> tuple[nn.Module, Tokenizer | None]:
    """A Hugging Face GPT-2, BERT or LLaMA-style directory → (qkv model in eval mode, tokenizer)."""
    path = Path(path)
    kind = model_type_of(read_config(path), path, HF_LOADERS)
    model, tokenizer = HF_LOADERS[kind](path, dtype=dtype)
    return model.to(device), tokenizer
