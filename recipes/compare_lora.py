"""Train ftkit's LoRA and PEFT's LoRA on the same recipe and seed; write a parity report.

    python recipes/compare_lora.py                       # embedded default, 20 steps, dropout 0
    python recipes/compare_lora.py --output_dir outputs/parity -- --config recipes/tiny/lora.yaml

Arguments after ``--`` go to recipes/alpaca_lora.py unchanged (``--lora_impl``/``--output_dir``
are set per run).
"""

import argparse
import sys

from ftkit.cli import run_main
from ftkit.compare import compare_lora

PARITY_ARGS = ["--max_steps", "20", "--lora_dropout", "0"]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, recipe_args = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/lora-parity")
    parser.add_argument("--accelerate_config", default="accelerate_configs/cpu.yaml")
    args = parser.parse_args(ours)
    figures = compare_lora(PARITY_ARGS + recipe_args, args.output_dir, args.accelerate_config)
    print(
        f"max |Δloss| {figures['max_abs_loss_diff']:.3e}, max |ΔW| {figures['max_abs_weight_diff']:.3e}, "
        f"step time ftkit/PEFT {figures['step_time_ratio_own_over_peft']:.3f}; report in {args.output_dir}"
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
