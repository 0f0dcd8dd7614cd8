"""``qkv info PRESET``: per-component and total parameter counts, and a one-line error for a bad preset."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from qkv import ModelConfig, build_model


def expected_total(preset: str) -> int:
    with torch.device("meta"):
        return build_model(ModelConfig.preset(preset)).num_parameters()


def test_qkv_info_prints_component_and_total_counts() -> None:
    commands = {
        "vaswani-base": ["info", "vaswani-base"],
        "gpt2-small": ["info", "gpt2-small"],
        "unknown": ["info", "vaswani-bsae"],
    }
    # Started together: each pays the torch import, the wall time is paid once.
    running = {name: subprocess.Popen([sys.executable, "-m", "qkv", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name, args in commands.items()}
    results = {name: (*p.communicate(timeout=100), p.returncode) for name, p in running.items()}

    for preset, total in (("vaswani-base", 63_082_496), ("gpt2-small", 124_439_808)):
        out, err, code = results[preset]
        assert code == 0, err
        assert total == expected_total(preset)
        assert re.search(rf"^\s+total\s+{total:,}\s", out, re.MULTILINE), out
        # The components listed add up to the total.
        parts = [int(n.replace(",", "")) for name, n in re.findall(r"^\s+(.+?)\s{2,}([\d,]+)", out, re.MULTILINE)
                 if name != "total"]
        assert len(parts) >= 4 and sum(parts) == total, out
    assert "(124.4M)" in results["gpt2-small"][0]
    assert "self-attention" in results["vaswani-base"][0] and "cross-attention" in results["vaswani-base"][0]

    out, err, code = results["unknown"]
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "unknown preset 'vaswani-bsae'" in lines[0] and "did you mean 'vaswani-base'" in lines[0]


def test_every_command_comes_from_the_static_table_in_help_order() -> None:
    import argparse

    from qkv.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)  # nothing skipped, nothing added behind the table's back
    # the commands CONVENTIONS names, each its own module qkv.cli.<name>_cmd
    assert {"info", "train", "generate", "eval", "translate", "embed", "show", "explain", "serve", "bench"} <= set(
        COMMANDS)
    assert all(module.__name__ == f"qkv.cli.{name}_cmd" for name, module in COMMANDS.items())


def test_a_call_that_does_not_fit_its_function_is_a_bug_shown_with_its_traceback() -> None:
    from qkv import ModelConfig
    from qkv.cli import error_line, is_a_bug

    def head(layer: int, *, kind: str = "encoder") -> None: ...

    errors = []
    for wrong in (lambda: head(0, mask=None), lambda: head(), lambda: head(0, 1), lambda: ModelConfig(dropout="x")):
        try:
            wrong()
        except TypeError as err:
            errors.append(err)
    assert [is_a_bug(e) for e in errors] == [True, True, True, False]  # the last is the user's value, named
    assert error_line(errors[-1]).startswith("ModelConfig field dropout='x' must be a number")


def test_shared_flags_are_defined_once_in_the_options_module() -> None:
    import re
    from pathlib import Path

    import qkv.cli

    shared = ("--checkpoint", "--threads", "--device", "--dtype", "--dpi")
    folder = Path(qkv.cli.__file__).parent
    for module in sorted(folder.glob("*_cmd.py")):
        defined = re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", module.read_text())
        assert not set(defined) & set(shared), f"{module.name} defines {set(defined) & set(shared)} itself"
    in_options = re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", (folder / "options.py").read_text())
    assert sorted(flag for flag in in_options if flag in shared) == sorted(shared)  # each exactly once


def test_qkv_info_counts_a_checkpoints_parameters_and_names_the_flag_for_a_path(capsys) -> None:
    """`qkv info runs/demo` said 'unknown preset'; --checkpoint counts the loaded model's own parameters."""
    from pathlib import Path

    from qkv import load
    from qkv.cli import main

    run = Path(__file__).parent / "fixtures" / "checkpoints" / "decoder" / "run"
    model, _ = load(run)
    assert main(["info", "--checkpoint", str(run)]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in model.parameters())
    assert re.search(rf"^\s+total\s+{total:,}\s", out, re.MULTILINE), out
    assert main(["info", str(run)]) == 2
    assert f"is a path, not a preset; count a checkpoint's parameters with qkv info --checkpoint {run}" in \
        capsys.readouterr().err
    assert main(["info"]) == 2
    assert "name a preset or a checkpoint" in capsys.readouterr().err
