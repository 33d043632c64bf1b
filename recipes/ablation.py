"""``ftkit ablation``: what GA, bf16, LoRA and gradient checkpointing each buy, measured.

python recipes/ablation.py --dataset ../shared/data/alpaca_5000.json   # the full grid
python recipes/ablation.py --quick                                    # the small CI grid
python recipes/ablation.py --grid bench --output_dir outputs/bench    # = ftkit bench
"""

import sys

from ftkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablation", *sys.argv[1:]]))
