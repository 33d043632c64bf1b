"""``make bench-peers``: every system trains the same supervised tokens, counted the same way.

No timing is asserted: the harness's figures are a benchmark, and a shared CI machine is no
place to judge speed. What is asserted is what makes the comparison fair: the bare loop gets
exactly ftkit's batches, HF Trainer on ftkit's tokenised records sees the same supervised
tokens in every step, and where a system differs (TRL's packing, length grouping) the check
says so.
"""

import pytest
import torch
from conftest import LLAMA2_TOKENIZER, REPO
from helpers import tiny_recipe, write_records

from ftkit import batching
from ftkit.data import IGNORE_INDEX
from ftkit.lab import peers
from ftkit.lab.peer_systems import batch_counts, ftkit_loader
from ftkit.train import Trainer


@pytest.fixture(scope="module")
def records(tmp_path_factory, alpaca_path):
    return write_records(tmp_path_factory.mktemp("data") / "alpaca24.json", 24, alpaca_path)


def test_sequences_trained_counts_the_short_last_batch_of_each_epoch():
    assert peers.sequences_trained(800, 8, 25) == 200
    assert peers.sequences_trained(20, 8, 3) == 20  # 8 + 8 + 4
    assert peers.sequences_trained(20, 8, 4) == 28  # the next epoch's first batch


def test_batch_counts_of_padded_and_flattened_batches():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]])
    padded = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels)}
    assert batch_counts({**padded, "labels": labels}) == {
        "supervised_tokens": 4,
        "sequences": 2,
        "computed_tokens": 8,
    }
    flat = {
        "input_ids": torch.arange(7)[None],
        "labels": torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX, 5, 6]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]]),
    }
    assert batch_counts(flat) == {"supervised_tokens": 4, "sequences": 2, "computed_tokens": 7}


def _row(system, per_step, sequences=8.0):
    return {
        "system": system,
        "label": system,
        "supervised_per_step": per_step,
        "supervised_tokens_per_step": sum(per_step) / len(per_step),
        "sequences_per_step": sequences,
    }


def test_token_check_judges_the_run_and_says_why_a_system_differs():
    table = [
        {**_row("ftkit", [100, 200]), "supervised_per_step": None},
        _row("bare", [100, 200]),
        _row("hf", [100, 200]),
        _row("trl", [101, 199]),  # same mean, other tokens per step
        _row("hf-group-by-length", [180, 190]),
        _row("trl-packing", [600, 610], sequences=33.0),
    ]
    checks = {c["system"]: c for c in peers.token_check(table)}
    assert checks["bare"]["agrees"] and checks["bare"]["worst_step_difference"] == 0
    assert checks["hf"]["agrees"] and checks["hf"]["why"] == ""
    assert checks["trl"]["agrees"] and checks["trl"]["worst_step_difference"] == pytest.approx(0.01)
    assert "tokenises prompt + completion as one text" in checks["trl"]["why"]
    assert not checks["hf-group-by-length"]["agrees"]
    assert "length-grouped" in checks["hf-group-by-length"]["why"]
    assert not checks["trl-packing"]["agrees"]
    assert "33.0 sequences per step" in checks["trl-packing"]["why"]


@pytest.mark.parametrize("overrides", [{}, {"group_by_length": True}, {"padding_free": "false"}])
def test_the_bare_loop_gets_exactly_ftkits_batches(tiny_llama_dir, records, tmp_path, overrides):
    """Epochs 0 and 1: ftkit's prepared loader (Accelerate's seedable sampler) and the bare loop's."""
    recipe = tiny_recipe(tiny_llama_dir, records, tmp_path / "run", **overrides)
    trainer = Trainer(recipe)
    bare = ftkit_loader(trainer.data.train, recipe, trainer.tokenizer, trainer.padding_free)
    for epoch in (0, 1):
        trainer.train_loader.set_epoch(epoch)
        bare.sampler.set_epoch(epoch)
        ours, theirs = list(trainer.train_loader), list(bare)
        assert len(ours) == len(theirs) == 6
        for a, b in zip(ours, theirs, strict=True):
            assert a.keys() == b.keys()
            assert batching.is_flattened(a) == (overrides.get("padding_free") != "false")
            for key in a:
                same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
                assert same, (epoch, key)


def _run_harness(tmp_path, monkeypatch, alpaca_path, systems, precision="fp32"):
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))  # the children import this checkout
    argv = ["--dataset", str(alpaca_path), "--tokenizer", str(LLAMA2_TOKENIZER)]
    argv += ["--output_dir", str(tmp_path / "out"), "--results_dir", str(tmp_path / "results")]
    argv += ["--steps", "2", "--rounds", "1", "--records", "24", "--hidden", "32"]
    argv += ["--layers", "1", "--max_length", "256", "--threads", "1", "--systems", *systems]
    argv += ["--precision", precision]
    checks = {c["system"]: c for c in peers.main(argv)}
    assert (tmp_path / "results" / "peers.md").is_file()
    assert (tmp_path / "results" / "peers.json").is_file()
    return checks


@pytest.mark.slow
def test_ftkit_hf_trainer_and_bare_loop_train_identical_supervised_tokens(
    tmp_path, monkeypatch, alpaca_path
):
    """In bf16 (every system's base in bf16 under autocast, as on a GPU; CPU autocast takes it):
    the fp32 path runs in the gpu-check dry run."""
    checks = _run_harness(tmp_path, monkeypatch, alpaca_path, ["ftkit", "hf", "bare"], "bf16")
    report = (tmp_path / "results" / "peers.md").read_text()
    assert "LoRA r 8 on q/v, dropout 0, bf16" in report
    assert checks["bare"]["relative_difference"] == 0  # ftkit train's total, from its metrics
    assert checks["hf"]["relative_difference"] == 0
    assert checks["hf"]["worst_step_difference"] == 0  # step by step
    assert all(check["agrees"] for check in checks.values())


@pytest.mark.slow
def test_trl_rows_run_and_are_counted(tmp_path, monkeypatch, alpaca_path):
    pytest.importorskip("trl")
    systems = ["ftkit", "trl", "trl-padding-free", "trl-packing"]  # ftkit: the reference
    checks = _run_harness(tmp_path, monkeypatch, alpaca_path, systems)
    for key in ("trl", "trl-padding-free"):  # the same records; TRL's own tokenisation
        assert abs(checks[key]["relative_difference"]) < 0.02, checks[key]
    packed, ftkit = checks["trl-packing"], checks["ftkit"]  # more sequences in each step
    assert packed["supervised_tokens_per_step"] > ftkit["supervised_tokens_per_step"]
    assert not packed["agrees"] and "sequences per step, not 8.0" in packed["why"]
