"""Nothing lost, nothing mixed (issue 10): merge targets, run identity, exact resume, no pickles,
values that train nothing, file modes, full disks, the held-out split, DDP with few records."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import tiny_recipe, write_records

from ftkit.adapters import AdapterArgs
from ftkit.errors import ConfigError
from ftkit.merge import merge_and_export
from ftkit.train import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")


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


# -- 2. run identity: one run per output dir --------------------------------------------------------


def names(directory) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.parametrize(
    "planted",
    [("model.safetensors", "config.json"), ("README.md",)],
    ids=["full-fine-tune", "users-readme"],
)
def test_files_ftkit_did_not_write_are_refused_and_kept(tiny_llama_dir, records, tmp_path, planted):
    from ftkit.rundir import RunDirError

    for name in planted:
        (tmp_path / name).write_text("not ftkit's")
    for overwrite in (False, True):
        recipe = tiny_recipe(
            tiny_llama_dir, records, tmp_path, max_steps=1, overwrite_output_dir=overwrite
        )
        with pytest.raises(RunDirError, match=r"files ftkit did not write \(.*" + planted[0]):
            Trainer(recipe)
    assert names(tmp_path) == set(planted)
    assert all((tmp_path / n).read_text() == "not ftkit's" for n in planted)


def test_another_run_is_refused_then_replaced_only_with_overwrite(
    tiny_llama_dir, records, tmp_path
):
    from ftkit.rundir import RunDirError, read_marker

    Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path, max_steps=1)).fit()
    first = read_marker(tmp_path)
    assert first.complete and "adapter_model.safetensors" in first.artefacts
    other = dict(max_steps=1, learning_rate=2e-2)
    with pytest.raises(RunDirError, match=r"another run .*learning_rate: 0\.01 -> 0\.02"):
        Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path, **other))

    # Replaced with --overwrite_output_dir, and killed before the end: nothing of the old run stays.
    trainer = Trainer(
        tiny_recipe(tiny_llama_dir, records, tmp_path, **other, overwrite_output_dir=True)
    )

    def killed(window):
        raise RuntimeError("killed")

    trainer.train_step = killed
    with pytest.raises(RuntimeError, match="killed"):
        trainer.fit()
    assert names(tmp_path) <= {"ftkit_run.json", "resolved_config.yaml", "metrics.jsonl"}
    assert read_marker(tmp_path).fingerprint != first.fingerprint
    assert not read_marker(tmp_path).complete


def test_same_recipe_rerun_replaces_its_own_artefacts(tiny_llama_dir, records, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, records, tmp_path, max_steps=1)
    Trainer(recipe).fit()
    Trainer(recipe).fit()
    assert not [n for n in names(tmp_path) if n.startswith(".")]


def test_rotation_latest_and_resume_consider_only_this_runs_checkpoints(
    tiny_llama_dir, records, tmp_path
):
    from ftkit import checkpoint, rundir
    from ftkit.errors import FtkitError

    common = dict(max_steps=3, save_steps=1, save_total_limit=2)
    trainer = Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path, **common))
    trainer.fit()
    ckpts = tmp_path / "checkpoints"
    # Another run's checkpoint with a higher step number.
    shutil.copytree(ckpts / "checkpoint-3", ckpts / "checkpoint-9")
    state = json.loads((ckpts / "checkpoint-9" / "ftkit_state.json").read_text())
    state["fields"]["seed"] = 7  # another recipe: another lineage
    state["fingerprint"] = rundir.fingerprint(state["fields"])
    (ckpts / "checkpoint-9" / "ftkit_state.json").write_text(json.dumps(state))
    checkpoint.save(trainer.accelerator, tmp_path, 4, keep=2, extra=trainer._run_state())
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "checkpoint-3",
        "checkpoint-4",
        "checkpoint-9",
    ]
    latest = checkpoint.checkpoints(tmp_path, rundir.lineage(trainer.identity))[-1]
    assert latest.name == "checkpoint-4"
    # Resuming a checkpoint of another recipe names the differing fields.
    changed = tiny_recipe(
        tiny_llama_dir,
        records,
        tmp_path / "other",
        **{**common, "max_steps": 5, "seed": 7},
        resume_from_checkpoint=str(ckpts / "checkpoint-3"),
    )
    with pytest.raises(FtkitError, match=r"max_steps: 3 -> 5; seed: 42 -> 7"):
        Trainer(changed).fit()


# -- 3. resume is exact with the default recipe (dropout on) ----------------------------------------


def trainable_state(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def logged_steps(out) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


def test_killed_and_resumed_run_is_bit_identical_with_dropout(tiny_llama_dir, records, tmp_path):
    """6 straight steps == 3 steps + checkpoint, killed at step 5, resumed (fresh state) to 6."""
    common = dict(
        num_samples=12,
        validation_size=4,
        lora_dropout=0.05,  # the recipe default
        per_device_train_batch_size=2,
        max_steps=6,
        save_steps=3,
        save_total_limit=5,
        eval_steps=2,
        learning_rate=5e-3,
    )
    straight = Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path / "a", **common))
    expected = straight.fit().metrics

    out = tmp_path / "b"
    first = Trainer(tiny_recipe(tiny_llama_dir, records, out, **common))
    step_once = first.train_step

    def killed_at_step_5(window):
        if first.progress.step == 4:
            raise KeyboardInterrupt
        return step_once(window)

    first.train_step = killed_at_step_5
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert logged_steps(out) == [1, 2, 3, 4]

    resumed = Trainer(
        tiny_recipe(tiny_llama_dir, records, out, **common, resume_from_checkpoint="latest")
    )
    got = resumed.fit().metrics
    a, b = trainable_state(straight), trainable_state(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    assert got["eval_loss_before"] == expected["eval_loss_before"]  # the base's, not step 3's
    assert got["eval_loss"] == expected["eval_loss"]
    assert got["train_loss"] == expected["train_loss"]


# -- 6. resuming never runs code stored in a checkpoint ---------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_a_planted_pickle_in_a_checkpoint_does_not_run(tiny_llama_dir, records, tmp_path, planted):
    from ftkit.errors import FtkitError

    common = dict(max_steps=2, save_steps=1)
    Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path / "run", **common)).fit()
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    assert not list(ckpt.glob("*.pkl"))  # ftkit's own state is data
    state = json.loads((ckpt / "ftkit_state.json").read_text())
    assert {"progress", "scheduler", "fingerprint", "world_size"} <= state.keys()
    ran = tmp_path / "payload-ran"
    torch.save({"state": _Payload(ran)}, ckpt / planted)
    recipe = tiny_recipe(
        tiny_llama_dir, records, tmp_path / "run", **common, resume_from_checkpoint=str(ckpt)
    )
    try:
        with pytest.raises(FtkitError, match=f"holds pickle files \\({planted}\\)"):
            Trainer(recipe).fit()
    finally:
        assert not ran.exists(), "the planted pickle ran"


# -- 8. values that would train nothing, or the wrong thing; bad input is one line before loading --


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_steps", "-3"], r"max_steps must be > 0, or -1 to train by epochs, got -3"),
        (["--lora_alpha", "0"], r"lora_alpha must be > 0, got 0"),
        (["--seed", "-1"], r"seed must be >= 0, got -1"),
        (["--lr_scheduler_type", "cosinus"], r"lr_scheduler_type='cosinus' is not one of"),
    ],
)
def test_values_that_train_nothing_are_refused(argv, message):
    from ftkit.config import parse_recipe

    with pytest.raises(ConfigError, match=message):
        parse_recipe(argv)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora_r: 8.5\n", r"lora_r in .*r\.yaml must be an integer, got 8\.5"),
        ("lora_alpha: null\n", r"lora_alpha in .*r\.yaml must be a number, got null"),
        ("max_steps: 2\n  bad: : x\n", r"r\.yaml is not valid YAML: .* at line 2, column 6"),
        ("lora_target: [q_proj\n", r"r\.yaml is not valid YAML: .* at line 2"),
    ],
)
def test_bad_yaml_is_one_clear_line(tmp_path, text, message):
    from ftkit.config import parse_recipe

    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_recipe(["--config", str(tmp_path / "r.yaml")])


def test_a_scalar_lora_target_is_one_module(tmp_path):
    from ftkit.config import parse_recipe

    (tmp_path / "r.yaml").write_text("lora_target: q_proj\n")
    assert parse_recipe(["--config", str(tmp_path / "r.yaml")]).adapter.lora_target == ["q_proj"]


def test_one_step_with_the_default_warmup_still_trains(tiny_llama_dir, records, tmp_path):
    recipe = tiny_recipe(
        tiny_llama_dir,
        records,
        tmp_path,
        max_steps=1,
        lr_scheduler_type="cosine",
        warmup_ratio=0.03,  # the recipe default: ceil(0.03 * 1) = 1 warmup step
    )
    trainer = Trainer(recipe)
    result = trainer.fit()
    assert result.history[0]["lr"] > 0
    lora_b = [t for n, t in trainable_state(trainer).items() if "lora_B" in n]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # B starts at 0: it moved


def test_output_dir_problems_are_found_before_the_model_loads(records, tmp_path, monkeypatch):
    no_model = tmp_path / "no-such-model"  # loading it would fail with a ModelError
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out, message in [
        (a_file, r"output_dir .*file is a file, not a directory"),
        (a_file / "sub", r"output_dir .*sub cannot be created: .*file is a file"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Trainer(tiny_recipe(no_model, records, out))
    import ftkit.rundir

    monkeypatch.setattr(ftkit.rundir.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"output_dir .*out is not writable"):
        Trainer(tiny_recipe(no_model, records, tmp_path / "out"))


# -- 9. results are readable by others: the umask is respected ---------------------------------------


def test_atomic_writes_respect_the_umask(run, tmp_path):
    import os
    import stat

    from ftkit.io import atomic_dir, atomic_write_text

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as scratch:
            (scratch / "f").write_text("y")
        merged = tmp_path / "merged"
        merge_and_export(AdapterArgs(str(run)), merged)
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.txt") == 0o644 and mode(tmp_path / "private.txt") == 0o600
    assert mode(tmp_path / "d") == 0o755
    assert mode(merged) == 0o755
    assert {mode(p) for p in merged.iterdir()} == {0o644}
    for name in ("metrics.json", "resolved_config.yaml", "ftkit_run.json", "metrics.jsonl"):
        assert mode(run / name) == 0o644, name
    assert mode(run / "adapter_model.safetensors") == 0o644  # safetensors writes 0600


# -- 5. a full disk leaves no valid-looking, broken run ---------------------------------------------


def _disk_full(*args, **kwargs):
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_at_the_final_save_commits_nothing(tiny_llama_dir, records, tmp_path):
    from ftkit.errors import FtkitError
    from ftkit.rundir import read_marker

    out = tmp_path / "out"
    trainer = Trainer(tiny_recipe(tiny_llama_dir, records, out, max_steps=1))
    trainer.tokenizer.save_pretrained = _disk_full  # the adapter is staged, then the disk fills
    with pytest.raises(FtkitError, match=f"no space left on device at {out}"):
        trainer.fit()
    assert names(out) == {"ftkit_run.json", "resolved_config.yaml", "metrics.jsonl"}
    assert not read_marker(out).complete


def test_full_disk_during_a_checkpoint_leaves_no_scratch(tiny_llama_dir, records, tmp_path):
    from ftkit import checkpoint
    from ftkit.errors import FtkitError

    trainer = Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path, max_steps=1))
    trainer.accelerator.save_state = _disk_full
    with pytest.raises(FtkitError, match=r"no space left on device at .*checkpoints"):
        checkpoint.save(trainer.accelerator, tmp_path, 1, keep=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


# -- 4. evaluate's rebuilt held-out split is the run's, or it says so -------------------------------


def test_evaluate_refuses_a_held_out_split_the_data_no_longer_gives(
    tiny_llama_dir, alpaca_path, tmp_path, caplog
):
    from ftkit.evaluate import EvalArgs, evaluate_before_after

    data = write_records(tmp_path / "train.json", 12, alpaca_path)
    out = tmp_path / "run"
    Trainer(tiny_recipe(tiny_llama_dir, data, out, max_steps=1, validation_size=4)).fit()
    args = AdapterArgs(str(out))
    report = evaluate_before_after(args, EvalArgs())  # unchanged: scored
    assert report.results["base"]["records"] == 4
    write_records(data, 16, alpaca_path)  # records appended to the training file
    with pytest.raises(
        ConfigError, match=r"data has changed .*8 \+ 4 records then.*--allow_changed"
    ):
        evaluate_before_after(args, EvalArgs())
    with caplog.at_level("WARNING"):
        evaluate_before_after(args, EvalArgs(allow_changed_split=True))
    assert "scoring anyway" in caplog.text


# -- 7. DDP with few records; a checkpoint resumed under another process count ----------------------


def test_too_few_records_for_one_batch_per_rank_is_refused():
    from ftkit.train import check_ranks_get_distinct_records as check

    with pytest.raises(ConfigError, match=r"3 training records cannot fill one batch of 4 on each"):
        check(3, 4, 2)
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size 1"):
        check(3, 2, 2)
    check(3, 4, 1)  # one process: nothing repeats
    check(16, 4, 2)


def test_a_checkpoint_from_another_process_count_or_lacking_a_rank_is_refused(
    tiny_llama_dir, records, tmp_path
):
    from ftkit.errors import FtkitError
    from ftkit.integrity import write_manifest

    common = dict(max_steps=2, save_steps=1)
    Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path, **common)).fit()
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    state = json.loads((ckpt / "ftkit_state.json").read_text())
    assert state["world_size"] == 1
    state["world_size"] = 2  # as if written by `accelerate launch --num_processes 2`
    (ckpt / "ftkit_state.json").write_text(json.dumps(state))
    write_manifest(ckpt)  # its checksums too: not damaged, another process count
    recipe = tiny_recipe(
        tiny_llama_dir, records, tmp_path, **common, resume_from_checkpoint=str(ckpt)
    )
    with pytest.raises(FtkitError, match=r"written by 2 process\(es\) and this run has 1"):
        Trainer(recipe).fit()
    # A checkpoint without one rank's state (its node wrote elsewhere) is refused by every rank.
    state["world_size"] = 1
    (ckpt / "ftkit_state.json").write_text(json.dumps(state))
    (ckpt / "rng_state_0.json").unlink()
    write_manifest(ckpt)
    with pytest.raises(FtkitError, match=r"lacks the state of rank\(s\) \[0\]"):
        Trainer(recipe).fit()


# -- one clear line at load time --------------------------------------------------------------------


def test_a_directory_that_is_not_a_model_is_one_line(records, tmp_path):
    from ftkit.errors import ModelError

    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("")
    recipe = tiny_recipe(tmp_path / "not-a-model", records, tmp_path / "out")
    with pytest.raises(ModelError, match=r"is a directory without config\.json, not a model"):
        Trainer(recipe)


def test_an_adapter_dir_without_its_weights_is_one_line(run, tmp_path, capsys):
    from ftkit.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "adapter_model.safetensors").unlink()
    for command in ("generate", "evaluate", "merge"):
        argv = [command, "--adapter_dir", str(broken)]
        argv += ["--output_dir", str(tmp_path / "m")] if command == "merge" else []
        argv += ["--instruction", "Hi."] if command == "generate" else []
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "adapter_model.safetensors is missing" in err[0], err


# -- under `accelerate launch`, the ftkit error is the last line on screen --------------------------


MULTI_PROCESS = ("ddp", "deepspeed", "fsdp", "multi_gpu", "num_processes", "num_machines")


def test_documented_launch_commands_are_quiet():
    """Single-process commands use ``accelerate launch -q``; multi-process ones ``ftkit launch``
    (``-q`` does not silence torchrun's failure report). The README, every ``docs/*.md`` page and
    the recipe script's docstring are read."""
    from helpers import REPO

    makefile = (REPO / "Makefile").read_text()
    assert "ACCELERATE := $(PY) -m accelerate.commands.launch -q\n" in makefile
    ddp_target = makefile[makefile.index("\ntrain-ddp:") :].split("\n\n")[0]
    assert "$(PY) -m ftkit launch --output_dir" in ddp_target
    assert "-- --config_file accelerate_configs/ddp_2gpu_fp16.yaml" in ddp_target
    readme, recipe = REPO / "README.md", REPO / "recipes" / "alpaca_lora.py"
    pages = sorted((REPO / "docs").glob("*.md"))
    assert pages, "no docs/*.md pages"
    shows_ftkit_launch = set()
    for doc in (readme, recipe, *pages):
        lines = [line.strip() for line in doc.read_text().splitlines()]
        accelerate = [line for line in lines if line.startswith("accelerate launch")]
        assert all(c.startswith("accelerate launch -q ") for c in accelerate), doc
        assert not [c for c in accelerate if any(word in c for word in MULTI_PROCESS)], doc
        if doc in (readme, recipe):
            assert accelerate, doc
        if any(line.startswith("ftkit launch --config") for line in lines):
            shows_ftkit_launch.add(doc)
    assert readme in shows_ftkit_launch and recipe in shows_ftkit_launch
    assert shows_ftkit_launch & set(pages), "no docs page shows `ftkit launch --config`"


@pytest.mark.slow
def test_a_bad_flag_under_accelerate_launch_q_ends_with_the_ftkit_error():
    from helpers import accelerate_launch

    done = accelerate_launch(
        "-q", "--config_file", "accelerate_configs/cpu.yaml", "recipes/alpaca_lora.py",
        "--seed", "-1",
    )  # fmt: skip
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1] == "ftkit error: seed must be >= 0, got -1", done.stderr[-2000:]


@pytest.mark.slow
def test_ddp_with_fewer_records_than_one_batch_per_rank_is_refused_in_one_last_line(
    tiny_llama_dir, alpaca_path, tmp_path
):
    """Under ``ftkit launch`` with two processes the error is the last line, once, exit 2 (bare
    ``accelerate launch -q`` ends with torchrun's 40-line ChildFailedError report)."""
    from helpers import REPO

    data = write_records(tmp_path / "three.json", 3, alpaca_path)
    done = subprocess.run(
        [
            sys.executable, "-m", "ftkit", "launch",
            "--model_name_or_path", str(tiny_llama_dir), "--dataset", str(data),
            "--validation_size", "0", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
            "--max_length", "320", "--per_device_train_batch_size", "4", "--",
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(
        "ftkit error: 3 training records cannot fill one batch of 4 on each of 2"
    )
    assert sum(line.startswith("ftkit error:") for line in lines) == 1, done.stderr[-3000:]
    assert "ChildFailedError" not in done.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
