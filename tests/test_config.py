"""ModelConfig: presets, validation with helpful errors, and parameter counts against independent references."""

from __future__ import annotations

from pathlib import Path

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


# --------------------------------------------------------------------------------------------------------------
# Every field of config.json and trainer_state.json checked by name and type before use, naming the file.
# --------------------------------------------------------------------------------------------------------------
import dataclasses  # noqa: E402
import json  # noqa: E402
import typing  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qkv.checkpoint import TrainerState  # noqa: E402
from qkv.config import ConfigFileHeader, FieldTypeError, check_fields  # noqa: E402
from qkv.training import TrainConfig  # noqa: E402

# One value of each JSON type: for any field, those its annotation does not allow are the wrong-typed values.
JSON_VALUES = ["1", "true", "", 1, 0, -3, 1.5, True, False, None, [], [1], {}, {"a": 1}]


def _wrong_values(cls: type, name: str) -> list:
    def allowed(value) -> bool:
        try:
            check_fields(cls, {**_required(cls), name: value})
        except FieldTypeError:
            return False
        except ValueError:  # the right type, holding something else wrong (an object missing its fields)
            return True
        return True
    return [v for v in JSON_VALUES if not allowed(v)]


def _required(cls: type) -> dict:
    """Stand-ins for the fields without a default (they are only type-checked here)."""
    stand_in = {int: 1, float: 1.0, dict: {}, list: []}
    hints = typing.get_type_hints(cls)
    return {f.name: (_required(hints[f.name]) if dataclasses.is_dataclass(hints[f.name])
                     else stand_in[hints[f.name]])
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def _field_and_wrong_value(cls: type):
    return st.sampled_from([f.name for f in dataclasses.fields(cls)]).flatmap(
        lambda name: st.tuples(st.just(name), st.sampled_from(_wrong_values(cls, name))))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from qkv.checkpoint import save_checkpoint
    from qkv.tokenizers import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.char("to be or not to be")
    directory = tmp_path_factory.mktemp("typed") / "ckpt"
    save_checkpoint(directory, build_model(ModelConfig.preset("tiny-decoder", vocab_size=tok.vocab_size,
                                                                d_model=32, d_ff=64)), tok)
    return directory


def test_a_format_version_given_as_a_string_names_the_field_and_the_file(checkpoint, tmp_path, capsys):
    """It was "'>' not supported between instances of 'str' and 'int'"."""
    import shutil

    import qkv
    from qkv.cli import main

    directory = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "format_version": "1"}))
    with pytest.raises(ValueError, match=rf"^{directory / 'config.json'}: field format_version='1' must be an "
                                         "integer, got str$"):
        qkv.load(directory)
    assert main(["generate", "--checkpoint", str(directory), "to be"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: field format_version='1' must be an integer" in err


@settings(max_examples=40)
@given(st.one_of(_field_and_wrong_value(ModelConfig), _field_and_wrong_value(ConfigFileHeader).filter(
    lambda case: case[0] != "format")))  # a config.json whose format is not "qkv" is not read as a qkv config
def test_any_config_json_field_of_the_wrong_type_is_a_value_error_naming_field_and_file(checkpoint, case):
    import qkv

    name, value = case
    saved = (checkpoint / "config.json").read_text()
    try:
        (checkpoint / "config.json").write_text(json.dumps({**json.loads(saved), name: value}))
        with pytest.raises(ValueError) as info:
            qkv.load(checkpoint)
    finally:
        (checkpoint / "config.json").write_text(saved)
    message = str(info.value)
    assert message.startswith(f"{checkpoint / 'config.json'}: ") and f" {name}=" in message, message


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step run, its manifest removed (a run written before manifests: what is read is only type-checked)."""
    from qkv.recipes.language_model import train_language_model

    root = tmp_path_factory.mktemp("typed-run")
    text = root / "text.txt"
    text.write_text("to be or not to be, that is the question\n" * 40)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("QKV_CACHE_DIR", str(root / "cache"))
        result = train_language_model(ModelConfig.preset("tiny-decoder", d_model=32, d_ff=64, max_seq_len=16),
                                      TrainConfig(max_steps=1, batch_size=2, eval_batches=1, progress=False),
                                      data=text, out_dir=root / "run", print_fn=lambda _: None)
    (result.checkpoint / "manifest.json").unlink()
    return result.checkpoint


def _state_cases():
    """(path of the field in trainer_state.json, a value of the wrong type for it)."""
    from qkv.checkpoint import RunInfo

    return st.one_of(*[_field_and_wrong_value(cls).map(lambda case, outer=outer: ((*outer, case[0]), case[1]))
                       for outer, cls in (((), TrainerState), (("run",), RunInfo), (("train_config",), TrainConfig))])


@settings(max_examples=40)
@given(_state_cases())
def test_any_trainer_state_field_of_the_wrong_type_is_a_value_error_naming_field_and_file(run, case):
    assert sorted(p.name for p in run.parent.glob("step-*")) == [run.name]  # no example trained on
    from qkv.recipes import resume

    path, value = case
    state_file = run / "trainer_state.json"
    saved = state_file.read_text()
    state = json.loads(saved)
    (state if len(path) == 1 else state[path[0]])[path[-1]] = value
    try:
        state_file.write_text(json.dumps(state))
        with pytest.raises(ValueError) as info:  # refused before anything is trained or written
            resume(run, {"max_steps": 2}, print_fn=lambda _: None)
    finally:
        state_file.write_text(saved)
    message = str(info.value)
    assert message.startswith(f"{state_file}: ") and f"{path[-1]}=" in message, message


@pytest.mark.parametrize("garbage", [b"\x89PNG\r\n\x1a\n\x00\xff", b"[1, 2]", b'{"step": '])
def test_a_garbage_trainer_state_names_its_file_to_resume_and_eval(run, capsys, garbage):
    from qkv.cli import main

    state_file = run / "trainer_state.json"
    saved = state_file.read_bytes()
    try:
        state_file.write_bytes(garbage)
        for argv in (["train", "--resume", str(run.parent), "--max-steps", "2"], ["eval", "--checkpoint", str(run)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{state_file} " in err and "damaged" in err, err
    finally:
        state_file.write_bytes(saved)
