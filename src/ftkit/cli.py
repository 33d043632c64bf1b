"""Entry points: one clear error line (exit 2) for user mistakes, tracebacks only for bugs."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from ftkit.errors import FtkitError


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.ERROR,  # other ranks would repeat rank 0
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()  # one progress bar per run: the training one
    transformers.utils.logging.disable_progress_bar()


def run_main(main: Callable[[], object]) -> int:
    setup_logging()
    try:
        main()
    except FtkitError as exc:
        print(f"ftkit error: {exc}", file=sys.stderr)
        return 2
    return 0
