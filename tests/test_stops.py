"""Stops that lose nothing: signals, one writer per output dir, extending a finished run.

The signal tests send a real signal to a real `ftkit launch` / `accelerate launch` (or to one
of its workers) in the middle of training, then resume and compare with the straight run.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    FTKIT_LAUNCH,
    REPO,
    kill_launch,
    launch_workers,
    run_python,
    start_launch,
    tiny_recipe,
)
from safetensors.torch import load_file

from ftkit import checkpoint
from ftkit.errors import ConfigError, FtkitError
from ftkit.rundir import RunDirError
from ftkit.train import Trainer

# The embedded default with a horizon no test reaches: a signal sent after step 2 always lands
# mid-run, however fast the machine. A constant learning rate makes the horizon irrelevant to
# every step, so a stopped run resumed to a nearer `max_steps` (an allowed horizon move) must
# equal the straight run to that step bit for bit.
RUN = {
    "num_samples": 16,
    "validation_size": 0,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 4,
    "max_steps": 100_000,
    "lr_scheduler_type": "constant",
    "warmup_ratio": 0.0,
    "logging_steps": 1,
}
CPU = ("--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"))
DDP_CPU = ("--multi_gpu", "--num_processes", "2", "--mixed_precision", "no")
CPU_ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
TIMEOUT = 240


def flags(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [row["step"] for row in rows if "loss" in row]


def launch(tmp_path: Path, out: Path, values: dict, accelerate_flags, name: str):
    err = open(tmp_path / f"{name}.err", "w")  # noqa: SIM115 (closed by finish())
    args = ["--output_dir", str(out), *flags(values), "--", *accelerate_flags]
    return start_launch(*args, stderr=err, launcher=FTKIT_LAUNCH, **CPU_ENV), err


def finish(process, err, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        code = process.wait(timeout=timeout)
    finally:
        kill_launch(process)
        err.close()
    return code, Path(err.name).read_text()


def wait_for_step(out: Path, process, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not logged_steps(out) or logged_steps(out)[-1] < step:
        assert process.poll() is None, f"the run ended before step {step}"
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.02)


def last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def stopped_step(err: str, signame: str) -> int:
    line = last_line(err)
    match = re.fullmatch(
        rf"ftkit: stopped at step (\d+) on {signame}; resume with --resume_from_checkpoint latest",
        line,
    )
    assert match, err[-3000:]
    return int(match.group(1))


def adapter(out: Path) -> dict:
    return load_file(out / "adapter_model.safetensors")


def assert_complete_checkpoints_only(out: Path, processes: int = 1) -> list[Path]:
    root = out / "checkpoints"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no scratch left
    found = checkpoint.checkpoints(out)
    assert sorted(p.name for p in root.iterdir()) == [p.name for p in found]
    for path in found:
        state = checkpoint.read_state(path)
        assert state is not None and state["step"] == int(path.name.split("-")[1])
        assert checkpoint.missing_ranks(path, processes) == []
        assert (path / "model.safetensors").is_file() and (path / "optimizer.bin").is_file()
    return found


def resumed_equals_straight(tmp_path, stopped_out, step: int, accelerate_flags) -> None:
    """Resume the stopped run to 3 steps past its stop; its adapter equals a straight run's to
    that step, bit for bit."""
    end = {**RUN, "max_steps": step + 3}
    code, err = finish(
        *launch(tmp_path, stopped_out, {**end, "resume_from_checkpoint": "latest"},
                accelerate_flags, "resumed")
    )  # fmt: skip
    assert code == 0, err[-3000:]
    straight = tmp_path / "straight"
    code, err = finish(*launch(tmp_path, straight, end, accelerate_flags, "straight"))
    assert code == 0, err[-3000:]
    assert logged_steps(stopped_out) == list(range(1, step + 4))
    a, b = adapter(stopped_out), adapter(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_under_ftkit_launch_checkpoints_the_step_and_resumes_exactly(tmp_path):
    """SIGINT to `ftkit launch`'s process group (a terminal's Ctrl-C): the step finishes, a
    checkpoint is written, one line, exit 130; resuming gives the straight run's adapter."""
    out = tmp_path / "out"
    process, err = launch(tmp_path, out, RUN, CPU, "stopped")
    wait_for_step(out, process, 2)
    import os

    os.killpg(process.pid, signal.SIGINT)
    code, text = finish(process, err)
    step = stopped_step(text, "SIGINT")
    assert code == 130 and step >= 2
    assert [p.name for p in assert_complete_checkpoints_only(out)] == [f"checkpoint-{step}"]
    assert logged_steps(out) == list(range(1, step + 1))
    assert not (out / "adapter_model.safetensors").exists()  # a stop is not a finished run
    resumed_equals_straight(tmp_path, out, step, CPU)


@pytest.mark.slow
def test_sigterm_to_one_ddp_rank_stops_both_ranks_after_the_same_step(tmp_path):
    """SIGTERM to rank 1's worker only (a pre-empted node): both ranks agree on the step (the
    vote rides on the step's token count), both ranks' state is in the checkpoint, exit 143."""
    out = tmp_path / "out"
    process, err = launch(tmp_path, out, RUN, DDP_CPU, "stopped")
    wait_for_step(out, process, 2)
    workers = launch_workers(process)
    rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
    assert len(rank1) == 1, [w.cmdline() for w in workers]
    rank1[0].send_signal(signal.SIGTERM)
    code, text = finish(process, err)
    step = stopped_step(text, "SIGTERM")
    assert code == 143 and step >= 2
    assert [p.name for p in assert_complete_checkpoints_only(out, 2)] == [f"checkpoint-{step}"]
    assert logged_steps(out) == list(range(1, step + 1))
    # Resuming from it is the resume of tests/test_multinode.py (exact with two processes).


def test_a_second_ctrl_c_stops_at_once_leaving_only_complete_checkpoints(
    tiny_llama_dir, records, tmp_path
):
    """Real SIGINTs to this process: the first during step 3 (the run will stop after it), the
    second while that step's checkpoint is being written: the run ends at once, the half-written
    checkpoint is removed, the earlier ones are intact; one line, exit code 130."""
    import os

    from ftkit.stopping import RunStopped

    trainer = Trainer(
        tiny_recipe(tiny_llama_dir, records, tmp_path, max_steps=50, save_steps=1,
                    save_total_limit=5, per_device_train_batch_size=2)
    )  # fmt: skip
    step_once, save_state = trainer.train_step, trainer.accelerator.save_state
    saving = []

    def ctrl_c_during_step_3(window):
        if trainer.progress.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return step_once(window)

    def ctrl_c_again_while_saving_step_3(directory, **kwargs):
        saving.append(Path(directory).name)
        result = save_state(directory, **kwargs)  # a complete state, then the interrupt
        if trainer.progress.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    trainer.train_step = ctrl_c_during_step_3
    trainer.accelerator.save_state = ctrl_c_again_while_saving_step_3
    with pytest.raises(RunStopped) as stopped:
        trainer.fit()
    assert str(stopped.value) == (
        "stopped at once on a second SIGINT; only complete checkpoints were kept: resume with "
        "--resume_from_checkpoint latest"
    )
    assert stopped.value.exit_code == 130
    assert saving == [".checkpoint-1.tmp", ".checkpoint-2.tmp", ".checkpoint-3.tmp"]
    found = assert_complete_checkpoints_only(tmp_path)
    assert [p.name for p in found] == ["checkpoint-1", "checkpoint-2"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


@pytest.mark.slow
def test_a_second_run_into_the_same_dir_is_refused_until_the_first_ends(tmp_path):
    """While a run trains, another `ftkit train` into its dir is one line naming the holder (the
    training process); once the first is SIGKILLed (a crash) the dir is free again."""
    from ftkit.rundir import RunLock

    out = tmp_path / "out"
    values = {**RUN, "max_steps": 500}
    process, err = launch(tmp_path, out, values, CPU, "first")
    try:
        wait_for_step(out, process, 1)
        (worker,) = [
            w for w in launch_workers(process) if w.cmdline()[1:4] == ["-m", "ftkit", "train"]
        ]
        second = run_python(
            "import sys; from ftkit.cli import main; sys.exit(main(sys.argv[1:]))",
            "train", "--output_dir", str(out), *flags(values), timeout=TIMEOUT,
        )  # fmt: skip
        assert second.returncode == 2
        assert last_line(second.stderr) == (
            f"ftkit error: output_dir {out} is in use by another ftkit run (pid {worker.pid}): "
            "wait for it to end, or pick another output_dir"
        )
    finally:
        kill_launch(process)  # SIGKILL: no clean-up of any kind
        err.close()
    worker.wait(timeout=30)
    RunLock(out).acquire().release()  # the kernel dropped the killed run's lock


def test_the_run_lock_is_held_by_one_process_and_dropped_when_it_dies(tmp_path):
    """Another process holding the dir: refused in one line naming its pid; a SIGKILL frees it."""
    import os
    import subprocess
    import sys

    from ftkit.rundir import RunLock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ftkit.rundir import RunLock\n"
         "RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunDirError) as refused:
            RunLock(tmp_path).acquire()
        assert str(refused.value) == (
            f"output_dir {tmp_path} is in use by another ftkit run (pid {holder.pid}): wait for "
            "it to end, or pick another output_dir"
        )
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path).acquire()  # the kernel dropped the dead holder's lock
    lock.release()
    assert list(tmp_path.iterdir()) == []  # the lock writes nothing into the dir


# -- extending a finished run ---------------------------------------------------------------------


def lrs(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["lr"] for row in rows if "lr" in row}


def test_extending_a_finished_run_continues_it_with_the_new_horizon(
    tiny_llama_dir, records, tmp_path
):
    """A constant-lr run of 3 steps extended to 6 equals a straight 6-step run bit for bit; under
    cosine, every resumed step's lr is the 6-step schedule's; metrics.json records the move."""
    for schedule in ("constant", "cosine"):
        common = dict(num_samples=12, per_device_train_batch_size=2, save_steps=2,
                      lr_scheduler_type=schedule, warmup_ratio=0.2)  # fmt: skip
        straight = Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path / schedule / "a",
                                       max_steps=6, **common))  # fmt: skip
        straight.fit()
        out = tmp_path / schedule / "b"
        Trainer(tiny_recipe(tiny_llama_dir, records, out, max_steps=3, **common)).fit()
        assert (out / "checkpoints" / "checkpoint-3").is_dir()  # the last step is checkpointed
        extended = Trainer(tiny_recipe(tiny_llama_dir, records, out, max_steps=6, **common,
                                       resume_from_checkpoint="latest"))  # fmt: skip
        metrics = extended.fit().metrics
        assert metrics["horizon_moved"] == {"at_step": 3, "total_steps": 6, "max_steps": [3, 6]}
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["horizon_moved"]["max_steps"] == [3, 6]
        theirs, ours = lrs(tmp_path / schedule / "a"), lrs(out)
        assert [ours[s] for s in (4, 5, 6)] == [theirs[s] for s in (4, 5, 6)], schedule
        a = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
        b = {n: p for n, p in extended.model.named_parameters() if p.requires_grad}
        same = all(torch.equal(a[n], b[n]) for n in a)
        assert same == (schedule == "constant")  # cosine's first 3 steps had the 3-step lrs


def test_a_horizon_behind_the_checkpoint_and_other_changes_are_refused(
    tiny_llama_dir, records, tmp_path
):
    common = dict(num_samples=12, per_device_train_batch_size=2, save_steps=2)
    Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path, max_steps=4, **common)).fit()
    shrunk = tiny_recipe(tiny_llama_dir, records, tmp_path, max_steps=3, **common,
                         resume_from_checkpoint="latest")  # fmt: skip
    with pytest.raises(ConfigError, match=r"checkpoint is at step 4, past this recipe's 3 steps"):
        Trainer(shrunk).fit()
    reseeded = tiny_recipe(tiny_llama_dir, records, tmp_path, max_steps=8, seed=7, **common,
                           resume_from_checkpoint="latest")  # fmt: skip
    with pytest.raises(FtkitError, match=r"another run .*seed: 42 -> 7"):
        Trainer(reseeded).fit()
    fresh = tiny_recipe(tiny_llama_dir, records, tmp_path, max_steps=8, **common)
    with pytest.raises(RunDirError, match=r"another run .*max_steps: 4 -> 8.*--overwrite"):
        Trainer(fresh)  # a fresh run with a new horizon is still another run
