"""The exact-peak meter mode (glibc's mmap threshold pinned) costs step time: only when asked."""

import pytest
from helpers import tiny_recipe, write_records

from ftkit import meter
from ftkit.config import Recipe
from ftkit.lab import ablation, compare
from ftkit.lab.ablation import Cell, Grid, Setup
from ftkit.train import Trainer


@pytest.fixture(scope="module")
def records(tmp_path_factory, alpaca_path):
    return write_records(tmp_path_factory.mktemp("data") / "alpaca8.json", 8, alpaca_path)


@pytest.fixture
def pins(monkeypatch):
    calls = []

    def fake_pin(*args):
        calls.append(args)
        return True

    monkeypatch.setattr(meter, "_pin_glibc_mmap_threshold", fake_pin)
    return calls


def test_a_default_run_does_not_pin_malloc(tiny_llama_dir, records, tmp_path, pins):
    assert Recipe().train.exact_peak_memory is False
    trainer = Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path, num_samples=4))
    assert pins == [] and not trainer.memory.pin_malloc and not trainer.memory.pinned
    kind = trainer.memory_figures()["peak_kind"]
    assert "allocator-dependent" in kind and "exact" not in kind.split("(")[0]


def test_exact_peak_memory_pins_and_says_so(tiny_llama_dir, records, tmp_path, pins):
    recipe = tiny_recipe(tiny_llama_dir, records, tmp_path, num_samples=4, exact_peak_memory=True)
    trainer = Trainer(recipe)
    assert len(pins) == 1 and trainer.memory.pinned
    assert "exact: glibc mmap threshold pinned" in trainer.memory_figures()["peak_kind"]


class Launched(Exception):
    pass


def capture_launch(monkeypatch, module):
    seen = []

    def fake_launch(launch_args, recipe_args, output_dir, **kwargs):
        seen.append(recipe_args)
        raise Launched

    monkeypatch.setattr(module, "launch_recipe", fake_launch)
    return seen


def flag_value(args: list[str], name: str) -> str:
    at = len(args) - 1 - args[::-1].index(f"--{name}")  # the last one wins, as in argparse
    return args[at + 1]


def test_the_lab_runs_ask_for_the_exact_peak(monkeypatch, tmp_path):
    seen = capture_launch(monkeypatch, ablation)
    setup = Setup({"fp32": tmp_path}, tmp_path / "d.json", 64, None)
    with pytest.raises(Launched):
        ablation.run_cell(
            Grid.load("quick"), setup, Cell.parse("2x1", "fp32", "peft", False), tmp_path, 1
        )
    assert flag_value(seen[0], "exact_peak_memory") == "true"
    # and the cell's own batching, which the planner is told (right-padded, full logits here)
    assert flag_value(seen[0], "padding_free") == "false"
    assert flag_value(seen[0], "supervised_logits_only") == "false"
    flattened = Cell.parse("2x1", "fp32", "peft", False, {"padding_free": True, "seq": 32})
    with pytest.raises(Launched):
        ablation.run_cell(Grid.load("quick"), setup, flattened, tmp_path, 1)
    assert flag_value(seen[1], "padding_free") == "true"
    assert flag_value(seen[1], "max_length") == "32"

    seen = capture_launch(monkeypatch, compare)
    with pytest.raises(Launched):
        compare.run_impl("ftkit", ["--max_steps", "2"], tmp_path, None)
    assert flag_value(seen[0], "exact_peak_memory") == "true"
    assert flag_value(seen[0], "max_steps") == "2"
