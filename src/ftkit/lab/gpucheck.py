"""``make gpu-check``: what only a CUDA GPU can show, in a few minutes, as Markdown + JSON.

The CPU suite proves the techniques' equivalences; these are the parts a CPU cannot run:

1. fp16 AMP with the grad scaler (steps it skipped counted) and bf16, on the embedded default;
2. the CUDA peak (allocated and reserved) beside the planner's prediction, on a ~0.66 B
   LLaMA-shaped model built from config (the ``gpu`` grid: LoRA r 8 q/v, bf16, 1 x 512, GC
   off/on), and own vs PEFT LoRA step time from the same grid;
3. FSDP2 and DeepSpeed ZeRO-3 through Accelerate with one process, adapters compared with a plain
   single-process run of the same steps;
4. ``loss_kernel: liger`` (fused linear cross-entropy, no logits kept) against the default
   supervised logits on the grid's model (bf16, 4 x 512, padding-free): peak, step time, loss.

Every run is a fresh ``accelerate launch -m ftkit train`` (the path users run).

    python -m ftkit.lab.gpucheck --output_dir outputs/gpu-check --results_dir results
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from ftkit.console import run_main
from ftkit.errors import FtkitError
from ftkit.io import atomic_write_json, atomic_write_text
from ftkit.lab.ablation import Grid, machine, run_grid
from ftkit.lab.launch import child_env, launch_recipe, recipe_flags, single_process_flags

STEPS = 30  # the precision runs: enough for the fp16 scaler to settle its scale
ENGINE_STEPS = 8
ENGINE_CONFIGS = {  # one process each; precision off so all three runs do the same arithmetic
    "FSDP2": "accelerate_configs/fsdp2.yaml",
    "DeepSpeed ZeRO-3": "accelerate_configs/deepspeed_zero3.yaml",
}
ENGINE_TOLERANCE = 1e-4  # max |Δ| over max |reference| of the adapter after ENGINE_STEPS steps


def require_cuda() -> str:
    """The GPU's name; without one, one line that says where the CPU checks are."""
    if not torch.cuda.is_available():
        raise FtkitError(
            "gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here); "
            "the CPU checks are `make test`"
        )
    return torch.cuda.get_device_name(0)


def device_slug(name: str) -> str:
    """``NVIDIA H200`` → ``nvidia-h200``: the results folder's name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def precision_runs(out: Path) -> list[dict]:
    """fp16 (grad scaler) and bf16 on the embedded default, 30 steps each."""
    rows = []
    for precision in ("fp16", "bf16"):
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            rows.append({"precision": "bf16", "result": "not supported by this GPU"})
            continue
        run = launch_recipe(
            single_process_flags(precision),
            recipe_flags({"max_steps": STEPS, "save_steps": 0}),
            out / precision,
            name=f"{precision} run",
            env=child_env(),
        )
        m = run.metrics
        rows.append(
            {
                "precision": precision,
                "steps": m["steps"],
                "optimizer_steps_skipped": m["optimizer_steps_skipped"],
                "eval_loss_before": m["eval_loss_before"],
                "eval_loss": m["eval_loss"],
                "step_time_s": run.median("step_time_s"),
                "peak_bytes": m["memory"]["peak_bytes"],
            }
        )
    return rows


def long_records(path: Path, n: int) -> Path:
    """Alpaca records long enough to fill 512 tokens, so every micro-batch is exactly 1 x 512."""
    text = " ".join(f"Step {i}: the river carries the boat past the {i}th mill." for i in range(80))
    records = [
        {"instruction": f"Recite the journey, version {i}.", "input": "", "output": text}
        for i in range(n)
    ]
    atomic_write_text(path, json.dumps(records))
    return path


def planner_rows(out: Path) -> list[dict]:
    grid = Grid.load("gpu")
    data = long_records(out / "long_records.json", grid.records_needed)
    return run_grid(Grid.load("gpu", dataset=str(data)), out / "planner", title="gpu-check")


LOSS_KERNEL_STEPS = 8
LOSS_KERNEL_TOLERANCE = 1e-2  # |Δ first-step loss| / loss: bf16, chunked vs whole-row softmax


def loss_kernel_rows(out: Path, base_dir: Path) -> list[dict]:
    """Supervised logits vs liger on ``base_dir`` (the planner grid's bf16 base), same steps."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return [{"loss_kernel": "liger", "result": "not run: pip install 'ftkit[liger]'"}]
    data = long_records(out / "long_records_4x.json", 4 * LOSS_KERNEL_STEPS)
    recipe = {
        "model_name_or_path": str(base_dir),
        "model_dtype": "bf16",
        "dataset": str(data),
        "validation_size": 0,
        "max_length": 512,
        "per_device_train_batch_size": 4,
        "max_steps": LOSS_KERNEL_STEPS,
        "save_steps": 0,
        "lora_dropout": 0.0,
    }
    rows = []
    for kernel in ("none", "liger"):
        run = launch_recipe(
            single_process_flags("bf16"),
            recipe_flags({**recipe, "loss_kernel": kernel}),
            out / "loss-kernel" / kernel,
            name=f"loss_kernel {kernel} run",
            env=child_env(),
        )
        first_loss = run.steps[0]["loss"]
        rows.append(
            {
                "loss_kernel": kernel,
                "logits_mode": run.metrics["throughput"]["logits_mode"],
                "peak_bytes": run.metrics["memory"]["peak_bytes"],
                "reserved_bytes": run.metrics["memory"]["reserved_bytes"],
                "step_time_s": run.median("step_time_s"),
                "first_loss": first_loss,
            }
        )
    reference = rows[0]["first_loss"]
    rows[1]["agrees"] = abs(rows[1]["first_loss"] - reference) <= LOSS_KERNEL_TOLERANCE * reference
    return rows


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


def engine_rows(out: Path, repo: Path) -> list[dict]:
    """FSDP2 and ZeRO-3 with one process against a plain run of the same steps and data."""
    recipe = recipe_flags({"max_steps": ENGINE_STEPS, "save_steps": 0, "lora_dropout": 0.0})
    reference_dir = out / "engines" / "plain"
    launch_recipe(
        single_process_flags("no"), recipe, reference_dir, name="plain run", env=child_env()
    )
    reference = _adapter(reference_dir)
    scale = max(float(t.abs().max()) for t in reference.values())
    rows = []
    for engine, config in ENGINE_CONFIGS.items():
        run_dir = out / "engines" / device_slug(engine)
        flags = ["--config_file", str(repo / config), "--num_processes", "1"]
        flags += ["--mixed_precision", "no"]
        run = launch_recipe(flags, recipe, run_dir, name=f"{engine} run", env=child_env())
        adapter = _adapter(run_dir)
        if adapter.keys() != reference.keys():
            raise FtkitError(
                f"{engine} wrote adapter tensors {sorted(adapter)[:4]}..., not the plain run's"
            )
        diff = max(
            float((adapter[k].float() - reference[k].float()).abs().max()) for k in reference
        )
        rows.append(
            {
                "engine": engine,
                "config": config,
                "engine_recorded": run.metrics["techniques"]["engine"],
                "adapter_relative_difference": diff / scale,
                "agrees": diff / scale <= ENGINE_TOLERANCE,
                "step_time_s": run.median("step_time_s"),
            }
        )
    return rows


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(device: str, figures: dict) -> str:
    lines = [f"# gpu-check on {device}", "", f"Machine: {figures['machine']}.", ""]
    lines += ["## Mixed precision (embedded default, 30 steps)", ""]
    lines += ["| precision | steps skipped by the scaler | eval loss before → after | step time |"]
    lines += ["|---|---:|---|---:|"]
    for r in figures["precision"]:
        if "result" in r:
            lines.append(f"| {r['precision']} | {r['result']} | | |")
            continue
        lines.append(
            f"| {r['precision']} | {r['optimizer_steps_skipped']} of {r['steps']} | "
            f"{r['eval_loss_before']:.4f} → {r['eval_loss']:.4f} | {r['step_time_s'] * 1e3:.1f} ms |"
        )
    lines += ["", "## CUDA peak vs the planner (~0.66 B LLaMA-shaped, LoRA r 8 q/v, bf16, 1 x 512)"]
    lines += ["", "| cell | peak allocated | reserved | planned | planner error | step time |"]
    lines += ["|---|---:|---:|---:|---:|---:|"]
    for r in figures["planner"]:
        lines.append(
            f"| {r['cell']} | {_gib(r['peak_bytes'])} | {_gib(r['reserved_bytes'])} | "
            f"{_gib(r['planned_bytes'])} | {r['planner_error']:+.1%} | "
            f"{r['step_time_s'] * 1e3:.1f} ms |"
        )
    lines += ["", f"Own vs PEFT LoRA step time (GC off): {figures['own_vs_peft_step_time']:.3f}×."]
    lines += ["", f"## Engines, one process, {ENGINE_STEPS} steps, fp32, vs a plain run", ""]
    lines += ["| engine | config | adapter max relative difference | agrees | step time |"]
    lines += ["|---|---|---:|---|---:|"]
    for r in figures["engines"]:
        lines.append(
            f"| {r['engine']} | `{r['config']}` | {r['adapter_relative_difference']:.1e} | "
            f"{'yes' if r['agrees'] else 'NO'} | {r['step_time_s'] * 1e3:.1f} ms |"
        )
    lines += ["", f"## Loss kernel, bf16, 4 x 512 padding-free, {LOSS_KERNEL_STEPS} steps", ""]
    lines += ["| loss_kernel | logits | peak allocated | reserved | step time | first loss |"]
    lines += ["|---|---|---:|---:|---:|---|"]
    for r in figures["loss_kernel"]:
        if "result" in r:
            lines.append(f"| {r['loss_kernel']} | {r['result']} | | | | |")
            continue
        agrees = {True: " (agrees)", False: " (DIFFERS)"}.get(r.get("agrees"), "")
        lines.append(
            f"| {r['loss_kernel']} | {r['logits_mode']} | {_gib(r['peak_bytes'])} | "
            f"{_gib(r['reserved_bytes'])} | {r['step_time_s'] * 1e3:.1f} ms | "
            f"{r['first_loss']:.4f}{agrees} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ftkit.lab.gpucheck", description=__doc__)
    parser.add_argument("--output_dir", default="outputs/gpu-check")
    parser.add_argument("--results_dir", default="results")
    parser.add_argument(
        "--repo", default=".", help="the checkout whose accelerate_configs/ the engines use"
    )
    args = parser.parse_args(argv)
    device = require_cuda()
    out = Path(args.output_dir).resolve()
    planner = planner_rows(out)
    lora = {r["lora"]: r for r in planner if r["gc"] == "off"}
    figures = {
        "device": device,
        "machine": machine(),
        "precision": precision_runs(out / "precision"),
        "planner": planner,
        "own_vs_peft_step_time": lora["ftkit"]["step_time_s"] / lora["peft"]["step_time_s"],
        "engines": engine_rows(out, Path(args.repo).resolve()),
        # the base the planner grid saved (ablation.prepare writes out/base/<dtype>)
        "loss_kernel": loss_kernel_rows(out, out / "planner" / "base" / "bf16"),
    }
    results = Path(args.results_dir) / f"gpu-{device_slug(device)}"
    atomic_write_json(results / "gpu_check.json", figures)
    atomic_write_text(results / "gpu_check.md", report(device, figures))
    print(report(device, figures))


if __name__ == "__main__":
    sys.exit(run_main(main))
