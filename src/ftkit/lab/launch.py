"""Run training as users do, in a fresh ``accelerate launch -m ftkit train`` process.

Comparisons (own vs PEFT LoRA, the ablation grid) run every setting in its own process, so its
peak memory starts clean and it goes through exactly the path users run.  The installed package
is launched as a module, so nothing here needs the repository checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ftkit.errors import FtkitError
from ftkit.reporting import METRICS_FINAL, METRICS_STEPS


@dataclass(frozen=True)
class RecipeRun:
    """What one run wrote: ``metrics.json`` and the per-step rows of ``metrics.jsonl``."""

    output_dir: Path
    metrics: dict
    steps: list[dict]
    max_rss_bytes: int | None = None  # the launch's process tree, from wait4 (see run_measured)

    def median(self, key: str) -> float:
        """Median of ``key`` over the steps after the first, which pays one-off costs
        (allocator warm-up, lazy init) in every run."""
        return statistics.median(row[key] for row in self.steps[1:] or self.steps)


# Recipe fields every lab measurement sets (before the grid's or the user's own, which win):
# the exact CPU peak (glibc's mmap threshold pinned), which a normal training run does not pay for.
MEASUREMENT_RECIPE = {"exact_peak_memory": True}


def child_env() -> dict:
    """The environment of every lab run: offline (nothing from the Hub), no tokenizer threads
    competing with the measured ones."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def recipe_flags(values: dict) -> list[str]:
    """``--field value`` flags of a flat recipe mapping (lists as several values)."""
    args = []
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        args += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in items)]
    return args


def single_process_flags(mixed_precision: str = "no", threads: int | None = None) -> list[str]:
    """``accelerate launch`` flags for one process on this machine, every value given explicitly
    (no config file needed, and no "values were not passed" warning block)."""
    flags = ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
    flags += ["--mixed_precision", mixed_precision]
    if not torch.cuda.is_available():
        flags.append("--cpu")
        if threads:
            flags += ["--num_cpu_threads_per_process", str(threads)]
    return flags


@dataclass(frozen=True)
class Finished:
    """A finished child process: exit code, output, and its peak resident set."""

    returncode: int
    stdout: str
    stderr: str
    max_rss_bytes: int


def run_measured(command: list[str], env: dict | None = None) -> Finished:
    """Run ``command`` to the end and return its peak RSS with its output.

    The peak is ``ru_maxrss`` of the child as ``wait4`` reports it for that one child: the
    largest resident set of it and of every descendant it waited for (``accelerate launch``
    waits for its training process), so no earlier or concurrent child of this process counts.
    """
    executable = shutil.which(command[0]) or command[0]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.posix_spawn(
            executable,
            command,
            dict(os.environ if env is None else env),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
            ],
        )
        try:
            _, status, usage = os.wait4(pid, 0)
        except BaseException:  # interrupted: do not leave the child running (as subprocess.run)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        out.seek(0)
        err.seek(0)
        return Finished(
            os.waitstatus_to_exitcode(status),
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            usage.ru_maxrss * 1024,  # Linux reports KiB
        )


def launch_recipe(
    launch_args: list[str],
    recipe_args: list[str],
    output_dir: Path,
    *,
    name: str,
    env: dict | None = None,
) -> RecipeRun:
    """``accelerate launch LAUNCH_ARGS -m ftkit train RECIPE_ARGS --output_dir DIR``."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launch_args,
        "-m", "ftkit", "train", *recipe_args, "--output_dir", str(output_dir),
    ]  # fmt: skip
    done = run_measured(command, env)
    if done.returncode != 0:
        raise FtkitError(f"{name} failed:\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in (output_dir / METRICS_STEPS).read_text().splitlines()]
    return RecipeRun(
        output_dir,
        json.loads((output_dir / METRICS_FINAL).read_text()),
        [row for row in rows if "loss" in row],
        done.max_rss_bytes,
    )
