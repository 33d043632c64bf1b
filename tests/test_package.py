"""The package stands on its own: an `ftkit` command, a layout that keeps the lab out of the core,
no paths into the checkout, and a wheel that trains from an empty directory."""

from __future__ import annotations

import ast
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from ftkit.cli import COMMANDS, main

PACKAGE = REPO / "src" / "ftkit"
# The entry points may name every subcommand's module; everything else at the top is the core.
ENTRY_POINTS = {"cli.py", "__main__.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_core_modules_never_import_the_lab():
    core = [p for p in PACKAGE.glob("*.py") if p.name not in ENTRY_POINTS]
    assert {"train.py", "adapters.py", "meter.py", "generate.py", "evaluate.py"} <= {
        p.name for p in core
    }
    offenders = {
        p.name: sorted(n for n in _imports(p) if n == "ftkit.lab" or n.startswith("ftkit.lab."))
        for p in core
    }
    assert not {name: found for name, found in offenders.items() if found}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _ftkit_imports(path: Path) -> set[str]:
    """The ftkit modules ``path`` imports, at its top or inside a function alike.

    ``from ftkit.config import X`` imports ``ftkit.config``; ``from ftkit import lora`` imports
    ``ftkit.lora``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: a relative import; ftkit's are absolute")
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.partition(".")[0] == "ftkit")
        elif isinstance(node, ast.ImportFrom) and node.module.partition(".")[0] == "ftkit":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found


def _import_graph() -> dict[str, set[str]]:
    return {name: _ftkit_imports(path) - {name} for name, path in MODULES.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return circles


def test_the_import_graph_finds_a_circle_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({**graph, "c": {"d"}}) == []


def test_no_modules_import_each_other():
    """Each concern has one direction: no module reaches back, even inside a function."""
    graph = _import_graph()
    assert "ftkit.adapters" in graph["ftkit.generate"]  # the graph is read
    assert _circles(graph) == []


def test_config_stands_on_the_ground_floor():
    """The floor the other modules stand on imports none of them: the recipe's field
    vocabularies (attention implementations, trackers, Hub repo ids) are its own."""
    assert _ftkit_imports(PACKAGE / "config.py") <= {"ftkit.errors", "ftkit.io"}


def test_the_lab_never_imports_the_cli():
    """Lab scripts talk to the terminal through ftkit.console, as the ftkit command does."""
    lab = {name: path for name, path in MODULES.items() if name.startswith("ftkit.lab.")}
    assert "ftkit.lab.gpucheck" in lab
    assert sorted(name for name, path in lab.items() if "ftkit.cli" in _ftkit_imports(path)) == []


def test_no_module_builds_a_path_outside_the_package():
    """``Path(__file__).parents[2]`` and friends point into a checkout that an installed wheel
    does not have; package data is found beside the module instead."""
    outward = re.compile(r"parents\[|\.parent\.parent|[\"']\.\./")
    found = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if outward.search(line)
    ]
    assert not found


def test_ftkit_help_lists_every_subcommand(capsys, monkeypatch):
    expected = {
        "train",
        "launch",
        "generate",
        "merge",
        "evaluate",
        "estimate",
        "plan",
        "compare",
        "ablation",
        "bench",
    }
    assert set(COMMANDS) == expected
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["ftkit"])
    with pytest.raises(SystemExit) as done:  # python -m ftkit: the same help, exit 0
        runpy.run_module("ftkit", run_name="__main__")
    assert done.value.code == 0
    assert capsys.readouterr().out == listed
    assert all(re.search(rf"^  {name} ", listed, re.MULTILINE) for name in expected)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_subcommand_has_help_and_one_error_line_for_a_bad_flag(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert f"ftkit {command}" in capsys.readouterr().out
    required = {"generate": ["--adapter_dir", "x", "--instruction", "Hi."],
                "merge": ["--adapter_dir", "x", "--output_dir", "y"],
                "evaluate": ["--adapter_dir", "x"],
                "plan": ["--gpus", "T4"]}.get(command, [])  # fmt: skip
    assert main([command, *required, "--no_such_flag", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftkit error: "), err
    assert "no_such_flag" in err[0]


def test_unknown_subcommand_is_one_error_line(capsys):
    assert main(["trian"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ftkit error: unknown command 'trian'; one of: "
        "train, launch, generate, merge, evaluate, estimate, plan, compare, ablation, bench"
    ]


@pytest.mark.slow
def test_the_wheel_trains_compares_and_estimates_from_an_empty_directory(tmp_path):
    """``pip install`` (not editable), then run from a directory with no checkout in sight."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    pip = [sys.executable, "-m", "pip", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheels)]
    subprocess.run(build, check=True, timeout=300)
    (wheel,) = wheels.glob("ftkit-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(target),  # the installed copy, ahead of the venv's editable one
        "HF_HUB_OFFLINE": "1",
        "FTKIT_HOME": str(tmp_path / "home"),
    }

    def ftkit(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(target / "bin" / "ftkit"), *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    where = subprocess.run(
        [sys.executable, "-c", "import ftkit; print(ftkit.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(target))

    ftkit("train", "--max_steps", "2", "--output_dir", "run")
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json"} <= {
        p.name for p in (work / "run").iterdir()
    }
    ftkit("compare", "--max_steps", "2", "--output_dir", "cmp")
    assert (work / "cmp" / "lora_parity.md").is_file()
    estimate = ftkit("estimate", "--model", "llama2-7b")
    assert "total" in estimate.stdout and "T4" in estimate.stdout
