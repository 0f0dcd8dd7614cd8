"""ModelConfig: presets, validation with helpful errors, and parameter counts against independent references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv import ModelConfig, MultiHeadAttention, build_model
from qkv.config import PRESETS
from qkv.models import DecoderLM, Encoder, Transformer, parameter_counts


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) tensors are counted once


def meta_model(name: str, **overrides):
    with torch.device("meta"):  # shapes only: no memory, no time
        return build_model(ModelConfig.preset(name, **overrides))


# --------------------------------------------------------------------------------------------------------------
# Parameter counts.
# --------------------------------------------------------------------------------------------------------------


def test_vaswani_base_has_the_papers_65_million_parameters() -> None:
    model = meta_model("vaswani-base", vocab_size=37000)
    total = model.num_parameters()
    assert isinstance(model, Transformer)
    assert abs(total - 65e6) / 65e6 <= 0.05, total
    # PyTorch's nn.Transformer of the same shape plus one shared (source = target = output) embedding:
    with torch.device("meta"):
        reference = nn.Transformer(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                                   dim_feedforward=2048, batch_first=True)
    reference_total = n_params(reference) + 37000 * 512
    assert round(reference_total / 1e6, 1) == 63.1
    # The only difference: nn.Transformer adds a final LayerNorm after each stack; the post-LN paper model
    # ends every block with a LayerNorm already and has none extra (2 norms x (gain + bias) x 512).
    assert total == reference_total - 2 * 2 * 512


def test_vaswani_big_has_the_papers_213_million_parameters() -> None:
    total = meta_model("vaswani-big", vocab_size=37000).num_parameters()
    assert abs(total - 213e6) / 213e6 <= 0.05, total


def test_gpt2_small_has_exactly_hugging_faces_parameter_count() -> None:
    transformers = pytest.importorskip("transformers")
    model = meta_model("gpt2-small")
    assert isinstance(model, DecoderLM)
    assert model.num_parameters() == 124_439_808
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    assert n_params(hf) == 124_439_808
    # Not only the total: the same tensors, size by size (HF's Conv1D stores W transposed, so compare sizes).
    assert sorted(p.numel() for p in model.parameters()) == sorted(p.numel() for p in hf.parameters())


def test_bert_base_matches_hugging_faces_bert_without_pooler() -> None:
    transformers = pytest.importorskip("transformers")
    model = meta_model("bert-base")
    assert isinstance(model, Encoder)
    with torch.device("meta"):
        hf = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False)
    assert model.num_parameters() == n_params(hf) == 108_891_648


def test_parameter_counts_per_component_add_up_to_the_total() -> None:
    for name in PRESETS:
        model = meta_model(name)
        counts = parameter_counts(model)
        assert sum(counts.values()) == model.num_parameters(), name
    counts = parameter_counts(meta_model("vaswani-base"))
    d = 512
    attention = 4 * d * d + 4 * d  # W_Q, W_K, W_V, W_O and their biases
    assert counts["embedding: tokens"] == 37000 * d
    assert counts["encoder blocks: self-attention"] == 6 * attention
    assert counts["decoder blocks: cross-attention"] == 6 * attention
    assert counts["encoder blocks: feed-forward"] == 6 * (2 * d * 2048 + 2048 + d)


# --------------------------------------------------------------------------------------------------------------
# Presets and validation.
# --------------------------------------------------------------------------------------------------------------


def test_vaswani_base_preset_is_the_papers_base_model() -> None:
    c = ModelConfig.preset("vaswani-base")
    assert (c.d_model, c.n_heads, c.d_ff, c.n_encoder_layers, c.n_decoder_layers) == (512, 8, 2048, 6, 6)
    assert (c.dropout, c.norm_position, c.positional, c.activation) == (0.1, "post", "sinusoidal", "relu")
    assert c.tie_embeddings and c.scale_embeddings and c.d_k == 64


def test_every_preset_builds_and_overrides_apply() -> None:
    for name in ("vaswani-base", "vaswani-big", "gpt2-small", "bert-base", "tiny-decoder", "tiny-encoder",
                 "tiny-seq2seq"):
        assert name in PRESETS
        meta_model(name)
    c = ModelConfig.preset("tiny-decoder", d_model=96, n_heads=3, positional="rope")
    assert (c.d_model, c.n_heads, c.d_k, c.positional) == (96, 3, 32, "rope")
    assert ModelConfig.preset("tiny-decoder").d_model == 64  # overrides do not leak into the preset


def test_config_round_trips_through_json(tmp_path) -> None:
    c = ModelConfig.preset("gpt2-small", n_decoder_layers=2)
    c.save(tmp_path / "config.json", model_type="decoder")
    assert ModelConfig.load(tmp_path / "config.json") == c
    assert c.replace(n_heads=4) == ModelConfig.preset("gpt2-small", n_decoder_layers=2, n_heads=4)


def test_unknown_preset_names_the_close_match() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'vaswani-bse'.*did you mean 'vaswani-base'"):
        ModelConfig.preset("vaswani-bse")
    with pytest.raises(ValueError, match="available: vaswani-base"):
        ModelConfig.preset("llama-70b")


def test_unknown_override_suggests_the_close_field() -> None:
    with pytest.raises(ValueError, match=r"unknown ModelConfig field 'n_head'.*did you mean 'n_heads'"):
        ModelConfig.preset("tiny-decoder", n_head=4)
    with pytest.raises(ValueError, match=r"'dmodel'.*did you mean 'd_model'"):
        ModelConfig.from_dict({"dmodel": 64})


def test_d_model_must_divide_into_heads() -> None:
    with pytest.raises(ValueError, match="d_model=500 is not divisible by n_heads=8"):
        ModelConfig(d_model=500, n_heads=8)
    with pytest.raises(ValueError, match="d_model=500 is not divisible by n_heads=8"):
        MultiHeadAttention(500, 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"positional": "absolute"}, r"positional='absolute' is not one of sinusoidal, learned"),
        ({"activation": "tanh"}, r"activation='tanh' is not one of relu"),
        ({"norm_position": "middle"}, r"norm_position='middle'"),
        ({"dropout": 1.5}, r"dropout=1.5 must lie in \[0, 1\)"),
        ({"vocab_size": 0}, r"vocab_size=0 must be a positive integer"),
        ({"n_decoder_layers": -1}, r"n_decoder_layers=-1 must be a non-negative integer"),
        ({"d_model": 66, "n_heads": 2, "positional": "rope"}, r"d_k=33 must be even"),
        ({"pad_token_id": 65}, r"pad_token_id=65 must lie in \[0, vocab_size=65\)"),
    ],
)
def test_invalid_values_are_rejected_naming_the_value(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny-decoder", **overrides)
