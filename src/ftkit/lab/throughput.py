"""Batching and logits modes side by side: which default trains the most supervised tokens per second.

A LLaMA-shaped model built from config (random weights, the real 32,000-token LLaMA-2 vocabulary
and tokenizer), the first N real Alpaca records, exactly one epoch per run so every mode trains
the same records and the same supervised tokens; each run is a fresh ``accelerate launch -m
ftkit train`` process, modes interleaved round by round, medians over rounds. Speed is supervised
tokens over the summed step time; the peak is the run's own (allocator-dependent) CPU figure,
as a normal run reports it.

    python -m ftkit.lab.throughput --dataset ../shared/data/alpaca_5000.json \
        --tokenizer ../shared/fixtures/llama2-tokenizer --output_dir results/throughput-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from ftkit.console import run_main
from ftkit.io import atomic_write_text
from ftkit.lab.launch import child_env, launch_recipe, recipe_flags, single_process_flags

LEGACY = {"padding_free": "false", "group_by_length": False, "supervised_logits_only": False}
MODES: dict[str, dict] = {
    "padded, full logits": LEGACY,
    "group_by_length, full logits": {**LEGACY, "group_by_length": True},
    "padding_free, full logits": {**LEGACY, "padding_free": "true"},
    "padded, supervised logits": {**LEGACY, "supervised_logits_only": True},
    "group_by_length, supervised logits": {
        **LEGACY,
        "group_by_length": True,
        "supervised_logits_only": True,
    },
    "padding_free, supervised logits": {
        **LEGACY,
        "padding_free": "true",
        "supervised_logits_only": True,
    },
}


def save_llama(path: Path, tokenizer_dir: str, shape: dict, precision: str = "fp32") -> Path:
    """A LLaMA of ``shape`` (LlamaConfig values) with ``tokenizer_dir``'s vocabulary and random
    weights (seed 0), saved at ``path`` in ``precision``'s dtype once (kept if already there);
    built on the GPU where there is one (a 7 B init takes seconds there)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs that load it come next
    return path


def build_model(
    out: Path, tokenizer_dir: str, hidden: int, layers: int, precision: str = "fp32"
) -> Path:
    """The benchmarks' LLaMA shape from its width and depth (heads of 64, SwiGLU at 8/3)."""
    shape = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64 or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=1024,
    )
    return save_llama(
        out / f"llama-h{hidden}-l{layers}-{precision}", tokenizer_dir, shape, precision
    )


def write_records(dataset: str, n: int, path: Path) -> Path:
    records = json.loads(Path(dataset).read_text(encoding="utf-8"))[:n]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def run_mode(name: str, args, model_dir: Path, data: Path, run_dir: Path) -> dict:
    recipe = {
        "model_name_or_path": str(model_dir),
        "dataset": str(data),
        "validation_size": 0,
        "max_length": args.max_length,
        "per_device_train_batch_size": args.batch_size,
        "max_steps": -1,
        "num_train_epochs": 1,
        "lora_impl": args.lora_impl,
        "lora_dropout": 0.0,
        "save_steps": 0,
        **MODES[name],
    }
    env = child_env()
    run = launch_recipe(
        single_process_flags("no", args.threads),
        recipe_flags(recipe),
        run_dir,
        name=f"mode {name}",
        env=env,
    )
    figures = run.metrics["throughput"]
    return {
        "mode": name,
        "supervised_tokens_per_s": figures["supervised_tokens_per_s"],
        "tokens_per_s": figures["tokens_per_s"],
        "step_time_s": statistics.median(row["step_time_s"] for row in run.steps),
        "padding_waste": figures["padding_waste"],
        "logits_fraction": figures["logits_fraction"],
        "supervised_tokens": figures["supervised_tokens"],
        "peak_bytes": run.metrics["memory"]["peak_bytes"],
        "final_loss": run.steps[-1]["loss"],
    }


def interleaved_steps(args, model_dir: Path, data: Path, out: Path) -> list[dict]:
    """One process, one Trainer per mode, each mode's epoch timed in turn, round after round.

    Interleaving whole epochs of every mode inside one process cancels the drift of a shared
    machine's load, which swamps separate processes; CPU time (``process_time``, all threads)
    is reported beside wall time because it barely moves with other users' load.
    """
    import time

    from ftkit.config import Recipe
    from ftkit.train import Trainer

    trainers = {}
    for i, name in enumerate(args.modes):
        values = {
            **Recipe().to_dict(),
            "model_name_or_path": str(model_dir),
            "dataset": str(data),
            "validation_size": 0,
            "max_length": args.max_length,
            "per_device_train_batch_size": args.batch_size,
            "lora_impl": args.lora_impl,
            "lora_dropout": 0.0,
            "output_dir": str(out / "inprocess" / f"m{i}"),
            **MODES[name],
        }
        trainer = Trainer(Recipe.from_dict(values))
        trainer.train_loader.set_epoch(0)
        windows = [[batch] for batch in trainer.train_loader]
        trainers[name] = (trainer, windows)
    rows = []
    for round_ in range(args.rounds + 1):  # round 0: one warm-up step per mode, not reported
        for name, (trainer, windows) in trainers.items():
            trainer.model.train()
            wall, cpu = time.perf_counter(), time.process_time()
            for window in windows if round_ else windows[:1]:
                trainer.backward_window(window)
                trainer.optimizer_step()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            supervised = sum(int((b["labels"][:, 1:] != -100).sum()) for w in windows for b in w)
            computed = sum(b["input_ids"].numel() for w in windows for b in w)
            real = sum(int(batching_real(b)) for w in windows for b in w)
            row = {
                "mode": name,
                "round": round_,
                "supervised_tokens_per_s": supervised / wall,
                "supervised_tokens_per_cpu_s": supervised / cpu,
                "epoch_wall_s": wall,
                "epoch_cpu_s": cpu,
                "padding_waste": computed / real,
                "supervised_tokens": supervised,
            }
            print(json.dumps(row), flush=True)
            if round_:
                rows.append(row)
    return rows


def batching_real(batch):
    from ftkit.batching import real_tokens

    return real_tokens(batch)


def summarise(rows: list[dict]) -> list[dict]:
    by_mode: dict[str, list[dict]] = {}
    for row in rows:
        by_mode.setdefault(row["mode"], []).append(row)
    table = []
    for name, runs in by_mode.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "mode"}
        table.append({"mode": name, "rounds": len(runs), **med})
    base = table[0]["supervised_tokens_per_s"]
    for row in table:
        row["speedup"] = row["supervised_tokens_per_s"] / base
        row.pop("round", None)
    return table


def report(table: list[dict], args, command: str, machine: str) -> str:
    lines = [
        "# Batching and logits modes on CPU",
        "",
        f"Machine: {machine}. Command: `{command}`.",
        f"LLaMA-shaped model from config (hidden {args.hidden}, {args.layers} layers, the real "
        f"32,000-token LLaMA-2 tokenizer), the first {args.records} Alpaca records, one epoch "
        f"(batch {args.batch_size}, max_length {args.max_length}), {args.lora_impl} LoRA r 8 q/v, "
        f"fp32; every mode in a fresh process, {args.rounds} interleaved rounds, medians.",
        "",
        "| mode | supervised tok/s | × padded | median step s | padding waste "
        "| logits computed | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['mode']} | {row['supervised_tokens_per_s']:.0f} | {row['speedup']:.2f} "
            f"| {row['step_time_s']:.2f} | {row['padding_waste']:.2f} "
            f"| {100 * row['logits_fraction']:.0f} % | {row['peak_bytes'] / 2**20:.0f} |"
        )
    tokens = {int(row["supervised_tokens"]) for row in table}
    lines += ["", f"Supervised tokens per run: {sorted(tokens)} (the same records in every mode)."]
    return "\n".join(lines) + "\n"


def report_interleaved(table: list[dict], args, command: str, machine: str) -> str:
    base = table[0]
    lines = [
        "# Batching and logits modes on CPU (one process, interleaved epochs)",
        "",
        f"Machine: {machine}. Command: `{command}`.",
        f"LLaMA-shaped model from config (hidden {args.hidden}, {args.layers} layers, the real "
        f"32,000-token LLaMA-2 tokenizer), the first {args.records} Alpaca records, {args.lora_impl} "
        f"LoRA r 8 q/v, fp32, batch {args.batch_size}, max_length {args.max_length}. One Trainer "
        f"per mode in one process; each round times one epoch (forward, backward, AdamW step) of "
        f"every mode in turn; {args.rounds} rounds after a warm-up round, medians. Every mode "
        "trains the same records, so the same supervised tokens.",
        "",
        "| mode | supervised tok/s (wall) | × padded | supervised tok / CPU-s | × padded "
        "| padding waste |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['mode']} | {row['supervised_tokens_per_s']:.0f} "
            f"| {row['supervised_tokens_per_s'] / base['supervised_tokens_per_s']:.2f} "
            f"| {row['supervised_tokens_per_cpu_s']:.0f} "
            f"| {row['supervised_tokens_per_cpu_s'] / base['supervised_tokens_per_cpu_s']:.2f} "
            f"| {row['padding_waste']:.2f} |"
        )
    tokens = sorted({int(row["supervised_tokens"]) for row in table})
    lines += ["", f"Supervised tokens per epoch: {tokens}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m ftkit.lab.throughput")
    parser.add_argument("--dataset", required=True, help="Alpaca JSON (the real records)")
    parser.add_argument("--tokenizer", required=True, help="the LLaMA-2 tokenizer directory")
    parser.add_argument("--output_dir", default="outputs/throughput")
    parser.add_argument("--results_dir", default=None, help="also write the report here")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora_impl", default="peft")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument(
        "--processes",
        action="store_true",
        help="each run in its own accelerate launch process (peak RSS per mode; noisy on a "
        "shared machine) instead of interleaved epochs in one process",
    )
    args = parser.parse_args(argv)
    from ftkit.lab.ablation import machine

    # Measured, not asserted: how busy the machine was when the runs began.
    where = f"{machine()}, 1-minute load average {os.getloadavg()[0]:.2f} at the start"
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(out, args.tokenizer, args.hidden, args.layers)
    data = write_records(args.dataset, args.records, out / "records.json")
    rows = []
    if not args.processes:
        import torch

        torch.set_num_threads(args.threads)
        rows = interleaved_steps(args, model_dir, data, out)
    for round_ in range(args.rounds if args.processes else 0):
        for i, name in enumerate(args.modes):
            row = run_mode(name, args, model_dir, data, out / "runs" / f"r{round_}-m{i}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    table = summarise(rows)
    command = shlex.join(["python", "-m", "ftkit.lab.throughput", *(argv or sys.argv[1:])])
    text = (report if args.processes else report_interleaved)(table, args, command, where)
    stem = "throughput-processes" if args.processes else "throughput"
    for where in {out, Path(args.results_dir)} if args.results_dir else {out}:
        where.mkdir(parents=True, exist_ok=True)
        atomic_write_text(where / f"{stem}.md", text)
        atomic_write_text(
            where / f"{stem}.json", json.dumps({"rows": rows, "table": table}, indent=2) + "\n"
        )
    print(text)
    return table


if __name__ == "__main__":
    sys.exit(run_main(lambda: main() and 0))  # the table returned is for callers: exit 0
