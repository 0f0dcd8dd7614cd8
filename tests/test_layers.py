"""The layers import downward only (the import-linter contracts in pyproject.toml: formulas < models < generation
< data < training < recipes < evaluation < cli, no cycle in any package), the objective registry is whole without
importing any recipe, and one function says which recipe a model shape trains with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qkv import ModelConfig
from qkv.config import PRESETS

SRC = Path(__file__).resolve().parents[1] / "src"

def test_the_objective_registry_is_whole_without_importing_a_recipe():
    """OBJECTIVES is one literal: importing the trainer registers seq2seq too, and pulls in no recipe and no
    generation code (a fresh interpreter, so no other test's imports count)."""
    above = ("qkv.recipes", "qkv.generation", "qkv.translation")
    code = (f"import sys; from qkv.training import OBJECTIVES; print(sorted(OBJECTIVES)); "
            f"print(sorted(m for m in sys.modules if m.startswith({above!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["['decoder', 'encoder', 'seq2seq']", "[]"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_recipe_of_a_preset_follows_its_model_shape(preset):
    """recipe_for is the one answer to "is it an encoder-decoder": both stacks → translation, as the model class
    the config builds says."""
    from qkv.models import model_class_for
    from qkv.recipes import recipe_for

    config = ModelConfig.preset(preset)
    expected = {"seq2seq": "translation", "encoder": "masked-lm", "decoder": "language-model"}
    assert recipe_for(config) == expected[model_class_for(config).model_type]
    assert (recipe_for(config) == "translation") == bool(config.n_encoder_layers and config.n_decoder_layers)


def test_the_layers_contracts_in_pyproject_hold():
    """lint-imports (import-linter, a dev dependency) checks the contracts pyproject.toml declares: every import,
    at module level or inside a function (a deferred import only hides an upward arrow or a cycle)."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        if os.environ.get("CI"):
            pytest.fail("import-linter is missing in CI: make test installs it with qkv[dev]")
        pytest.skip("import-linter is not installed (pip install 'qkv[dev]')")
    root = SRC.parent
    done = subprocess.run([str(lint), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and done.stdout.count("KEPT") >= 3


MODEL_NAMES = ("model", "core")  # a model as generation names it: the one given, or the qkv model inside it


def model_attributes(source: str) -> set[str]:
    """The attributes ``source`` reads off a model: ``model.x``, ``core.x``, ``self.model.x``, ``self.core.x``
    (the Stepper keeps both) and ``unwrap(...).x``."""
    import ast

    def is_model(node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            return node.id in MODEL_NAMES
        if isinstance(node, ast.Attribute):  # self.model, self.core
            return isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in MODEL_NAMES
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "unwrap"

    return {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)
            and is_model(node.value)}


def test_generation_calls_only_the_models_public_interface():
    """Generation drives a model through ``model(...)``, ``encode``/``decode``, ``new_decode_state`` and
    ``check_fits``: never its parts (``embed``, ``layers``, ``_attend_args``, ...), which would be a second copy of
    ``forward`` to keep in step by hand. The check sees the model however generation holds it (the Stepper's
    ``self.model``/``self.core`` included): a part reached that way is caught."""
    public = {"config", "model_type", "check_fits", "decode", "encode", "new_decode_state", "eval", "train",
              "training", "modules", "parameters",  # the last two: nn.Module's own (modes, the device)
              "_orig_mod"}  # torch.compile's wrapper's: the whole module it runs (a prompt goes through it eagerly)
    used = {(path.name, attr) for path in sorted((SRC / "qkv" / "generation").glob("*.py"))
            for attr in model_attributes(path.read_text())}
    assert {attr for _, attr in used} <= public, sorted(u for u in used if u[1] not in public)
    # the decode state and the encoder-decoder's methods are reached only through the Stepper's self.core
    assert {("prompt.py", "new_decode_state"), ("prompt.py", "decode"), ("prompt.py", "encode")} <= used
    reaching_in = "class Stepper:\n    def step(self, ids):\n        return self.model.layers[0](self.core.embed(ids))"
    assert model_attributes(reaching_in) == {"layers", "embed"}
