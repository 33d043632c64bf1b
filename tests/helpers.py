"""Small builders shared by the training tests."""

from __future__ import annotations

import json
import os
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


def accelerate_launch(*args: str, timeout: int = 400, **env) -> subprocess.CompletedProcess:
    """``accelerate launch`` as users run it, in a subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **env}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )
