"""The ablation grid: what GA, bf16, LoRA and gradient checkpointing each buy, measured.

    python recipes/ablation.py                          # recipes/ablation/grid.yaml -> outputs/ablation
    python recipes/ablation.py --quick                  # the small CI grid (~2 min on 2 cores)
    python recipes/ablation.py --grid recipes/ablation/bench.yaml --output_dir outputs/bench

Each cell trains in its own ``accelerate launch recipes/alpaca_lora.py`` process; the report is
``ablation.md`` (Table 2 per cell, Table 1 derived per technique), ``ablation.csv``,
``ablation.json``, ``memory.png`` and ``time.png`` in the output dir.
"""

import argparse
import sys
from pathlib import Path

from ftkit.ablation import Grid, run_grid
from ftkit.cli import run_main

GRIDS = Path(__file__).parent / "ablation"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default=str(GRIDS / "grid.yaml"), help="grid YAML")
    parser.add_argument("--quick", action="store_true", help=f"use {GRIDS / 'quick.yaml'}")
    parser.add_argument("--output_dir", default="outputs/ablation")
    parser.add_argument("--title", default="What each technique buys: the ablation grid")
    parser.add_argument(
        "--jobs", type=int, default=1, help="cells run at once (>1 skews the timings, not memory)"
    )
    args = parser.parse_args(argv)
    grid = Grid.load(GRIDS / "quick.yaml" if args.quick else args.grid)
    run_grid(grid, args.output_dir, jobs=args.jobs, title=args.title)
    print((Path(args.output_dir) / "ablation.md").read_text())


if __name__ == "__main__":
    sys.exit(run_main(main))
