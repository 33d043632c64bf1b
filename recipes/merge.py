"""Merge a trained adapter into its base and save a standalone model + tokenizer.

    python recipes/merge.py --adapter_dir outputs/tiny-llama-lora --output_dir outputs/merged

The result loads with plain ``AutoModelForCausalLM.from_pretrained`` (no ftkit, no PEFT). The
base is loaded in full precision (``--dtype``, float32 by default); a quantised base is refused.
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ftkit.cli import run_main
from ftkit.inference import AdapterArgs
from ftkit.merge import merge_adapter


@dataclass
class OutputArgs:
    output_dir: str = field(metadata={"help": "New dir for the merged model + tokenizer."})


def merge(argv=None) -> None:
    parser = HfArgumentParser((AdapterArgs, OutputArgs))
    adapter_args, output_args = parser.parse_args_into_dataclasses(argv)
    result = merge_adapter(adapter_args, output_args.output_dir)
    print(
        f"merged model written to {result.output_dir} "
        f"(max |logit difference| vs the adapter: {result.max_abs_logit_diff:.2e})"
    )


def main(argv=None) -> int:
    return run_main(lambda: merge(argv))


if __name__ == "__main__":
    sys.exit(main())
