"""``ftkit launch``: ``accelerate launch -m ftkit train`` with the ftkit error as the last line.

``accelerate launch -q`` keeps a single process quiet, but with several processes torchrun's
elastic agent ends every failed run with its own ~40-line ``ChildFailedError`` report, after the
worker's one-line ftkit error. No launcher flag silences it, so this wrapper runs the launcher,
lets the workers hand it their error through a file instead of printing it, stops echoing the
launcher's stderr once that file exists (what follows is the agent's report of the same
failure), and prints the error itself, last, with exit code 2. Any other failure keeps its
traceback and exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ERROR_FILE_ENV = "FTKIT_ERROR_FILE"


def report_error(message: str) -> None:
    """Print a user-facing error, or hand it to ``ftkit launch`` when running under it.

    Every rank fails the same way on bad input; the first to get here writes the file."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        print(f"ftkit error: {message}", file=sys.stderr)
        return
    try:
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(message)
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
        child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
        try:
            hidden = _echo_until(child, error_file)
        except KeyboardInterrupt:
            hidden = 0  # the workers got the same SIGINT; wait for them to stop
        code = child.wait()
        if error_file.is_file():
            if hidden:
                print(
                    f"({hidden} lines of launcher output about this failure not shown)",
                    file=sys.stderr,
                )
            print(f"ftkit error: {error_file.read_text(encoding='utf-8')}", file=sys.stderr)
            return 2
    return code


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
