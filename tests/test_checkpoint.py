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


# -- integrity: a manifest of every file's sha256, written by the one writer, verified on load ---------------------
def _flip_low_bytes(path, n: int = 200) -> None:
    """Flip the lowest bit of the lowest byte of ``n`` float32 values in a safetensors file's tensor data: every
    value stays finite and close to what it was, and nothing but the bytes tells the damage."""
    import struct

    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # the JSON header's length, then the tensors
    for k in range(n):
        data[start + 4 * k] ^= 0x01  # little-endian float32: byte 0 is the lowest of the mantissa
    path.write_bytes(bytes(data))


def _saved_run(tmp_path):
    model, tok = _model()
    state = {"step": 1, "elapsed": 1.0, "tokens": 8, "optimizer": {"state": {}, "param_groups": []},
             "rng": {"torch": torch.get_rng_state(), "numpy": [], "python": []}, "train_config": {},
             "run": {"recipe": "language-model"}}
    return save_run_checkpoint(tmp_path / "run", 1, model, tok, trainer_state=state)


def test_every_file_a_checkpoint_holds_is_in_its_manifest_with_its_sha256(tmp_path):
    import hashlib

    path = _saved_run(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["algorithm"] == "sha256"
    on_disk = {p.name: p.read_bytes() for p in path.iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == set(on_disk) >= {"config.json", "model.safetensors", "tokenizer.json",
                                                      "trainer_state.json", "trainer_state.safetensors"}
    for name, data in on_disk.items():
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


DAMAGE = {  # each file changed so that it still reads as a valid file of its kind
    "model.safetensors": _flip_low_bytes,
    "config.json": lambda p: _edit_json(p, lambda c: c.update(layer_norm_eps=2e-5)),
    "tokenizer.json": lambda p: p.write_text(p.read_text().replace('"t":', '"T":', 1)),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_file_changed_after_it_was_written_is_refused_naming_it(tmp_path, name):
    path = _saved_run(tmp_path)
    DAMAGE[name](path / name)
    with pytest.raises(ValueError, match=rf"^{path / name} is damaged: use an earlier checkpoint \(its sha256"):
        qkv.load(tmp_path / "run")
    with pytest.raises(ValueError, match=rf"{name} is damaged: use an earlier checkpoint"):
        load_checkpoint(path)


def test_flipped_weight_bytes_stop_generate_and_eval_with_one_line(tmp_path, capsys):
    from qkv.cli import main

    path = _saved_run(tmp_path)
    _flip_low_bytes(path / "model.safetensors")
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 20)
    for argv in (["generate", "--checkpoint", str(path), "to be"],
                 ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(text)]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1
        assert "model.safetensors is damaged: use an earlier checkpoint" in err


@pytest.mark.parametrize("name", ["trainer_state.json", "trainer_state.safetensors"])
def test_a_damaged_trainer_state_is_refused_before_a_run_resumes_or_is_read(tmp_path, name):
    from qkv.checkpoint import load_trainer_state, read_run_info

    path = _saved_run(tmp_path)
    if name == "trainer_state.json":
        _edit_json(path / name, lambda s: s.update(tokens=9))
    else:
        data = bytearray((path / name).read_bytes())
        data[-1] ^= 0x01
        (path / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{name} is damaged: use an earlier checkpoint"):
        load_trainer_state(tmp_path / "run")
    if name == "trainer_state.json":  # what `qkv eval` reads of it
        with pytest.raises(ValueError, match=rf"{name} is damaged"):
            read_run_info(path)


def test_a_checkpoint_without_a_manifest_loads_without_the_check(tmp_path):
    path = _saved_run(tmp_path)
    (path / "manifest.json").unlink()  # as runs written before manifests, and tests/fixtures/checkpoints
    _flip_low_bytes(path / "model.safetensors")
    qkv.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json is damaged: use an earlier checkpoint"):
        qkv.load(path)


def test_the_one_writer_records_whatever_its_caller_writes_and_replaces_atomically(tmp_path):
    from qkv.checkpoint import read_manifest, verify_files, write_directory

    target = tmp_path / "adapter"
    with write_directory(target) as folder:  # what an adapter or an export writes, through the same function
        (folder / "adapter_config.json").write_text("{}")
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"\0" * 10)
    manifest = read_manifest(target)
    assert set(manifest) == {"adapter_config.json", "sub/weights.bin"}
    verify_files(target, manifest, manifest)
    with pytest.raises(RuntimeError, match="mid-write"), write_directory(target) as folder:
        (folder / "adapter_config.json").write_text('{"r": 8}')
        raise RuntimeError("mid-write")
    assert (target / "adapter_config.json").read_text() == "{}"  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left
    (target / "sub" / "weights.bin").write_bytes(b"\1" * 10)
    with pytest.raises(ValueError, match=r"sub/weights.bin is damaged"):
        verify_files(target, manifest, manifest)
