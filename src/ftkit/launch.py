"""Run the training recipe as users do, in a fresh ``accelerate launch`` process.

Comparisons (own vs PEFT LoRA, the ablation grid) run every setting in its own process, so its
peak memory starts clean and it goes through exactly the path users run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ftkit.errors import FtkitError

RECIPE_SCRIPT = Path(__file__).resolve().parents[2] / "recipes" / "alpaca_lora.py"


@dataclass(frozen=True)
class RecipeRun:
    """What one run wrote: ``metrics.json`` and the per-step rows of ``metrics.jsonl``."""

    output_dir: Path
    metrics: dict
    steps: list[dict]

    def median(self, key: str) -> float:
        """Median of ``key`` over the steps after the first, which pays one-off costs
        (allocator warm-up, lazy init) in every run."""
        return statistics.median(row[key] for row in self.steps[1:] or self.steps)


def launch_recipe(
    launch_args: list[str],
    recipe_args: list[str],
    output_dir: Path,
    *,
    name: str,
    env: dict | None = None,
) -> RecipeRun:
    """``accelerate launch LAUNCH_ARGS recipes/alpaca_lora.py RECIPE_ARGS --output_dir DIR``."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launch_args,
        str(RECIPE_SCRIPT), *recipe_args, "--output_dir", str(output_dir),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise FtkitError(f"{name} failed:\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return RecipeRun(
        output_dir,
        json.loads((output_dir / "metrics.json").read_text()),
        [row for row in rows if "loss" in row],
    )
