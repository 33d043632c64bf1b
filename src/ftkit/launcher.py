"""``ftkit launch``: ``accelerate launch -m ftkit train`` with the ftkit error as the last line.

``accelerate launch -q`` keeps a single process quiet, but with several processes torchrun's
elastic agent ends every failed run with its own ~40-line ``ChildFailedError`` report, after the
worker's one-line ftkit error. No launcher flag silences it, so this wrapper runs the launcher,
lets the workers hand it their error through a file instead of printing it, stops echoing the
launcher's stderr once that file exists (what follows is the agent's report of the same
failure), and prints the error itself, last, with exit code 2. Any other failure keeps its
traceback and exit code.

Signals: a run stops cleanly on SIGTERM or a first Ctrl-C (``ftkit.stopping``), but both
launchers under it kill their workers a few seconds after relaying a signal (Accelerate's single
process launcher after 5 s, torchrun after ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s), too soon
for a step and a checkpoint of a large model. So the launcher runs in its own session (the
terminal's Ctrl-C reaches only this process) and each SIGTERM / SIGINT this process gets is sent
straight to the training processes, once; the launcher under it sees them exit by themselves.
A stopped run's line (``stopped at step N on SIGTERM; ...``) is printed last, with its exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ERROR_FILE_ENV = "FTKIT_ERROR_FILE"


def report_error(message: str, exit_code: int = 2, prefix: str = "ftkit error: ") -> None:
    """Print a user-facing line (an error, or a stopped run's), or hand it to ``ftkit launch``
    when running under it.

    Every rank fails (or stops) the same way; the first to get here writes the file."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        print(f"{prefix}{message}", file=sys.stderr)
        return
    try:
        with open(path, "x", encoding="utf-8") as handle:
            json.dump({"line": prefix + message, "exit_code": exit_code}, handle)
    except FileExistsError:
        pass


def split_launch_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``TRAIN_FLAGS -- ACCELERATE_FLAGS`` (axolotl's order) → the two lists."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def run_launcher(train_flags: list[str], launcher_flags: list[str]) -> int:
    """Run ``accelerate launch -q ACCELERATE_FLAGS -m ftkit train TRAIN_FLAGS``; return its code."""
    with tempfile.TemporaryDirectory(prefix="ftkit-launch-") as private:
        error_file = Path(private) / "error"
        env = {**os.environ, ERROR_FILE_ENV: str(error_file)}
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "-q", *launcher_flags,
            "-m", "ftkit", "train", *train_flags,
        ]  # fmt: skip
        # Stop signals are relayed to the workers (below); grant torchrun's agent as long to
        # let them finish, unless the user chose a limit.
        env.setdefault(SHUTDOWN_TIMEOUT_ENV, str(STOP_GRACE_S))
        child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, start_new_session=True)
        with _relay_stop_signals(child):
            hidden = _echo_until(child, error_file)
            code = child.wait()
        if error_file.is_file():
            if hidden:
                print(
                    f"({hidden} lines of launcher output about this failure not shown)",
                    file=sys.stderr,
                )
            report = json.loads(error_file.read_text(encoding="utf-8"))
            print(report["line"], file=sys.stderr)
            return report["exit_code"]
    return code


SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
STOP_GRACE_S = 600  # for torchrun's agent, should it get a signal itself (e.g. from SLURM)


class _relay_stop_signals:
    """While inside: SIGTERM / SIGINT to this process go to the training processes (the
    launcher's children), or to the launcher while none is started yet."""

    def __init__(self, launcher: subprocess.Popen):
        self.launcher = launcher
        self.previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._relay)
        return self

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)

    def _relay(self, signum, frame) -> None:
        import psutil  # Accelerate's own dependency

        try:
            workers = psutil.Process(self.launcher.pid).children()
        except psutil.NoSuchProcess:
            return
        for process in workers or [psutil.Process(self.launcher.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signum)


def _echo_until(child: subprocess.Popen, error_file: Path) -> int:
    """Copy the child's stderr through as it comes (progress bars included) until a worker
    reports an ftkit error; count the lines held back after that."""
    hidden = 0
    out = sys.stderr.buffer
    while chunk := os.read(child.stderr.fileno(), 65536):
        if error_file.exists():
            hidden += chunk.count(b"\n")
        else:
            out.write(chunk)
            out.flush()
    return hidden
