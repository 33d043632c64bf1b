"""Small builders shared by the training tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ftkit.config import Recipe

REPO = Path(__file__).resolve().parents[1]


def write_records(path: Path, n: int, source: Path) -> Path:
    """The first ``n`` real Alpaca records with short outputs, as a local JSON file."""
    records = [r for r in json.loads(source.read_text()) if 0 < len(r["output"]) < 200][:n]
    path.write_text(json.dumps(records))
    return path


def tiny_recipe(model_dir, dataset, output_dir, **overrides) -> Recipe:
    """A fast fp32 recipe on a tiny local model; overrides are flat recipe fields."""
    values = {
        **Recipe().to_dict(),
        "model_name_or_path": str(model_dir),
        "dataset": str(dataset),
        "output_dir": str(output_dir),
        "validation_size": 0,
        "max_length": 320,  # no record of write_records(16) is dropped
        "lora_dropout": 0.0,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        **overrides,
    }
    return Recipe.from_dict(values)


def run_python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a clean process: no state shared with the test)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


ACCELERATE_LAUNCH = (sys.executable, "-m", "accelerate.commands.launch")


def _launch_env(env: dict) -> dict:
    """The children (launcher and every worker) import this checkout's ftkit."""
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), **env}


def accelerate_launch(*args: str, timeout: int = 400, **env) -> subprocess.CompletedProcess:
    """``accelerate launch`` as users run it, in a subprocess."""
    return subprocess.run(
        [*ACCELERATE_LAUNCH, *args],
        capture_output=True,
        text=True,
        env=_launch_env(env),
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


FTKIT_LAUNCH = (sys.executable, "-m", "ftkit", "launch")


def start_launch(*args: str, stderr, launcher=ACCELERATE_LAUNCH, **env) -> subprocess.Popen:
    """``accelerate launch`` (or ``ftkit launch``) in the background (one simulated node), its
    stderr to ``stderr``. Its own session, so :func:`kill_launch` can end whatever it started.
    """
    return subprocess.Popen(
        [*launcher, *args],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=_launch_env(env),
        cwd=REPO,
        start_new_session=True,
    )


def launch_workers(launch: subprocess.Popen) -> list:
    """The worker processes of a running launch (psutil.Process objects)."""
    import psutil

    try:
        return psutil.Process(launch.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_launch(launch: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to a launch and to every process it started (torchrun puts each worker in a
    session of its own: the launcher's process group alone would leave the workers running)."""
    import psutil

    procs = launch_workers(launch)  # before the launcher dies and its children are re-parented
    if launch.poll() is None:
        procs.append(psutil.Process(launch.pid))
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
    if sig == signal.SIGKILL:
        launch.wait(timeout=30)


class HostReads:
    """Counts what would each be a host sync on a GPU, on any device: tensor values read by
    Python (``item``/``float``/``int``/``bool``, ``tolist``) and ops whose output size depends on
    the data (``nonzero``, ``equal``). ``ignore``: tensors that stay on the host on a GPU too
    (torch's AdamW step counters), whose reads cost nothing there."""

    OPS = ("aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default")

    def __init__(self, ignore=()):
        self.ignore = {id(t) for t in ignore}
        self.count = 0

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        reads = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func) in reads.OPS and not (args and id(args[0]) in reads.ignore):
                    reads.count += 1
                return func(*args, **(kwargs or {}))

        tolist = torch.Tensor.tolist

        def counted_tolist(tensor):  # not a dispatched op on the CPU
            reads.count += 1
            return tolist(tensor)

        self._restore = lambda: setattr(torch.Tensor, "tolist", tolist)
        torch.Tensor.tolist = counted_tolist
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._restore()
