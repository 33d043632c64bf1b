"""ftkit against its peers on one workload: TRL's SFTTrainer, HF Trainer + PEFT, a bare torch loop.

The workload is ``ftkit.lab.throughput``'s: a LLaMA-shaped model built from config (random
weights, the real 32,000-token LLaMA-2 vocabulary and tokenizer), the first N real Alpaca
records, LoRA r 8 on q/v with dropout 0, fp32, a fixed number of optimizer steps, the prompt
masked everywhere. Every run is a fresh ``accelerate launch`` process (ftkit's rows run ``ftkit
train``, the others ``ftkit.lab.peer_systems``), systems interleaved round by round (the order
rotated each round), medians over rounds.

Speed is supervised tokens trained ÷ the wall time of the steps (first batch drawn to last
optimizer step; loading and tokenising excluded), so a system that packs more sequences into a
step is credited for them. Peak RSS is ``ru_maxrss`` of each launch's process tree (``wait4``).
Every system must train the same supervised tokens per step as ftkit's default (same records,
same masks); where one does not, the report says by how much and whether it trained other
sequences (packing, length grouping) or the same sequences tokenised differently.

    python -m ftkit.lab.peers --dataset ../shared/data/alpaca_5000.json \
        --tokenizer ../shared/fixtures/llama2-tokenizer --results_dir results/peers-cpu
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ftkit.console import run_main
from ftkit.errors import FtkitError
from ftkit.io import atomic_write_text
from ftkit.lab.launch import (
    child_env,
    launch_recipe,
    recipe_flags,
    run_measured,
    single_process_flags,
)
from ftkit.lab.peer_systems import LORA_TARGET
from ftkit.lab.throughput import build_model, write_records

REFERENCE = "ftkit"
# The workload's precision, the same for every system: fp32, or bf16 autocast over a bf16 base
# (adapters in fp32), as Accelerate's bf16 mixed precision with model_dtype bf16 runs it.
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


TOLERANCE = 0.002  # supervised tokens per step may differ from ftkit default's by 0.2 %


TRL_NOTE = (
    "TRL tokenises prompt + completion as one text, so the response's first word is split "
    "without SentencePiece's word-start piece (ftkit tokenises the response on its own)"
)


@dataclass(frozen=True)
class System:
    """One row: an ftkit recipe (overrides of the workload) or a ``peer_systems`` runner."""

    key: str
    label: str
    recipe: dict | None = None
    runner: str | None = None
    what: str = ""
    needs: tuple[str, ...] = field(default_factory=tuple)
    batches: str = "same"  # same records per step as ftkit default, or "grouped" / "packed"
    note: str = ""  # why its supervised tokens differ from ftkit default's, where known


SYSTEMS = {
    s.key: s
    for s in (
        System("ftkit", "ftkit default", recipe={}),
        System("ftkit-own-lora", "ftkit default, own LoRA", recipe={"lora_impl": "ftkit"}),
        System(
            "ftkit-padded",
            "ftkit, padded + full logits (before #12/#15)",
            recipe={"padding_free": "false", "supervised_logits_only": False},
        ),
        System(
            "trl",
            "TRL SFTTrainer, default",
            runner="trl",
            what="padded, prompt/completion",
            needs=("trl",),
            note=TRL_NOTE,
        ),
        System(
            "trl-padding-free",
            "TRL SFTTrainer, padding_free",
            runner="trl_padding_free",
            what="one flattened row, untruncated",
            needs=("trl",),
            note=TRL_NOTE,
        ),
        System(
            "trl-packing",
            "TRL SFTTrainer, packing",
            runner="trl_packing",
            what="BFD-packed rows of max_length",
            needs=("trl",),
            batches="packed",
        ),
        System(
            "hf",
            "HF Trainer + PEFT + DataCollatorForSeq2Seq",
            runner="hf",
            what="padded, full logits",
        ),
        System(
            "hf-group-by-length",
            "HF Trainer + PEFT, group_by_length",
            runner="hf_group_by_length",
            what="length-grouped, padded, full logits",
            batches="grouped",
        ),
        System(
            "bare",
            "bare torch loop over ftkit's batches",
            runner="bare",
            what="ftkit default's batches, model and loss",
        ),
    )
}
DEFAULT_SYSTEMS = [key for key in SYSTEMS if key != "ftkit-padded"]


def workload_recipe(args, model_dir: Path, data: Path) -> dict:
    """The recipe fields that fix the workload; batching and logits stay ftkit's defaults.

    The optimisation is pinned to the recipe dataclasses' defaults, because ``ftkit train``
    otherwise starts from the shipped ``tiny`` recipe (LoRA r 16, learning rate 3e-3); the peer
    rows read the same fields, so every system runs the same update.
    """
    from ftkit.config import AdapterConfig, TrainConfig

    adapter, train = AdapterConfig(), TrainConfig()
    return {
        "model_name_or_path": str(model_dir),
        "dataset": str(data),
        "validation_size": 0,
        "max_length": args.max_length,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "lora_impl": adapter.lora_impl,
        "lora_r": 8,
        "lora_alpha": adapter.lora_alpha,
        "lora_target": LORA_TARGET,
        "lora_dropout": 0.0,
        **{
            name: getattr(train, name)
            for name in (
                "learning_rate",
                "lr_scheduler_type",
                "warmup_ratio",
                "weight_decay",
                "max_grad_norm",
            )
        },
        "logging_steps": 1,
        "save_steps": 0,
        "seed": args.seed,
        "model_dtype": "bf16" if args.precision == "bf16" else "fp32",
    }


def sequences_trained(records: int, batch_size: int, steps: int) -> int:
    """Sequences in the first ``steps`` batches over ``records`` (each epoch's last may be short)."""
    per_epoch = -(-records // batch_size)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * records + min(rest * batch_size, records)


def run_ftkit(system: System, args, recipe: dict, run_dir: Path) -> dict:
    """``ftkit train`` as users run it; its metrics.json gives the counts and wall time."""
    values = {**recipe, **system.recipe, "overwrite_output_dir": True}
    run = launch_recipe(
        single_process_flags(MIXED_PRECISION[args.precision], args.threads),
        recipe_flags(values),
        run_dir,
        name=system.label,
        env=child_env(),
    )
    figures, techniques = run.metrics["throughput"], run.metrics["techniques"]
    return {
        "what": f"{techniques['lora_impl']} LoRA; {figures['batching']}, "
        f"{figures['logits_mode']} logits",
        "supervised_tokens": figures["supervised_tokens"],
        "supervised_per_step": None,  # ftkit's rows log no per-step count; the bare loop does
        "sequences": sequences_trained(run.metrics["train_records"], args.batch_size, args.steps),
        "computed_tokens": figures["computed_tokens"],
        "window_wall_s": run.metrics["wall_time_s"],
        "step_time_s_median": statistics.median(row["step_time_s"] for row in run.steps),
        "peak_rss_bytes": run.max_rss_bytes,
        "peak_device_bytes": run.metrics["memory"]["peak_bytes"] if _cuda() else None,
        "final_loss": run.steps[-1]["loss"],
    }


def run_peer(system: System, args, recipe: dict, model_dir: Path, data: Path, run_dir: Path):
    """One ``peer_systems`` run in its own ``accelerate launch`` process."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "system": system.runner,
        "model_dir": str(model_dir),
        "records": str(data),
        "recipe": recipe,
        "output_dir": str(run_dir / "trainer"),
        "result": str(run_dir / "result.json"),
        "precision": args.precision,
    }
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    (run_dir / "result.json").unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        *single_process_flags(MIXED_PRECISION[args.precision], args.threads),
        "-m", "ftkit.lab.peer_systems", str(spec_path),
    ]  # fmt: skip
    done = run_measured(command, child_env())
    (run_dir / "stderr.log").write_text(done.stderr, encoding="utf-8")
    if done.returncode != 0:
        raise FtkitError(f"{system.label} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    steps = result["steps"]
    return {
        "what": system.what,
        "supervised_tokens": sum(s["supervised_tokens"] for s in steps),
        "supervised_per_step": [s["supervised_tokens"] for s in steps],
        "sequences": sum(s["sequences"] for s in steps),
        "computed_tokens": sum(s["computed_tokens"] for s in steps),
        "window_wall_s": result["window_wall_s"],
        "step_time_s_median": statistics.median(s["step_time_s"] for s in steps),
        "peak_rss_bytes": done.max_rss_bytes,
        "peak_device_bytes": result.get("peak_device_bytes"),
        "final_loss": result["final_loss"],
    }


def run_system(key: str, round_: int, args, recipe, model_dir: Path, data: Path, out: Path):
    system = SYSTEMS[key]
    run_dir = out / "runs" / f"r{round_}-{key}"
    if system.recipe is not None:
        figures = run_ftkit(system, args, recipe, run_dir)
    else:
        figures = run_peer(system, args, recipe, model_dir, data, run_dir)
    return {
        "system": key,
        "label": system.label,
        "round": round_,
        "steps": args.steps,
        "supervised_tokens_per_s": figures["supervised_tokens"] / figures["window_wall_s"],
        **figures,
    }


# -- the table ----------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> list[dict]:
    """One row per system: medians over rounds; counts must not change between rounds."""
    by_system: dict[str, list[dict]] = {}
    for row in rows:
        by_system.setdefault(row["system"], []).append(row)
    table = []
    for key, runs in by_system.items():
        counts = {(r["supervised_tokens"], r["sequences"], r["computed_tokens"]) for r in runs}
        if len(counts) != 1:
            raise FtkitError(f"{key} trained different tokens in different rounds: {counts}")
        first = runs[0]
        steps = first["steps"]
        table.append(
            {
                "system": key,
                "label": first["label"],
                "what": first["what"],
                "rounds": len(runs),
                "supervised_tokens_per_s": statistics.median(
                    r["supervised_tokens_per_s"] for r in runs
                ),
                "step_time_s": statistics.median(r["window_wall_s"] / steps for r in runs),
                "step_time_s_median": statistics.median(r["step_time_s_median"] for r in runs),
                "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs),
                "peak_device_bytes": None
                if first["peak_device_bytes"] is None
                else statistics.median(r["peak_device_bytes"] for r in runs),
                "supervised_tokens": first["supervised_tokens"],
                "supervised_per_step": first["supervised_per_step"],
                "supervised_tokens_per_step": first["supervised_tokens"] / steps,
                "sequences_per_step": first["sequences"] / steps,
                "computed_tokens_per_step": first["computed_tokens"] / steps,
                "final_loss": first["final_loss"],
            }
        )
    reference = next((row for row in table if row["system"] == REFERENCE), None)
    for row in table:
        row["speedup"] = (
            row["supervised_tokens_per_s"] / reference["supervised_tokens_per_s"]
            if reference
            else None
        )
    return table


def token_check(table: list[dict], tolerance: float = TOLERANCE) -> list[dict]:
    """Each system's supervised tokens per step against ftkit default's, and why they differ.

    Judged on the mean over the run (what tokens/s divides by); the worst single step is shown
    beside it. ftkit's rows log totals only, so per step the reference is the bare loop (ftkit
    default's own batches, whose total must equal ftkit default's).
    """
    by_key = {row["system"]: row for row in table}
    reference = by_key.get(REFERENCE) or by_key.get("bare")
    if reference is None:
        return []
    per_step_reference = by_key.get("bare", {}).get("supervised_per_step")
    checks = []
    for row in table:
        system = SYSTEMS[row["system"]]
        diff = row["supervised_tokens_per_step"] / reference["supervised_tokens_per_step"] - 1
        per_step = row["supervised_per_step"]
        worst = None
        if per_step and per_step_reference and len(per_step) == len(per_step_reference):
            worst = max(abs(a / b - 1) for a, b in zip(per_step, per_step_reference, strict=True))
        agrees = abs(diff) <= tolerance
        why = ""
        if system.batches == "packed":
            why = (
                f"packed rows: {row['sequences_per_step']:.1f} sequences per step, not "
                f"{reference['sequences_per_step']:.1f}"
            )
        elif system.batches == "grouped":
            why = "length-grouped batches: other records in each step"
        elif not agrees or (worst is not None and worst > tolerance):
            why = system.note or "the same records, tokenised or truncated differently"
        elif worst is None and row["system"] != reference["system"]:
            why = "(compared on the run's total: no per-step count)"
        checks.append(
            {
                "system": row["system"],
                "label": row["label"],
                "supervised_tokens_per_step": row["supervised_tokens_per_step"],
                "relative_difference": diff,
                "worst_step_difference": worst,
                "agrees": agrees,
                "why": why,
            }
        )
    return checks


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.2f} %"


def report(table, checks, args, command: str, machine: str) -> str:
    by_key = {row["system"]: row for row in table}
    lines = [
        "# ftkit vs peers (`make bench-peers`)",
        "",
        f"Machine: {machine}. Command: `{command}`.",
        f"Workload: LLaMA-shaped model from config (hidden {args.hidden}, {args.layers} layers, "
        "the real 32,000-token LLaMA-2 tokenizer), the first "
        f"{args.records} Alpaca records, max_length {args.max_length}, batch {args.batch_size}, no "
        f"accumulation, LoRA r 8 on q/v, dropout 0, {args.precision}, no gradient checkpointing, "
        f"{args.steps} steps, {args.threads} threads; the prompt masked everywhere. Every run a "
        f"fresh process, {args.rounds} interleaved round(s), medians. Speed: supervised tokens "
        "÷ wall time of the steps (first batch drawn to last optimizer step; loading excluded). "
        "Peak RSS: ru_maxrss of the launch's process tree.",
        "",
        "| system | what ran | supervised tok/s | × ftkit default | s/step "
        "| supervised tok/step | sequences/step | computed tok/step | peak RSS GiB "
        "| peak GPU GiB (allocated) | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        speedup = "—" if row["speedup"] is None else f"{row['speedup']:.2f}"
        loss = "—" if row["final_loss"] is None else f"{row['final_loss']:.3f}"
        gpu = row.get("peak_device_bytes")
        lines.append(
            f"| {row['label']} | {row['what']} | {row['supervised_tokens_per_s']:.0f} "
            f"| {speedup} | {row['step_time_s']:.3f} | {row['supervised_tokens_per_step']:.1f} "
            f"| {row['sequences_per_step']:.2f} | {row['computed_tokens_per_step']:.0f} "
            f"| {row['peak_rss_bytes'] / 2**30:.2f} | {'—' if gpu is None else f'{gpu / 2**30:.2f}'} "
            f"| {loss} |"
        )
    lines += [
        "",
        f"## Supervised tokens per step (tolerance {100 * TOLERANCE:.1f} % of ftkit default's)",
        "",
        "| system | supervised tok/step | vs ftkit default | worst step vs bare loop "
        "| within tolerance | where it differs |",
        "|---|---|---|---|---|---|",
    ]
    for check in checks:
        lines.append(
            f"| {check['label']} | {check['supervised_tokens_per_step']:.1f} "
            f"| {_pct(check['relative_difference'])} | {_pct(check['worst_step_difference'])} "
            f"| {'yes' if check['agrees'] else 'NO'} | {check['why']} |"
        )
    if REFERENCE in by_key and "bare" in by_key:
        ratio = by_key[REFERENCE]["step_time_s"] / by_key["bare"]["step_time_s"]
        lines += [
            "",
            f"ftkit default's step time ÷ the bare loop's: **{ratio:.3f}** (goal ≤ 1.03).",
        ]
    peers = [r for r in table if not r["system"].startswith(("ftkit", "bare"))]
    if REFERENCE in by_key and peers:
        best = max(peers, key=lambda r: r["supervised_tokens_per_s"])
        lines.append(
            f"Best peer: {best['label']}, {best['speedup']:.2f}× ftkit default "
            f"(ftkit default is {1 / best['speedup']:.2f}× it)."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m ftkit.lab.peers", description=__doc__)
    parser.add_argument("--dataset", required=True, help="Alpaca JSON (the real records)")
    parser.add_argument("--tokenizer", required=True, help="the LLaMA-2 tokenizer directory")
    parser.add_argument("--output_dir", default="outputs/peers")
    parser.add_argument("--results_dir", default=None, help="also write the report here")
    parser.add_argument("--records", type=int, default=800)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="per run (all cores)"
    )
    parser.add_argument("--systems", nargs="*", default=DEFAULT_SYSTEMS, choices=list(SYSTEMS))
    parser.add_argument(
        "--precision", choices=list(MIXED_PRECISION), default="fp32",
        help="every system's: fp32, or bf16 (base in bf16, autocast; a GPU with bf16)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    missing = sorted(
        {n for key in args.systems for n in SYSTEMS[key].needs if not importlib.util.find_spec(n)}
    )
    if missing:
        raise FtkitError(
            f"the rows {[k for k in args.systems if SYSTEMS[k].needs]} need {', '.join(missing)}: "
            "pip install -e '.[bench]' (or leave them out with --systems)"
        )
    from ftkit.lab.ablation import machine

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(out, args.tokenizer, args.hidden, args.layers, args.precision)
    data = write_records(args.dataset, args.records, out / f"records-{args.records}.json")
    recipe = workload_recipe(args, model_dir, data)
    rows = []
    for round_ in range(args.rounds):
        shift = round_ % len(args.systems)
        for key in args.systems[shift:] + args.systems[:shift]:
            row = run_system(key, round_, args, recipe, model_dir, data, out)
            print(json.dumps({k: v for k, v in row.items() if k != "supervised_per_step"}))
            rows.append(row)
    rows.sort(key=lambda r: (args.systems.index(r["system"]), r["round"]))
    table = summarise(rows)
    checks = token_check(table)
    command = shlex.join(["python", "-m", "ftkit.lab.peers", *(argv or sys.argv[1:])])
    text = report(table, checks, args, command, machine())
    payload = {"machine": machine(), "command": command, "workload": vars(args)}
    payload.update(rows=rows, table=table, token_check=checks)
    for where in {out, Path(args.results_dir)} if args.results_dir else {out}:
        where.mkdir(parents=True, exist_ok=True)
        atomic_write_text(where / "peers.md", text)
        atomic_write_text(where / "peers.json", json.dumps(payload, indent=2) + "\n")
    print(text)
    return checks


if __name__ == "__main__":
    sys.exit(run_main(lambda: main() and 0))  # the checks returned are for callers: exit 0
