"""Run by `accelerate launch` in test_embedded: a short training run on the embedded default from
a fresh FTKIT_HOME, rank 0 held back so that another rank reaches the cache first.

Usage: embedded_worker.py MARKER_DIR RECIPE_ARGS...  (each build leaves MARKER_DIR/built-by-rankN)
"""

import os
import sys
import time
from pathlib import Path

from ftkit import embedded
from ftkit.config import parse_recipe
from ftkit.train import Trainer

embedded.PRETRAIN_STEPS = 3  # the test is about who writes what, not about a good base
_build = embedded._build


def _marked_build(source, out):
    _build(source, out)
    (Path(sys.argv[1]) / f"built-by-rank{os.environ.get('RANK')}").touch()


def main() -> None:
    embedded._build = _marked_build
    if os.environ.get("RANK") == "0":
        time.sleep(4)  # rank 1 takes the lock and builds
    Trainer(parse_recipe(sys.argv[2:], default_config="tiny")).fit()


if __name__ == "__main__":
    main()
