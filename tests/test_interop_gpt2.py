"""Hugging Face GPT-2 in and out: qkv gives GPT2LMHeadModel's logits, and GPT2LMHeadModel reads what qkv saves.

The reference models are built from configs with random weights (no download), every parameter redrawn with
std 0.2: large enough that a wrong GELU variant or LayerNorm epsilon moves the logits far past the tolerance
(the mutation checks below prove that it does). In GPT-2 small's shapes the LayerNorm gains are drawn around 0,
elsewhere around 1: with gains near 1, twelve layers of width 768 at std 0.2 grow the residual stream until fp32
itself is uncertain at ~2e-3 (Hugging Face's own sdpa and eager paths then disagree by 3e-4, while qkv and
Hugging Face agree to 1e-12 in fp64), which no fp32 tolerance of 1e-4 could survive.
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ["HF_HUB_OFFLINE"] = "1"  # the reference models are built from configs: nothing may be downloaded

import pytest
import torch
import transformers
from safetensors.torch import save_file

import qkv
from qkv.interop import load_gpt2, save_gpt2
from qkv.loading import load

TOL = 1e-4  # fp32 logits
STD = 0.2

# Two configurations: GPT-2 small's exact shapes (GPT2Config's defaults), and a small one that changes every
# option GPT-2 has: exact GELU, an unusual LayerNorm epsilon, n_inner != 4 d, an untied output projection.
SMALL = dict(vocab_size=1000, n_positions=64, n_embd=64, n_layer=3, n_head=4, n_inner=96,
             activation_function="gelu", layer_norm_epsilon=1e-3, tie_word_embeddings=False,
             bos_token_id=0, eos_token_id=0)


def redraw_(model: torch.nn.Module, seed: int, gains_around: float = 1.0) -> None:
    """Every parameter redrawn with std STD: around 0, LayerNorm gains around ``gains_around``."""
    g = torch.Generator().manual_seed(seed)
    gains = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(gains_around if id(p) in gains else 0.0, STD, generator=g)


def with_config(model: qkv.DecoderLM, **changes) -> qkv.DecoderLM:
    """The same tensors (shared, not copied) in a model built from a changed config."""
    with torch.device("meta"):
        other = qkv.DecoderLM(model.config.replace(**changes))
    other.load_state_dict(model.state_dict(), assign=True)
    return other.eval()


def reference_gpt2(seed: int = 0, gains_around: float = 1.0, **config) -> transformers.GPT2LMHeadModel:
    """A GPT2LMHeadModel from a config with random weights; built on the meta device to skip HF's own init."""
    cfg = transformers.GPT2Config(**config)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    redraw_(model, seed, gains_around)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> pathlib.Path:
    """The small reference saved as config.json + pytorch_model.bin (a weights-only pickle, as old uploads are)."""
    directory = tmp_path_factory.mktemp("gpt2-small-options")
    model = reference_gpt2(seed=1, **SMALL)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def small_ids(seed: int = 0, batch: int = 3, seq: int = 20) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# GPT-2 in.
# --------------------------------------------------------------------------------------------------------------


def test_gpt2_small_shapes_give_hugging_face_logits(tmp_path):
    """124M parameters in GPT-2 small's exact shapes, saved by save_pretrained (model.safetensors), no tokenizer
    files: qkv.load gives the same logits and pairs the model with GPT-2's original tokenizer."""
    reference = reference_gpt2(seed=0, gains_around=0.0)
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model, tokenizer = load(tmp_path)
    assert isinstance(model, qkv.DecoderLM)
    assert model.config.activation == "gelu_tanh" and model.config.layer_norm_eps == 1e-5
    assert model.num_parameters() == reference.num_parameters() == 124_439_808
    ids = torch.tensor([tokenizer.encode("The animal didn't cross the street because it was too tired.")])
    assert ids[0, :3].tolist() == [464, 5044, 1422]
    with torch.no_grad():
        expected, ours = reference(ids).logits, model(ids)
        assert max_diff(ours, expected) <= TOL
        assert max_diff(with_config(model, activation="gelu")(ids), expected) > 5 * TOL  # the GELU shows


def test_small_config_with_every_option_changed_gives_hugging_face_logits(small_dir):
    reference = reference_gpt2(seed=1, **SMALL)
    model, _ = load_gpt2(small_dir, tokenizer=False)
    assert model.config.d_ff == 96 and not model.config.tie_embeddings and model.config.activation == "gelu"
    ids = small_ids()
    with torch.no_grad():
        assert max_diff(model(ids), reference(ids).logits) <= TOL


def test_right_padded_batch_matches_at_real_tokens(small_dir):
    reference = reference_gpt2(seed=1, **SMALL)
    model, _ = load_gpt2(small_dir, tokenizer=False)
    ids = small_ids(seed=3)
    lengths = torch.tensor([20, 13, 5])
    mask = torch.arange(20)[None, :] < lengths[:, None]
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask.long()).logits
        ours = model(ids, mask)
    assert max_diff(ours[mask], expected[mask]) <= TOL


@pytest.mark.parametrize("mutation", [{"activation": "gelu_tanh"}, {"layer_norm_eps": 1e-5}])
def test_a_wrong_gelu_or_epsilon_would_not_hide_under_the_tolerance(small_dir, mutation):
    """The same weights with GPT-2's other GELU or the default epsilon: the logits move > 10x the tolerance."""
    reference = reference_gpt2(seed=1, **SMALL)
    model, _ = load_gpt2(small_dir, tokenizer=False)
    ids = small_ids()
    with torch.no_grad():
        assert max_diff(with_config(model, **mutation)(ids), reference(ids).logits) > 10 * TOL


# --------------------------------------------------------------------------------------------------------------
# GPT-2 out.
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(activation="gelu_tanh", tie_embeddings=True),
    dict(activation="relu", tie_embeddings=False, layer_norm_eps=1e-2, d_ff=48),
])
def test_qkv_model_saved_as_gpt2_loads_in_hugging_face_with_equal_logits(tmp_path, options):
    config = qkv.ModelConfig(**{**dict(vocab_size=300, d_model=32, n_heads=4, d_ff=128, n_decoder_layers=2,
                                       max_seq_len=40, positional="learned", norm_position="pre"), **options})
    torch.manual_seed(0)
    model = qkv.DecoderLM(config).eval()
    redraw_(model, seed=2)
    save_gpt2(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids)) <= TOL
    again, _ = load_gpt2(tmp_path, tokenizer=False)  # and back into qkv, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


@pytest.mark.parametrize("field, value", [
    ("positional", "rope"), ("norm_position", "post"), ("activation", "swiglu"), ("norm", "rmsnorm"),
    ("bias", False), ("n_kv_heads", 2), ("scale_embeddings", True), ("final_norm", False),
])
def test_options_gpt2_cannot_express_are_refused_by_name(tmp_path, field, value):
    config = qkv.ModelConfig.preset("tiny-decoder", **{field: value})
    with pytest.raises(ValueError, match=f"cannot save as GPT-2: {field}="):
        save_gpt2(qkv.DecoderLM(config), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_an_encoder_is_not_a_gpt2(tmp_path):
    with pytest.raises(TypeError, match="decoder-only"):
        save_gpt2(qkv.Encoder(qkv.ModelConfig.preset("tiny-encoder")), tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------------------------


def copy_dir(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def as_safetensors(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """``src`` rewritten as config.json + model.safetensors with the base model's names (as the original GPT-2
    upload has them: no ``transformer.`` prefix) after ``edit(tensors)`` changed the tensors."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    tensors = {k.removeprefix("transformer."): v for k, v in state.items()}
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_files_are_named(small_dir, tmp_path):
    no_config = copy_dir(small_dir, tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_gpt2(no_config)
    no_weights = copy_dir(small_dir, tmp_path / "b")
    (no_weights / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(no_weights)


def test_an_unsupported_architecture_is_named_by_its_field(small_dir, tmp_path):
    other = copy_dir(small_dir, tmp_path / "mamba")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type='mamba'"):
        load(other)


def test_an_unsupported_gpt2_option_is_named(small_dir, tmp_path):
    other = copy_dir(small_dir, tmp_path / "scaled")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        load_gpt2(other)


class Payload:
    """Unpickling this would create a file: a stand-in for code a malicious .bin runs."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_bin_that_needs_full_unpickling_is_refused_and_runs_nothing(small_dir, tmp_path):
    evil = copy_dir(small_dir, tmp_path / "evil")
    marker = tmp_path / "code-ran"
    state = torch.load(evil / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": Payload(marker)}, evil / "pytorch_model.bin")
    with pytest.raises(ValueError, match="full unpickling.*safetensors"):
        load(evil)
    assert not marker.exists()


def test_a_tensor_of_the_wrong_shape_is_named_with_expected_and_found(small_dir, tmp_path):
    def shrink(tensors):
        tensors["h.1.mlp.c_fc.weight"] = tensors["h.1.mlp.c_fc.weight"][:, :80]

    bad = as_safetensors(small_dir, tmp_path / "bad", shrink)
    with pytest.raises(ValueError, match=r"'h\.1\.mlp\.c_fc\.weight' has shape \(64, 80\).*implies \(64, 96\)"):
        load(bad)


def test_missing_and_unexpected_tensors_are_named(small_dir, tmp_path):
    intact = as_safetensors(small_dir, tmp_path / "intact", lambda t: None)
    assert isinstance(load_gpt2(intact, tokenizer=False)[0], qkv.DecoderLM)
    missing = as_safetensors(small_dir, tmp_path / "missing", lambda t: t.pop("h.2.ln_2.bias"))
    with pytest.raises(ValueError, match=r"'h\.2\.ln_2\.bias' is missing"):
        load(missing)
    extra = as_safetensors(small_dir, tmp_path / "extra", lambda t: t.update({"h.0.adapter": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) 'h\.0\.adapter'"):
        load(extra)


def test_a_tokenizer_too_big_for_the_model_is_refused(small_dir):
    """No tokenizer files and vocab_size=1000: GPT-2's 50257-token tokenizer does not belong to this model."""
    with pytest.raises(ValueError, match="50257 tokens but the model's vocab_size is 1000"):
        load(small_dir)
