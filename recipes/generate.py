"""Generate with a trained adapter, optionally next to its base model (before/after).

    python recipes/generate.py --adapter_dir outputs/tiny-llama-lora --instruction "Name a colour."
    python recipes/generate.py --adapter_dir outputs/tiny-llama-lora --prompts_file prompts.txt
    python recipes/generate.py --adapter_dir outputs/tiny-llama-lora \
        --dataset held_out.json --num_samples 10 --report before_after.md

The base defaults to the adapter's ``base_model_name_or_path``; prompts use the training template.
Only the response is printed. ``--report`` writes base and fine-tuned answers side by side.
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ftkit.cli import run_main
from ftkit.inference import (
    AdapterArgs,
    GenerationOptions,
    PromptArgs,
    generate_before_after,
    load_prompts,
)
from ftkit.io import atomic_write_text


@dataclass
class ReportArgs:
    compare_base: bool = field(
        default=False, metadata={"help": "Also answer with the base model alone (before)."}
    )
    report: str | None = field(
        default=None,
        metadata={"help": "Write base vs fine-tuned answers as a Markdown table to this path."},
    )


def generate(argv=None) -> None:
    parser = HfArgumentParser((AdapterArgs, PromptArgs, GenerationOptions, ReportArgs))
    adapter_args, prompt_args, options, report_args = parser.parse_args_into_dataclasses(argv)
    prompts = load_prompts(prompt_args)
    compare_base = report_args.compare_base or report_args.report is not None
    result = generate_before_after(adapter_args, prompts, options, compare_base)
    print(result.console())
    if report_args.report:
        atomic_write_text(report_args.report, result.markdown())
        print(f"before/after report written to {report_args.report}", file=sys.stderr)


def main(argv=None) -> int:
    return run_main(lambda: generate(argv))


if __name__ == "__main__":
    sys.exit(main())
