"""Run by `accelerate launch` in test_data_scale: every rank builds a Trainer on a fresh
FTKIT_HOME, rank 0 held back inside the data step so that, without "local main process first",
another rank would tokenise first.

Usage: data_worker.py MARKER_DIR RECIPE_ARGS...  (a tokenised batch leaves
MARKER_DIR/tokenised-by-rankN; each rank writes MARKER_DIR/split-rankN.json)
"""

import json
import os
import sys
import time
from pathlib import Path

from ftkit import data, train
from ftkit.config import parse_recipe

_tokenize_batch, _build_datasets = data.tokenize_batch, train.build_datasets
MARKERS, RANK = Path(sys.argv[1]), os.environ.get("RANK")


def _marked_tokenize_batch(*args, **kwargs):
    (MARKERS / f"tokenised-by-rank{RANK}").touch()
    return _tokenize_batch(*args, **kwargs)


def _held_back_build(*args, **kwargs):
    if RANK == "0":
        time.sleep(4)
    return _build_datasets(*args, **kwargs)


def main() -> None:
    data.tokenize_batch = _marked_tokenize_batch
    train.build_datasets = _held_back_build
    trainer = train.Trainer(parse_recipe(sys.argv[2:]))
    (MARKERS / f"split-rank{RANK}.json").write_text(json.dumps(trainer.split))


if __name__ == "__main__":
    main()
