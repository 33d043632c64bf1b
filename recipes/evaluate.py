"""Loss and perplexity of the base vs the fine-tuned model on held-out data.

    python recipes/evaluate.py --adapter_dir outputs/tiny-llama-lora     # the run's held-out split
    python recipes/evaluate.py --adapter_dir outputs/tiny-llama-lora --dataset held_out.json \
        --num_samples 200 --output_json eval.json

Scored per supervised response token with the training masks (prompt tokens do not count).
"""

import dataclasses
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ftkit.cli import run_main
from ftkit.inference import AdapterArgs, EvalArgs, evaluate_before_after
from ftkit.io import atomic_write_json


@dataclass
class OutputArgs:
    output_json: str | None = field(default=None, metadata={"help": "Also write results here."})


def evaluate(argv=None) -> None:
    parser = HfArgumentParser((AdapterArgs, EvalArgs, OutputArgs))
    adapter_args, eval_args, output_args = parser.parse_args_into_dataclasses(argv)
    report = evaluate_before_after(adapter_args, eval_args)
    print(report.table())
    if output_args.output_json:
        atomic_write_json(output_args.output_json, dataclasses.asdict(report))


def main(argv=None) -> int:
    return run_main(lambda: evaluate(argv))


if __name__ == "__main__":
    sys.exit(main())
