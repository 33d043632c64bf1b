"""Damage caught, named, never trained on (issue 23, section 3): checksums of every checkpoint and
output file verified before they load, a damaged embedded base rebuilt, and a max_length beyond
the model's context refused (or, when asked for, warned about)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import _save_tiny, tiny_llama_config
from helpers import REPO, tiny_recipe
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    BloomConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
)

from ftkit import adapters, embedded, integrity, lora
from ftkit.adapters import AdapterArgs
from ftkit.config import DataConfig, save_recipe
from ftkit.errors import ConfigError
from ftkit.integrity import MANIFEST_NAME, DamagedFileError
from ftkit.merge import merge_and_export
from ftkit.modeling import check_context_length, context_length
from ftkit.rundir import read_marker
from ftkit.train import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(max_steps=2, save_steps=1, save_total_limit=5)


@pytest.fixture(scope="module")
def run(tiny_llama_dir, records, tmp_path_factory):
    """A finished 2-step run with checkpoints 1 and 2."""
    out = tmp_path_factory.mktemp("runs") / "run"
    Trainer(tiny_recipe(tiny_llama_dir, records, out, **COMMON)).fit()
    return out


def listed(directory) -> dict[str, str]:
    lines = (directory / MANIFEST_NAME).read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def files_under(directory) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def damage(path, how: str) -> None:
    """``truncate``: keep the first half; ``flip``: one bit of a byte near the end (the tensor
    data of a safetensors file, a digit of a JSON file)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-8] ^= 0x01
    path.write_bytes(bytes(data))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the manifests ---------------------------------------------------------------------------------


def test_manifests_list_exactly_the_files_written_and_sha256sum_checks_them(run, tmp_path):
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    for ckpt in checkpoints:
        names = files_under(ckpt) - {MANIFEST_NAME}
        assert set(listed(ckpt)) == names
        assert names == {
            "ftkit_state.json",
            "model.safetensors",
            "optimizer.bin",
            "rng_state_0.json",
        }
    # The run's final artefacts: everything the commit staged, the model card excepted.
    written_otherwise = {MANIFEST_NAME, "README.md", "ftkit_run.json", "metrics.jsonl"}
    final = {p.name for p in run.iterdir() if p.is_file()} - written_otherwise
    assert set(listed(run)) == final
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= final
    assert MANIFEST_NAME in read_marker(run).artefacts  # the run's own: replaced with it
    merged = merge_and_export(AdapterArgs(str(run)), tmp_path / "merged").output_dir
    assert set(listed(merged)) == files_under(merged) - {MANIFEST_NAME}
    assert "ftkit_merged.json" in listed(merged) and "model.safetensors" in listed(merged)
    for directory in (*checkpoints, run, merged):
        for name, digest in listed(directory).items():
            assert digest == sha256(directory / name), (directory, name)
        if shutil.which("sha256sum"):
            checked = subprocess.run(
                ["sha256sum", "--check", "--strict", MANIFEST_NAME],
                cwd=directory,
                capture_output=True,
                text=True,
                check=False,
            )
            assert checked.returncode == 0, checked.stdout + checked.stderr


# -- resume ----------------------------------------------------------------------------------------


@pytest.fixture
def copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def resume(model_dir, records, out, which):
    recipe = tiny_recipe(model_dir, records, out, **COMMON, resume_from_checkpoint=str(which))
    return Trainer(recipe).fit()


@pytest.mark.parametrize(
    "name, how",
    [
        ("optimizer.bin", "truncate"),  # was a torch zip-archive traceback
        ("model.safetensors", "truncate"),
        ("model.safetensors", "flip"),  # a weight's bit: loaded silently before
        ("rng_state_0.json", "flip"),  # one character of the JSON
    ],
)
def test_resuming_a_damaged_checkpoint_names_the_file_and_the_previous_one(
    tiny_llama_dir, records, copy, name, how
):
    ckpts = copy / "checkpoints"
    damage(ckpts / "checkpoint-2" / name, how)
    with pytest.raises(DamagedFileError) as caught:
        resume(tiny_llama_dir, records, copy, ckpts / "checkpoint-2")
    assert str(caught.value) == (
        f"checkpoint {ckpts / 'checkpoint-2'} is damaged: {name} does not match its SHA-256 in "
        "checksums.sha256 (truncated or changed on disk); resume from the previous checkpoint "
        f"instead: --resume_from_checkpoint {ckpts / 'checkpoint-1'}"
    )


def test_latest_names_a_damaged_newest_checkpoint_instead_of_passing_over_it(
    tiny_llama_dir, records, copy
):
    """An unreadable ftkit_state.json used to make ``latest`` silently pick checkpoint-1."""
    ckpts = copy / "checkpoints"
    damage(ckpts / "checkpoint-2" / "ftkit_state.json", "truncate")
    with pytest.raises(DamagedFileError, match=r"checkpoint-2 is damaged: ftkit_state\.json .*"
                       r"--resume_from_checkpoint .*checkpoint-1$"):  # fmt: skip
        resume(tiny_llama_dir, records, copy, "latest")


def test_a_damaged_first_checkpoint_says_no_earlier_one_is_left_in_one_cli_line(
    tiny_llama_dir, records, copy, tmp_path, capsys
):
    from ftkit.cli import main

    first = copy / "checkpoints" / "checkpoint-1"
    damage(first / "optimizer.bin", "truncate")
    config = tmp_path / "recipe.yaml"
    save_recipe(tiny_recipe(tiny_llama_dir, records, copy, **COMMON), config)
    assert main(["train", "--config", str(config), "--resume_from_checkpoint", str(first)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line for line in err if line.startswith("ftkit error:")] == [err[-1]]
    assert err[-1] == (
        f"ftkit error: checkpoint {first} is damaged: optimizer.bin does not match its SHA-256 "
        "in checksums.sha256 (truncated or changed on disk); no earlier checkpoint of this run "
        "is left: start over with --overwrite_output_dir true"
    )
    assert "Traceback" not in "\n".join(err)


def test_an_intact_checkpoint_resumes_to_the_same_weights_and_one_without_checksums_too(
    tiny_llama_dir, records, run, copy, caplog
):
    final = load_file(run / "adapter_model.safetensors")
    resume(tiny_llama_dir, records, copy, copy / "checkpoints" / "checkpoint-1")
    resumed = load_file(copy / "adapter_model.safetensors")
    assert resumed.keys() == final.keys() and all(torch.equal(final[k], resumed[k]) for k in final)

    older = copy / "checkpoints" / "checkpoint-2"  # as an ftkit without checksums wrote it
    (older / MANIFEST_NAME).unlink()
    with caplog.at_level(logging.INFO, logger="ftkit.integrity"):
        resume(tiny_llama_dir, records, copy, older)
    assert f"{older} has no checksums.sha256: nothing to verify its files against" in caplog.text


# -- adapters: load_adapter, generate, evaluate, merge -----------------------------------------------


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_adapter_is_one_line_for_generate_evaluate_and_merge(run, tmp_path, capsys, how):
    from ftkit.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    damage(broken / "adapter_model.safetensors", how)
    for command in ("generate", "evaluate", "merge"):
        argv = [command, "--adapter_dir", str(broken)]
        argv += ["--output_dir", str(tmp_path / "m")] if command == "merge" else []
        argv += ["--instruction", "Hi."] if command == "generate" else []
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"ftkit error: adapter {broken} is damaged: adapter_model.safetensors does not match "
            "its SHA-256 in checksums.sha256 (truncated or changed on disk); copy it again, or "
            "train it again (--resume_from_checkpoint latest continues from its last "
            "checkpoint); if you edited it on purpose, delete checksums.sha256 to load it "
            "unverified"
        ], command
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_load_adapter_refuses_a_damaged_file_and_leaves_the_model_as_it_was(
    tiny_llama_dir, tmp_path, how
):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0)
    saved = adapters.save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny")
    assert set(listed(saved)) == {"adapter_config.json", "adapter_model.safetensors"}
    damage(saved / "adapter_model.safetensors", how)
    plain = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(DamagedFileError, match=r"^adapter .*/a is damaged: adapter_model\."):
        adapters.load_adapter(plain, saved)
    assert next(lora.lora_layers(plain), None) is None


def test_an_adapter_without_checksums_loads_and_says_nothing_was_verified(
    tiny_llama_dir, tmp_path, caplog
):
    import peft

    theirs = peft.get_peft_model(
        LlamaForCausalLM.from_pretrained(tiny_llama_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    theirs.save_pretrained(tmp_path / "peft")  # PEFT's own dir: no checksums
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    with caplog.at_level(logging.INFO, logger="ftkit.integrity"):
        matched = adapters.load_adapter(model, tmp_path / "peft")
    assert len(matched) == 4  # q_proj, v_proj x 2 layers
    assert "has no checksums.sha256: nothing to verify its files against" in caplog.text


def test_a_damaged_manifest_is_named(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"weights")
    integrity.write_manifest(tmp_path)
    assert integrity.damage(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("not a checksum line\n")
    assert integrity.damage(tmp_path) == (
        "checksums.sha256 is damaged (its line 1 is not `<sha256>  <file>`)"
    )
    integrity.write_manifest(tmp_path)
    (tmp_path / "w.bin").unlink()
    assert integrity.damage(tmp_path) == "w.bin is missing"


# -- the embedded base -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "what, level, expected",
    [
        ("truncated weights", logging.WARNING, "in {base} is damaged (model.safetensors does not "
         "match its SHA-256"),
        ("no checksums (an older ftkit)", logging.INFO, "into {base} again (an older ftkit built "
         "it without checksums)"),
    ],
)  # fmt: skip
def test_a_damaged_embedded_base_is_rebuilt_with_one_line_and_training_proceeds(
    tmp_path, monkeypatch, records, caplog, what, level, expected
):
    monkeypatch.setattr(embedded, "PRETRAIN_STEPS", 2)  # part of the digest: a quick own build
    monkeypatch.setenv("FTKIT_HOME", str(tmp_path / "home"))
    base = embedded.materialise("tiny-llama")
    weights = base / "model.safetensors"
    original = {k: v.clone() for k, v in load_file(weights).items()}  # not the damaged mmap
    if what == "truncated weights":
        damage(weights, "truncate")
    else:
        (base / MANIFEST_NAME).unlink()
    recipe = tiny_recipe("ftkit:tiny-llama", records, tmp_path / "out", max_steps=1, max_length=256)
    with caplog.at_level(logging.INFO, logger="ftkit.embedded"):
        metrics = Trainer(recipe).fit().metrics
    lines = [r for r in caplog.records if r.name == "ftkit.embedded"]
    assert len(lines) == 1 and lines[0].levelno == level
    assert expected.format(base=base) in lines[0].getMessage()
    assert metrics["steps"] == 1
    rebuilt = load_file(weights)
    assert rebuilt.keys() == original.keys()
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)
    assert integrity.damage(base) is None


# -- max_length and the model's context -----------------------------------------------------------


def _rope(kind, factor, **more):
    return {"rope_type": kind, "factor": factor, "rope_theta": 10000.0, **more}


@pytest.mark.parametrize(
    "config, expected",
    [
        (LlamaConfig(max_position_embeddings=256), (256, "max_position_embeddings 256")),
        (
            LlamaConfig(max_position_embeddings=256, rope_parameters=_rope("linear", 16.0)),
            (4096, "256 positions x linear RoPE scaling factor 16"),
        ),
        (
            LlamaConfig(max_position_embeddings=256, rope_parameters=_rope("dynamic", 2.0)),
            (512, "256 positions x dynamic RoPE scaling factor 2"),
        ),
        (
            LlamaConfig(max_position_embeddings=256, rope_parameters=_rope("yarn", 4.0)),
            (1024, "256 positions x yarn RoPE scaling factor 4"),
        ),
        (  # LLaMA-3.1: the stretched length is max_position_embeddings already
            LlamaConfig(
                max_position_embeddings=131072,
                rope_parameters=_rope(
                    "llama3",
                    8.0,
                    original_max_position_embeddings=8192,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                ),
            ),
            (131072, "max_position_embeddings 131072"),
        ),
        (  # per layer type: the full-attention layers reach furthest
            Gemma3TextConfig(
                max_position_embeddings=256,
                rope_parameters={
                    "full_attention": _rope("linear", 8.0),
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                },
            ),
            (2048, "256 positions x linear RoPE scaling factor 8"),
        ),
        (GPT2Config(n_positions=256), (256, "max_position_embeddings 256")),
        (BloomConfig(), None),  # ALiBi: no limit stated
    ],
    ids=["plain", "linear", "dynamic", "yarn", "llama3", "per-layer-type", "gpt2", "bloom"],
)
def test_context_length_honours_rope_scaling(config, expected):
    assert context_length(config) == expected


def test_max_length_beyond_the_context_is_refused_or_warned_about(tmp_path, caplog):
    plain, linear8, linear16, gpt2 = (tmp_path / n for n in ("plain", "l8", "l16", "gpt2"))
    LlamaConfig(max_position_embeddings=256).save_pretrained(plain)
    LlamaConfig(max_position_embeddings=256, rope_parameters=_rope("linear", 8.0)).save_pretrained(
        linear8
    )
    LlamaConfig(max_position_embeddings=256, rope_parameters=_rope("linear", 16.0)).save_pretrained(
        linear16
    )
    GPT2Config(n_positions=256).save_pretrained(gpt2)
    asked, allowed = (
        DataConfig(max_length=4096),
        DataConfig(max_length=4096, allow_beyond_context=True),
    )

    with pytest.raises(ConfigError) as caught:
        check_context_length(asked, str(plain))
    assert str(caught.value) == (
        f"max_length 4096 is beyond the context of {plain}: 256 positions (max_position_embeddings "
        "256): use --max_length 256 or less, or pass --allow_beyond_context true to train on "
        "longer sequences anyway"
    )
    with pytest.raises(ConfigError, match=r"2048 positions \(256 positions x linear RoPE scaling "
                       r"factor 8\): use --max_length 2048 or less"):  # fmt: skip
        check_context_length(asked, str(linear8))
    with pytest.raises(ConfigError, match=r"not RoPE\) stop there, so allow_beyond_context "
                       r"cannot help: use --max_length 256 or less"):  # fmt: skip
        check_context_length(allowed, str(gpt2))
    with caplog.at_level(logging.WARNING, logger="ftkit.modeling"):
        check_context_length(asked, str(linear16))  # 256 x 16 = 4096: fits, nothing said
        check_context_length(DataConfig(max_length=256), str(plain))
        assert caplog.records == []
        check_context_length(allowed, str(plain))
    assert [r.getMessage() for r in caplog.records] == [
        f"max_length 4096 is beyond the context of {plain}: 256 positions (max_position_embeddings "
        "256): training anyway (allow_beyond_context); positions past 256 were never seen in "
        "pretraining"
    ]


def test_allowing_beyond_the_context_is_not_part_of_the_runs_identity(tmp_path):
    from ftkit.rundir import fingerprint, identity_fields

    plain = tiny_recipe(tmp_path, tmp_path / "d.json", tmp_path / "out")
    allowed = tiny_recipe(
        tmp_path, tmp_path / "d.json", tmp_path / "out", allow_beyond_context=True
    )
    assert fingerprint(identity_fields(plain)) == fingerprint(identity_fields(allowed))
    longer = tiny_recipe(tmp_path, tmp_path / "d.json", tmp_path / "out", max_length=4096)
    assert fingerprint(identity_fields(plain)) != fingerprint(identity_fields(longer))


def test_the_context_is_checked_before_the_weights_load(records, tmp_path):
    """A model dir with a config and tokenizer but no weights: refused on the config alone."""
    no_weights = tmp_path / "no-weights"
    tiny_llama_config(max_position_embeddings=256).save_pretrained(no_weights)
    AutoTokenizer.from_pretrained(REPO / "src" / "ftkit" / "assets" / "tiny-llama").save_pretrained(
        no_weights
    )
    recipe = tiny_recipe(no_weights, records, tmp_path / "out", max_length=4096)
    with pytest.raises(ConfigError, match=r"^max_length 4096 is beyond the context of .*: 256 "):
        Trainer(recipe)


def test_allowed_beyond_the_context_trains_on_the_longer_sequences(alpaca_path, tmp_path, caplog):
    model_dir = _save_tiny(
        LlamaForCausalLM, tiny_llama_config(max_position_embeddings=256), tmp_path / "m256"
    )
    long = [r for r in json.loads(alpaca_path.read_text()) if len(r["output"]) > 1500][:4]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(long))
    recipe = tiny_recipe(
        model_dir, data, tmp_path / "out", max_length=4096, allow_beyond_context=True, max_steps=1
    )
    with caplog.at_level(logging.WARNING, logger="ftkit.modeling"):
        trainer = Trainer(recipe)
        metrics = trainer.fit().metrics
    assert max(len(ids) for ids in trainer.data.train["input_ids"]) > 256
    assert metrics["steps"] == 1 and metrics["train_loss"] > 0
    warned = [r.getMessage() for r in caplog.records if r.name == "ftkit.modeling"]
    assert len(warned) == 1 and warned[0].startswith("max_length 4096 is beyond the context")


# -- under DDP: every rank's files, one verdict -----------------------------------------------------


@pytest.mark.slow
def test_ddp_checkpoints_list_every_ranks_files_and_both_ranks_refuse_damage(
    tiny_llama_dir, records, tmp_path
):
    out = tmp_path / "out"

    def launch(*extra):
        return subprocess.run(
            [
                sys.executable, "-m", "ftkit", "launch",
                "--model_name_or_path", str(tiny_llama_dir), "--dataset", str(records),
                "--validation_size", "0", "--output_dir", str(out), "--max_steps", "2",
                "--save_steps", "1", "--max_length", "320", "--per_device_train_batch_size", "4",
                *extra, "--",
                "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no",
            ],
            capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO / "src"), "ACCELERATE_USE_CPU": "true",
                 "OMP_NUM_THREADS": "1"},
        )  # fmt: skip

    done = launch()
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = out / "checkpoints" / "checkpoint-1"
    assert {"rng_state_0.json", "rng_state_1.json"} <= set(listed(ckpt))
    assert set(listed(ckpt)) == files_under(ckpt) - {MANIFEST_NAME}
    damage(ckpt / "optimizer.bin", "truncate")
    done = launch("--resume_from_checkpoint", str(ckpt))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ftkit error:")]
    assert errors == [lines[-1]] and re.fullmatch(
        rf"ftkit error: checkpoint {re.escape(str(ckpt))} is damaged: optimizer\.bin does not "
        r"match .*; no earlier checkpoint of this run is left: .*",
        lines[-1],
    ), done.stderr[-3000:]
