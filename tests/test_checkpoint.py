"""Checkpoints: plain files (config.json, model.safetensors, tokenizer.json), atomic writes, clear refusals."""

import json
import os
import stat

import pytest
import torch

import qkv
from qkv import ModelConfig
from qkv.checkpoint import (
    flatten_state,
    load_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
    unflatten_state,
)
from qkv.models import build_model
from qkv.tokenizers import Tokenizer

TEXT = "to be, or not to be: that is the question"


def _model(**overrides):
    torch.manual_seed(0)
    tok = Tokenizer.char(TEXT, special_tokens=["<mask>"])
    config = ModelConfig.preset("tiny-decoder", vocab_size=tok.vocab_size, d_model=32, d_ff=64, **overrides)
    return build_model(config), tok


@pytest.mark.parametrize("preset", ["tiny-decoder", "tiny-encoder", "tiny-seq2seq"])
def test_save_then_load_gives_the_same_model_and_tokenizer(tmp_path, preset):
    torch.manual_seed(0)
    tok = Tokenizer.char(TEXT)
    model = build_model(ModelConfig.preset(preset, vocab_size=tok.vocab_size)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["format"] == "qkv" and config["format_version"] >= 1 and config["model_type"] == model.model_type
    loaded, loaded_tok = qkv.load(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded_tok.encode(TEXT) == tok.encode(TEXT)
    ids = torch.tensor([tok.encode(TEXT)])
    args = (ids, ids) if preset == "tiny-seq2seq" else (ids,)
    with torch.no_grad():
        assert torch.equal(model(*args), loaded(*args))


def test_run_directory_loads_its_latest_checkpoint_and_keeps_the_newest(tmp_path):
    model, tok = _model()
    for step in (1, 2, 3):
        save_run_checkpoint(tmp_path, step, model, tok, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]
    assert (tmp_path / "latest").read_text().strip() == "step-000003"
    _, _, directory = load_checkpoint(tmp_path)
    assert directory.name == "step-000003"


def test_a_failed_save_leaves_the_previous_checkpoint_untouched(tmp_path):
    model, tok = _model()
    path = save_checkpoint(tmp_path / "ckpt", model, tok)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with torch.no_grad():
        model.embed.token.weight.add_(1.0)
    with pytest.raises(TypeError):  # a set is not JSON: the write fails after the weights were written
        save_checkpoint(path, model, tok, trainer_state={"bad": {1, 2}})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_nested_state_survives_flattening_to_json_and_tensors():
    model, _ = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": 7}
    meta, tensors = flatten_state(state)
    back = unflatten_state(json.loads(json.dumps(meta)), tensors)
    assert back["step"] == 7 and torch.equal(back["rng"], state["rng"])
    for index, moments in state["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(back["optimizer"]["state"][index][name], value)


def test_missing_files_are_named(tmp_path):
    model, tok = _model()
    path = save_checkpoint(tmp_path / "ckpt", model, tok)
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer\.json"):
        qkv.load(path)


def test_a_pickle_is_refused_and_never_unpickled(tmp_path):
    model, tok = _model()
    path = save_checkpoint(tmp_path / "ckpt", model, tok)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights.*only safetensors"):
        qkv.load(path)
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(model.state_dict(), bare / "model.pt")
    with pytest.raises(ValueError, match="pickled weights"):
        qkv.load(bare)


def test_not_a_checkpoint_says_what_was_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a checkpoint qkv can load.*notes.txt"):
        qkv.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qkv.load(tmp_path / "nowhere")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_and_folders_get_the_modes_the_umask_gives(tmp_path, umask):
    model, tok = _model()
    previous = os.umask(umask)
    try:
        for step in (1, 2, 3):  # the third save also replaces `latest` and deletes the oldest checkpoint
            save_run_checkpoint(tmp_path / "run", step, model, tok, trainer_state={"step": step}, keep=2)
    finally:
        os.umask(previous)
    run = tmp_path / "run"
    written = [run / "latest", *(run / "step-000003").iterdir()]
    assert {p.name for p in written} >= {"model.safetensors", "trainer_state.safetensors", "config.json"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {
        p.name: oct(0o666 & ~umask) for p in written}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in run.glob("step-*")} == {
        "step-000002": oct(0o777 & ~umask), "step-000003": oct(0o777 & ~umask)}
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000002", "step-000003"]
