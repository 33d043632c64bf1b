"""Nothing lost, nothing mixed (issue 10): merge targets, run identity, exact resume, no pickles,
values that train nothing, file modes, full disks, the held-out split, DDP with few records."""

import json
import shutil

import pytest
import torch
from helpers import tiny_recipe, write_records

from ftkit.adapters import AdapterArgs, merge_and_export
from ftkit.errors import ConfigError
from ftkit.train import Trainer


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def records(tmp_path_factory, alpaca_path):
    return write_records(tmp_path_factory.mktemp("data") / "alpaca16.json", 16, alpaca_path)


@pytest.fixture(scope="module")
def run(tiny_llama_dir, records, tmp_path_factory):
    """One finished tiny run (its adapter dir sits in a parent that holds nothing else)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    Trainer(tiny_recipe(tiny_llama_dir, records, out, max_steps=1)).fit()
    return out


# -- 1. merge never deletes what it did not write ---------------------------------------------------


def test_merge_refuses_a_non_empty_dir_and_keeps_its_files(run, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match=r"exists and is not empty.*--overwrite"):
        merge_and_export(AdapterArgs(str(run)), target)
    with pytest.raises(ConfigError, match=r"files ftkit did not write \(notes\.txt\)"):
        merge_and_export(AdapterArgs(str(run)), target, overwrite=True)
    assert (target / "notes.txt").read_text() == "my notes"
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_merge_into_the_adapters_parent_is_refused_even_with_overwrite(run):
    before = sorted(p.name for p in run.iterdir())
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="holds the adapter being merged"):
            merge_and_export(AdapterArgs(str(run)), run.parent, overwrite=overwrite)
    assert sorted(p.name for p in run.iterdir()) == before


def test_merge_refuses_the_base_ftkit_home_and_other_runs(
    run, tiny_llama_dir, tmp_path, monkeypatch
):
    with pytest.raises(ConfigError, match="holds the base model"):
        merge_and_export(AdapterArgs(str(run)), tiny_llama_dir, overwrite=True)
    home = tmp_path / "home" / "ftkit"
    home.mkdir(parents=True)
    monkeypatch.setenv("FTKIT_HOME", str(home))
    with pytest.raises(ConfigError, match=r"holds \$FTKIT_HOME"):
        merge_and_export(AdapterArgs(str(run)), tmp_path / "home", overwrite=True)
    other = tmp_path / "runs"
    shutil.copytree(run, other / "older-run")
    with pytest.raises(ConfigError, match="holds a training run"):
        merge_and_export(AdapterArgs(str(run)), other, overwrite=True)
    assert (other / "older-run" / "adapter_model.safetensors").is_file()


def test_merge_overwrite_replaces_only_its_own_merged_model(run, tmp_path):
    target = tmp_path / "merged"
    merge_and_export(AdapterArgs(str(run)), target)
    assert (target / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="exists and is not empty"):
        merge_and_export(AdapterArgs(str(run)), target)
    merge_and_export(AdapterArgs(str(run)), target, overwrite=True)
    (target / "extra.bin").write_bytes(b"user data")
    with pytest.raises(ConfigError, match=r"extra\.bin"):
        merge_and_export(AdapterArgs(str(run)), target, overwrite=True)
    assert (target / "extra.bin").read_bytes() == b"user data"


def test_merge_overwrite_flag_on_the_command_line(run, tmp_path, capsys):
    from ftkit.cli import main

    target = tmp_path / "merged"
    assert main(["merge", "--adapter_dir", str(run), "--output_dir", str(target)]) == 0
    assert main(["merge", "--adapter_dir", str(run), "--output_dir", str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    argv = ["merge", "--adapter_dir", str(run), "--output_dir", str(target), "--overwrite", "true"]
    assert main(argv) == 0
    assert json.loads((target / "ftkit_merged.json").read_text())["files"]
