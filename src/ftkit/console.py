"""How every ftkit entry point talks to the terminal: logging set-up, and a user mistake as one
``ftkit error:`` line.

The ``ftkit`` command and the lab's ``python -m ftkit.lab...`` scripts run their ``main`` through
``run_main``: a ``FtkitError`` (bad input, a missing file, a refused setting) is one line on
stderr and exit code 2; a run stopped by a signal (``ftkit.stopping``) is its one line and the
signal's exit code; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ftkit import quiet
from ftkit.errors import FtkitError
from ftkit.launcher import report_error
from ftkit.stopping import RunStopped


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.ERROR,  # other ranks would repeat rank 0
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # matplotlib logs an INFO line the first time it builds its font cache (the loss curve).
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet.quiet_accelerate_checkpoints()  # one ftkit line per checkpoint instead of seven
    quiet.quiet_bitsandbytes(quantised=False)
    import datasets
    import transformers

    datasets.disable_progress_bars()  # one progress bar per run: the training one
    transformers.utils.logging.disable_progress_bar()


def run_main(main: Callable[[], int | None]) -> int:
    """Run ``main``; a user mistake (``FtkitError``) becomes one line on stderr and exit code 2."""
    try:
        setup_logging()
        return main() or 0
    except FtkitError as exc:
        report_error(str(exc))
        return 2
    except RunStopped as stop:  # checkpointed on a signal: its line last, the signal's code
        report_error(str(stop), stop.exit_code, prefix="ftkit: ")
        return stop.exit_code
