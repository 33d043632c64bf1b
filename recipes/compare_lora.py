"""``ftkit compare``: ftkit's LoRA vs PEFT's on one recipe and seed, as a parity report.

python recipes/compare_lora.py --output_dir outputs/lora-parity --max_steps 20
"""

import sys

from ftkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
