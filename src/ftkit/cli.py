"""The ``ftkit`` command: one subcommand per job, one ``ftkit error:`` line (exit 2) for bad input.

    ftkit train [--config NAME|PATH] [--field value ...]   fine-tune (the recipe's flags)
    ftkit launch [TRAIN FLAGS] -- [ACCELERATE FLAGS]       the same under `accelerate launch`
    ftkit generate | merge | evaluate                      use a trained adapter
    ftkit estimate | plan | compare | ablation | bench     the measurement lab

Each subcommand imports what it needs only once its arguments are valid, so a bad flag fails
fast, before torch, peft or bitsandbytes load. Tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from ftkit import quiet
from ftkit.config import ArgParser
from ftkit.console import run_main
from ftkit.launcher import run_launcher, split_launch_args

PROG = "ftkit"


# -- core commands --------------------------------------------------------------------------------


LAUNCH_USAGE = f"""usage: {PROG} launch [TRAIN FLAGS] -- [ACCELERATE LAUNCH FLAGS]

Runs `accelerate launch -q ACCELERATE_FLAGS -m ftkit train TRAIN_FLAGS`. The recipe is checked
here first; with several processes an ftkit error stays the last line on screen (torchrun's
failure report is held back). The train flags:
"""


def launch(argv: list[str]) -> int:
    from ftkit.config import DEFAULT_RECIPE, parse_recipe

    train_flags, launcher_flags = split_launch_args(argv)
    if "-h" in train_flags or "--help" in train_flags:
        print(LAUNCH_USAGE)
    # Bad input fails here, in one line, before any process starts.
    parse_recipe(train_flags, default_config=DEFAULT_RECIPE, prog=f"{PROG} launch")
    return run_launcher(train_flags, launcher_flags)


def train(argv: list[str]) -> None:
    from ftkit.config import DEFAULT_RECIPE, parse_recipe

    recipe = parse_recipe(argv, default_config=DEFAULT_RECIPE, prog=f"{PROG} train")
    quiet.quiet_bitsandbytes(quantised=recipe.model.load_in_8bit or recipe.model.load_in_4bit)
    # Imported once the recipe is valid: a bad flag fails fast, before peft/bitsandbytes load.
    from ftkit.train import train as run

    run(recipe)


@dataclass
class ReportArgs:
    compare_base: bool = field(
        default=False, metadata={"help": "Also answer with the base model alone (before)."}
    )
    report: str | None = field(
        default=None,
        metadata={"help": "Write base vs fine-tuned answers as a Markdown table to this path."},
    )


def generate(argv: list[str]) -> None:
    from ftkit.adapters import AdapterArgs
    from ftkit.generate import GenerationOptions, PromptArgs, generate_before_after, load_prompts
    from ftkit.io import atomic_write_text

    parser = ArgParser((AdapterArgs, PromptArgs, GenerationOptions, ReportArgs), prog=_prog())
    adapter_args, prompt_args, options, report_args = parser.parse_args_into_dataclasses(argv)
    prompts = load_prompts(prompt_args)
    compare_base = report_args.compare_base or report_args.report is not None
    result = generate_before_after(adapter_args, prompts, options, compare_base)
    print(result.console())
    if report_args.report:
        atomic_write_text(report_args.report, result.markdown())
        print(f"before/after report written to {report_args.report}", file=sys.stderr)


@dataclass
class MergeOutputArgs:
    output_dir: str = field(metadata={"help": "New dir for the merged model + tokenizer."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace a merged model ftkit wrote there (never anything else)."},
    )


def merge(argv: list[str]) -> None:
    from ftkit.adapters import AdapterArgs
    from ftkit.merge import merge_and_export

    parser = ArgParser((AdapterArgs, MergeOutputArgs), prog=_prog())
    adapter_args, output_args = parser.parse_args_into_dataclasses(argv)
    result = merge_and_export(adapter_args, output_args.output_dir, output_args.overwrite)
    print(
        f"merged model written to {result.output_dir} "
        f"(max |logit difference| vs the adapter: {result.max_abs_logit_diff:.2e})"
    )


@dataclass
class EvalOutputArgs:
    output_json: str | None = field(default=None, metadata={"help": "Also write results here."})


def evaluate(argv: list[str]) -> None:
    import dataclasses

    from ftkit.adapters import AdapterArgs
    from ftkit.evaluate import EvalArgs, evaluate_before_after
    from ftkit.io import atomic_write_json

    parser = ArgParser((AdapterArgs, EvalArgs, EvalOutputArgs), prog=_prog())
    adapter_args, eval_args, output_args = parser.parse_args_into_dataclasses(argv)
    report = evaluate_before_after(adapter_args, eval_args)
    print(report.table())
    if output_args.output_json:
        atomic_write_json(output_args.output_json, dataclasses.asdict(report))


# -- the measurement lab --------------------------------------------------------------------------


def estimate(argv: list[str]) -> None:
    from ftkit.lab.gpus import ALIASES, GPUS
    from ftkit.lab.planner import DEVICES, STRATEGIES, TrainingPlan
    from ftkit.lab.planner import estimate as plan_estimate

    parser = ArgParser(prog=_prog(), description="Predict per-device training memory by category.")
    parser.add_argument(
        "--model", default="llama2-7b", help="preset name or a local directory with config.json"
    )
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument(
        "--lora_targets", default=None, help="comma-separated module names (BLOOM q/v rows only: "
        "query_key_value:qv)"
    )  # fmt: skip
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--quantization", choices=["none", "8bit", "4bit"], default="none")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size per device")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument(
        "--padding_free", choices=["auto", "true", "false"], default="auto",
        help="one flattened row per micro-batch (auto: where exact, as training's default)",
    )  # fmt: skip
    parser.add_argument(
        "--attn_implementation", choices=["auto", "sdpa", "sdpa_varlen"], default="auto",
        help="attention over a flattened row (auto: sdpa_varlen, as training's default)",
    )  # fmt: skip
    parser.add_argument(
        "--full_logits", action="store_true",
        help="LM head at every position (supervised_logits_only false)",
    )  # fmt: skip
    parser.add_argument(
        "--supervised_fraction", type=float, default=1.0,
        help="share of each sequence's positions that are supervised (not prompt)",
    )  # fmt: skip
    parser.add_argument("--world_size", type=int, default=1)
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    parser.add_argument("--device", choices=DEVICES, default="cuda")
    parser.add_argument(
        "--gpu",
        action="append",
        choices=[*GPUS, *ALIASES],
        help="GPU to judge against (repeatable)",
    )
    parser.add_argument(
        "--paper", action="store_true", help="the course's settings beside published figures"
    )
    args = parser.parse_args(argv)
    if args.paper:
        from ftkit.lab.cited import paper_report

        print(paper_report())
        return
    plan = TrainingPlan(
        lora_r=None if args.full else args.lora_r,
        lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else None,
        lora_dropout=args.lora_dropout,
        precision=args.precision,
        quantization=None if args.quantization == "none" else args.quantization,
        gradient_checkpointing=args.gradient_checkpointing,
        micro_batch_size=args.batch,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seq_len=args.seq_len,
        padding_free={"auto": None, "true": True, "false": False}[args.padding_free],
        attn_implementation=args.attn_implementation,
        supervised_logits_only=not args.full_logits,
        supervised_fraction=args.supervised_fraction,
        world_size=args.world_size,
        strategy=args.strategy,
        device=args.device,
    )
    result = plan_estimate(args.model, plan)
    print(result.table())
    for gpu in args.gpu or GPUS:
        print("  " + str(result.verdict(gpu)))


def plan(argv: list[str]) -> None:
    parser = ArgParser(
        prog=_prog(),
        description="Rank the recipes that fit COUNT x GPU by predicted step time; --write DIR "
        "writes the fastest as DIR/recipe.yaml + DIR/accelerate.yaml for `ftkit launch`.",
    )
    parser.add_argument(
        "--model", default="llama2-7b", help="preset name or a local directory with config.json"
    )
    parser.add_argument(
        "--gpus", required=True,
        help="COUNTxNAME: T4, L4, A10G, A100-40GB, A100-80GB, H100, H200 or a --gpu_spec name",
    )  # fmt: skip
    parser.add_argument(
        "--gpu_spec", action="append", default=[],
        help="another GPU, NAME:MiB:TFLOPS:GBps[:bf16] (dense 16-bit TFLOPS; repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda",
        help="cpu: plan one fp32 CPU process against a --gpu_spec budget (the planner's proof)",
    )  # fmt: skip
    parser.add_argument("--global_batch", type=int, default=32, help="sequences per step, all GPUs")
    parser.add_argument("--seq_len", type=int, default=512, help="max_length of a sequence")
    parser.add_argument(
        "--dataset", default=None,
        help="read real token lengths and supervised positions from it (needs a tokenizer); the "
        "written recipe trains on it (default there: tatsu-lab/alpaca)",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer dir for --dataset (default: --model's dir)"
    )
    parser.add_argument("--num_samples", type=int, default=0, help="read the first N records")
    parser.add_argument(
        "--skip_bad_records", action="store_true",
        help="skip malformed records (and have the written recipe skip them too)",
    )  # fmt: skip
    parser.add_argument(
        "--supervised_fraction", type=float, default=1.0,
        help="without --dataset: share of each sequence's positions that are supervised",
    )  # fmt: skip
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_targets", default=None, help="comma-separated module names")
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    parser.add_argument(
        "--margin", type=float, default=0.10, help="share of each GPU's memory kept free"
    )
    parser.add_argument(
        "--efficiency", type=float, default=None,
        help="share of the dense rate a step gets (default 0.5 on GPUs, assumed)",
    )  # fmt: skip
    parser.add_argument("--link_GBps", type=float, default=None, help="GPU-to-GPU GB/s one way")
    parser.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    parser.add_argument("--write", default=None, help="write recipe.yaml + accelerate.yaml here")
    parser.add_argument(
        "--output_dir", default=None, help="the written recipe's output_dir (default DIR/run)"
    )
    args = parser.parse_args(argv)
    from ftkit.lab.plan import Method, hardware_from_flags, make_plan, workload_from_flags

    hardware = hardware_from_flags(
        args.gpus, args.gpu_spec, args.device, args.margin, args.efficiency, args.link_GBps
    )
    method = Method(
        lora_r=None if args.full else args.lora_r,
        lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else None,
        lora_dropout=args.lora_dropout,
    )
    workload = workload_from_flags(
        args.model,
        args.seq_len,
        args.dataset,
        args.tokenizer,
        args.num_samples,
        args.supervised_fraction,
        args.skip_bad_records,
    )
    result = make_plan(args.model, hardware, workload, method, args.global_batch)
    print(result.report(args.top))
    if args.write:
        import shlex

        from ftkit.lab.plan import write_plan

        recipe, accelerate = write_plan(
            result,
            args.write,
            dataset=args.dataset,
            output_dir=args.output_dir,
            command=shlex.join([PROG, *_current, *argv]),
        )
        print(f"wrote {recipe} and {accelerate}")


PARITY_ARGS = ["--max_steps", "20", "--lora_dropout", "0"]


def compare(argv: list[str]) -> None:
    parser = ArgParser(
        prog=_prog(),
        description="Train ftkit's and PEFT's LoRA on one recipe and seed; write a parity report. "
        f"Other flags are recipe flags (default {' '.join(PARITY_ARGS)}); --lora_impl is set "
        "per run.",
    )
    parser.add_argument("--output_dir", default="outputs/lora-parity")
    parser.add_argument(
        "--accelerate_config", default=None, help="accelerate config file (default: 1 process)"
    )
    args, recipe_args = parser.parse_known_args(argv)
    recipe_args = PARITY_ARGS + recipe_args
    from ftkit.config import DEFAULT_RECIPE, parse_recipe

    # A bad recipe flag fails here, not in a subprocess.
    parse_recipe(recipe_args, default_config=DEFAULT_RECIPE, prog=_prog())
    from ftkit.lab.compare import compare_lora

    figures = compare_lora(recipe_args, args.output_dir, args.accelerate_config)
    print(
        f"max |Δloss| {figures['max_abs_loss_diff']:.3e}, max |ΔW| "
        f"{figures['max_abs_weight_diff']:.3e}, step time ftkit/PEFT "
        f"{figures['step_time_ratio_own_over_peft']:.3f}; report in {args.output_dir}"
    )


def _grid_parser(grid: str, output_dir: str, title: str) -> argparse.ArgumentParser:
    parser = ArgParser(prog=_prog(), description="Train every cell of a grid in its own process.")
    parser.add_argument(
        "--grid", default=grid, help="a shipped grid (quick, full, bench, planner-32k) or path"
    )
    parser.add_argument("--output_dir", default=output_dir)
    parser.add_argument("--title", default=title)
    parser.add_argument("--dataset", default=None, help="replace the grid's dataset (a path)")
    parser.add_argument("--tokenizer", default=None, help="replace the grid's tokenizer (a dir)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="cells run at once (>1 skews the timings, not memory)"
    )
    return parser


def _run_grid(args) -> None:
    from pathlib import Path

    from ftkit.lab.ablation import Grid, run_grid

    grid = Grid.load(args.grid, dataset=args.dataset, tokenizer=args.tokenizer)
    run_grid(grid, args.output_dir, jobs=args.jobs, title=args.title)
    print((Path(args.output_dir) / "ablation.md").read_text())


def ablation(argv: list[str]) -> None:
    parser = _grid_parser("full", "outputs/ablation", "What each technique buys: the ablation grid")
    parser.add_argument("--quick", action="store_true", help="the small CI grid (--grid quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.grid = "quick"
    _run_grid(args)


def bench(argv: list[str]) -> None:
    parser = _grid_parser("bench", "outputs/bench", "Speed benchmark: ratios from one run")
    _run_grid(parser.parse_args(argv))


COMMANDS: dict[str, tuple[Callable[[list[str]], int | None], str]] = {
    "train": (train, "fine-tune with LoRA (recipe flags; --config NAME|PATH)"),
    "launch": (launch, "train under `accelerate launch` (DDP, DeepSpeed, FSDP, several nodes)"),
    "generate": (generate, "generate with a trained adapter (and its base, before/after)"),
    "merge": (merge, "merge an adapter into its base: a standalone model"),
    "evaluate": (evaluate, "loss and perplexity, base vs fine-tuned, on held-out data"),
    "estimate": (estimate, "predict training memory per device, and which GPUs hold it"),
    "plan": (plan, "the fastest recipe that fits COUNT x GPU, ranked; --write DIR to launch it"),
    "compare": (compare, "ftkit's own LoRA vs PEFT's on one recipe: a parity report"),
    "ablation": (ablation, "what GA, bf16, LoRA and GC each buy: the ablation grid"),
    "bench": (bench, "speed benchmark: ratios between cells of one run"),
}
_current: list[str] = []


def _prog() -> str:
    return " ".join([PROG, *_current])


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"ftkit error: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    _current[:] = [name]
    return run_main(lambda: COMMANDS[name][0](rest))
