"""The training layers import downward only: data < training < recipes < evaluation < cli, with no cycle, and the
objective registry is whole without importing any recipe."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qkv import ModelConfig
from qkv.config import PRESETS

SRC = Path(__file__).resolve().parents[1] / "src"

# package → the qkv modules it must never import (at module level or inside a function)
# (qkv.viz, qkv.serve, qkv.study, qkv.bench: the "looking inside" layer above recipes)
ABOVE_RECIPES = ["qkv.evaluation", "qkv.viz", "qkv.serve", "qkv.study", "qkv.bench", "qkv.demo", "qkv.cli",
                 "qkv.train", "qkv.translation"]
FORBIDDEN = {
    "qkv.data": ["qkv.training", "qkv.recipes", "qkv.generation", "qkv.generate", *ABOVE_RECIPES],
    "qkv.training": ["qkv.recipes", "qkv.generation", "qkv.generate", *ABOVE_RECIPES],
    "qkv.recipes": ABOVE_RECIPES,
    "qkv.evaluation": ["qkv.cli", "qkv.train", "qkv.translation"],
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _walk_running_code(node: ast.AST):
    """ast.walk, leaving out ``if TYPE_CHECKING:`` blocks (imports for type hints only, never run)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
            continue
        yield from _walk_running_code(child)


def imports_of(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The qkv modules a file imports (relative imports resolved; ``from pkg import name`` counts as pkg.name
    when that is a module, else pkg)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(_walk_running_code(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qkv"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("qkv"):
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                is_module = any((SRC / candidate.replace(".", "/")).with_suffix(s).exists() for s in (".py",)) or \
                    (SRC / candidate.replace(".", "/") / "__init__.py").exists()
                found.add(candidate if is_module else target)
    return found


def files_of(package: str) -> list[Path]:
    root = SRC / package.replace(".", "/")
    return sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_each_training_layer_imports_only_the_layers_below_it(package):
    wrong = [f"{module_name(f)} imports {m}" for f in files_of(package) for m in sorted(imports_of(f))
             if any(m == bad or m.startswith(bad + ".") for bad in FORBIDDEN[package])]
    assert not wrong, wrong


def test_the_training_modules_form_no_import_cycle():
    """Every import (module level or inside a function, as a deferred import only hides a cycle) from qkv.train,
    qkv.translation and qkv.evaluation down: a graph without a cycle. (A package's ``__init__`` importing its own
    modules, which import names back from it, is how packages work, not a cycle between modules.)"""
    graph: dict[str, set[str]] = {}
    todo = ["qkv.train", "qkv.translation", "qkv.evaluation"]
    while todo:
        name = todo.pop()
        if name in graph:
            continue
        path = SRC / name.replace(".", "/")
        path = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
        graph[name] = {m for m in imports_of(path) if m != name and not name.startswith(m + ".")}
        todo.extend(graph[name])
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack
                                     else f"{node} -> {nxt}")
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


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
    """lint-imports (import-linter, a dev dependency) checks the contracts pyproject.toml declares, counting
    indirect imports too: what the per-package test above checks one file at a time."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install 'qkv[dev]')")
    root = SRC.parent
    done = subprocess.run([str(lint), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and done.stdout.count("KEPT") >= 3
