"""What the models accept at their edges: masks (bool or 1/0, never float), finite weights, typed config values."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv
from qkv import ModelConfig
from qkv.attention import MultiHeadAttention, check_mask, scaled_dot_product_attention
from qkv.checkpoint import save_checkpoint
from qkv.cli import main
from qkv.generate import generate
from qkv.models import DecoderLM, Encoder, Transformer, build_model
from qkv.tokenizers import Tokenizer

TEXT = "to be, or not to be: that is the question"


def _tiny(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.preset(preset, vocab_size=32, d_model=32, d_ff=64, max_seq_len=16)).eval()


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows; the second has 3 padding tokens at the end. → (ids, bool mask True at real tokens)."""
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    return ids, torch.tensor([[True] * 7, [True] * 4 + [False] * 3])


# --------------------------------------------------------------------------------------------------------------
# Masks: bool (True = real token / may attend) or Hugging Face's 1/0 integers; every float mask is refused.
# --------------------------------------------------------------------------------------------------------------


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """PyTorch's / Hugging Face's additive float form of a bool mask: 0 = keep, -inf = masked."""
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))


def _model_calls(ids: torch.Tensor):
    """(name, model, call(mask) → output) for each model's attention_mask argument."""
    dec, enc, s2s = _tiny("tiny-decoder"), _tiny("tiny-encoder"), _tiny("tiny-seq2seq")
    return [
        ("DecoderLM", lambda m: dec(ids, attention_mask=m)),
        ("Encoder", lambda m: enc(ids, attention_mask=m)),
        ("Transformer source", lambda m: s2s(ids, ids, src_attention_mask=m)),
        ("Transformer target", lambda m: s2s(ids, ids, tgt_attention_mask=m)),
    ]


@pytest.mark.parametrize("form", ["additive -inf", "additive -10000", "float 1/0"])
def test_a_float_mask_is_refused_by_every_model_naming_both_conventions(form) -> None:
    ids, mask = _padded_batch()
    floats = {"additive -inf": _additive(mask), "additive -10000": _additive(mask).clamp(min=-10000.0),
              "float 1/0": mask.float()}[form]
    with torch.no_grad():
        for name, call in _model_calls(ids):
            with pytest.raises(TypeError, match=r"mask has dtype torch.float32; qkv masks are bool, True = may "
                                                r"attend .*`mask == 0`.*`mask.bool\(\)`") as err:
                call(floats)
            assert "\n" not in str(err.value), name


def test_the_additive_mask_that_was_read_inverted_is_refused_before_any_output() -> None:
    # Before: m != 0 turned 0 = keep into "masked" and -inf = pad into "attend": padding was attended.
    ids, mask = _padded_batch()
    model = _tiny("tiny-decoder")
    with torch.no_grad(), pytest.raises(TypeError, match="float masks are not accepted"):
        model(ids, attention_mask=_additive(mask))
    with pytest.raises(TypeError, match="float masks are not accepted"):
        generate(model, ids, 2, attention_mask=_additive(mask))


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8])
def test_integer_one_zero_masks_give_the_same_outputs_as_bool(dtype) -> None:
    ids, mask = _padded_batch()
    with torch.no_grad():
        for name, call in _model_calls(ids):
            assert torch.equal(call(mask.to(dtype)), call(mask)), name
    left = torch.tensor([[True] * 7, [False] * 3 + [True] * 4])
    model = _tiny("tiny-decoder")
    greedy = [generate(model, ids, 3, attention_mask=m, temperature=0.0) for m in (left.to(dtype), left)]
    assert torch.equal(*greedy)


def test_an_integer_mask_holding_other_values_is_refused() -> None:
    ids, mask = _padded_batch()
    with pytest.raises(ValueError, match="integers other than 0 and 1"):
        _tiny("tiny-decoder")(ids, attention_mask=mask.long() * 2)


def test_attention_functions_take_bool_or_one_zero_and_refuse_float_masks() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen) for _ in range(3))
    x = torch.randn(2, 5, 32, generator=gen)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
    mha = MultiHeadAttention(32, 4).eval()
    for need_weights in (True, False):
        ref = scaled_dot_product_attention(q, k, v, mask, need_weights=need_weights)[0]
        assert torch.equal(scaled_dot_product_attention(q, k, v, mask.long(), need_weights=need_weights)[0], ref)
        mha_ref = mha(x, mask=mask, need_weights=need_weights)[0]
        assert torch.equal(mha(x, mask=mask.to(torch.uint8), need_weights=need_weights)[0], mha_ref)
        with pytest.raises(TypeError, match="float masks are not accepted"):
            scaled_dot_product_attention(q, k, v, _additive(mask), need_weights=need_weights)
        with pytest.raises(TypeError, match="float masks are not accepted"):
            mha(x, mask=_additive(mask), need_weights=need_weights)
    assert check_mask(torch.tensor([1, 0]), "m").dtype == torch.bool


# --------------------------------------------------------------------------------------------------------------
# Non-finite weights: refused at load, naming the tensors and the file.
# --------------------------------------------------------------------------------------------------------------


def _checkpoint_with_nan(tmp_path, preset: str = "tiny-decoder"):
    """A saved tiny checkpoint whose first feed-forward weight holds one NaN. → (directory, tensor name)."""
    torch.manual_seed(0)
    tok = Tokenizer.char(TEXT)
    model = build_model(ModelConfig.preset(preset, vocab_size=tok.vocab_size, d_model=32, d_ff=64))
    directory = save_checkpoint(tmp_path / "ckpt", model, tok)
    weights = load_file(str(directory / "model.safetensors"))
    name = next(n for n in weights if n.endswith("ffn.w1.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(directory / "model.safetensors"))
    return directory, name


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensor_and_the_file(tmp_path) -> None:
    directory, name = _checkpoint_with_nan(tmp_path)
    with pytest.raises(ValueError, match="non-finite weights") as err:
        qkv.load(directory)
    assert name in str(err.value) and str(directory / "model.safetensors") in str(err.value)


@pytest.mark.parametrize("command", [["eval", "--split", "all"], ["generate", "--max-new-tokens", "3"]])
def test_eval_and_generate_exit_non_zero_with_one_line_on_nan_weights(tmp_path, capsys, command) -> None:
    directory, name = _checkpoint_with_nan(tmp_path)
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 20)
    extra = ["--data", str(data)] if command[0] == "eval" else ["to be"]
    assert main([command[0], "--checkpoint", str(directory), *command[1:], *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing generated, no "loss nan"
    assert err.count("\n") == 1 and "non-finite weights" in err and name in err


def test_a_hugging_face_directory_with_inf_weights_is_refused(tmp_path) -> None:
    from qkv.interop.gpt2 import save_gpt2

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.preset("tiny-decoder", vocab_size=32, d_model=32, d_ff=64,
                                         activation="gelu_tanh"))
    directory = save_gpt2(model, tmp_path / "gpt2")
    weights = load_file(str(directory / "model.safetensors"))
    name = next(n for n in weights if n.endswith("mlp.c_fc.weight"))
    weights[name][1, 1] = float("inf")
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"non-finite weights \(NaN or inf\) in layers\.layers\.0\.ffn\.w1\.weight"):
        qkv.load(directory)


# --------------------------------------------------------------------------------------------------------------
# Config values of the wrong type: named with the field, the file and the expected type.
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("tie_embeddings", "false", "a bool"),  # was read as True: "false" is a non-empty string
    ("bias", 0, "a bool"),
    ("dropout", "0.1", "a number"),
    ("n_kv_heads", "2", "an integer or null"),
    ("d_model", 64.0, "an integer"),
    ("n_decoder_layers", True, "an integer"),
    ("positional", 3, "a string"),
])
def test_a_config_value_of_the_wrong_type_is_refused_naming_field_and_type(field, value, expected) -> None:
    with pytest.raises(TypeError, match=f"field {field}=.* must be {expected}"):
        ModelConfig.preset("tiny-decoder", **{field: value})


@pytest.mark.parametrize(("field", "value"), [
    ("layer_norm_eps", float("nan")), ("layer_norm_eps", float("inf")), ("layer_norm_eps", 0.0),
    ("rope_base", 0.0), ("rope_base", -1.0), ("rope_base", float("inf")),
    ("init_std", float("nan")), ("init_std", -0.02), ("dropout", float("nan")), ("dropout", 1.0),
])
def test_a_config_number_out_of_range_is_refused(field, value) -> None:
    with pytest.raises(ValueError, match=f"{field}="):
        ModelConfig.preset("tiny-decoder", **{field: value})


def test_ints_are_accepted_for_float_fields_as_json_writes_them() -> None:
    config = ModelConfig.preset("tiny-decoder", rope_base=10000, dropout=0, init_std=1)
    assert config.rope_base == 10000


def test_a_checkpoint_config_of_the_wrong_type_names_the_file(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    tok = Tokenizer.char(TEXT)
    model = DecoderLM(ModelConfig.preset("tiny-decoder", vocab_size=tok.vocab_size))
    directory = save_checkpoint(tmp_path / "ckpt", model, tok)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "tie_embeddings": "false"}))
    with pytest.raises(TypeError, match=rf"{directory / 'config.json'}: ModelConfig field tie_embeddings='false' "
                                        "must be a bool"):
        qkv.load(directory)
    with pytest.raises(TypeError, match=r"config.json: ModelConfig field tie_embeddings"):
        ModelConfig.load(directory / "config.json")
    assert main(["generate", "--checkpoint", str(directory), "to be"]) == 2
    assert "tie_embeddings='false' must be a bool" in capsys.readouterr().err


def test_models_check_their_config_argument() -> None:
    for cls in (DecoderLM, Encoder, Transformer):
        with pytest.raises(TypeError, match="expected a qkv.ModelConfig"):
            cls({"d_model": 32})
