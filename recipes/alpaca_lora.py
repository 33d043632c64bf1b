"""Fine-tune a causal LM on Alpaca-format instructions with LoRA (PEFT's or ftkit's).

The recipe YAML says *what* to train; the Accelerate config says *how* (precision, processes):

    accelerate launch recipes/alpaca_lora.py                        # embedded tiny default, CPU
    accelerate launch recipes/alpaca_lora.py --lora_impl ftkit      # ftkit's own LoRA
    accelerate launch --config_file accelerate_configs/single_gpu_fp16.yaml \
        recipes/alpaca_lora.py --config recipes/llama2-7b/lora.yaml
    accelerate launch --config_file accelerate_configs/ddp_2gpu_fp16.yaml \
        recipes/alpaca_lora.py --config recipes/llama2-7b/lora.yaml    # two T4s

Any recipe field can be overridden as ``--field value``.
"""

import sys
from pathlib import Path

from ftkit.cli import run_main
from ftkit.config import parse_recipe

DEFAULT_RECIPE = Path(__file__).parent / "tiny" / "lora.yaml"


def main(argv=None) -> None:
    recipe = parse_recipe(argv, default_config=DEFAULT_RECIPE)
    # Imported once the recipe is valid: a bad flag fails fast, before peft/bitsandbytes load.
    from ftkit.train import train

    train(recipe)


if __name__ == "__main__":
    sys.exit(run_main(main))
