"""``make gpu-check``: what only a CUDA GPU can show, section by section, as Markdown + JSON.

The CPU suite proves the techniques' equivalences; these sections measure what a CPU cannot:

* ``precision``: fp16 AMP with the grad scaler (steps it skipped counted) and bf16 on the
  embedded default; the toy model's step time (a step should cost kernels, not overhead) and
  which kernel padding-free attention ran on;
* ``memory``: a LLaMA-2-7B-shaped model (random bf16 weights), LoRA r 8 q/v, bf16, 1 x 512,
  1 x 512 with GC, 4 x 512: the planner's tensors against ``max_memory_allocated`` and its total
  (CUDA context, allocator reserve) against what the GPU reports for the process (NVML);
* ``qlora``: the same shape with a 4-bit NF4 base, against the planner;
* ``throughput``: real variable-length Alpaca on a ~1 B LLaMA shape in bf16: ftkit default (and
  its own LoRA), ftkit padded, HF Trainer + PEFT with group_by_length, TRL padding-free, a bare
  loop (``ftkit.lab.peers --precision bf16``): supervised tokens/s and peak per system;
* ``liger``: ``loss_kernel liger`` against supervised logits, bf16, 4 x 512, on the ~1 B shape;
* ``engines``: FSDP2 and DeepSpeed ZeRO-3 with one process against a plain run of the same steps.

Every section runs in a process of its own under its own time limit; a section that fails, times
out or lacks a package is recorded as such and the next one runs. The report and the JSON are
rewritten as each section ends, so a run cut short keeps what it measured. ``--dry_run`` runs
the same sections at toy size on CPU (the test suite does), so the script cannot rot unseen.

    python -m ftkit.lab.gpucheck --dataset ../shared/data/alpaca_5000.json \
        --tokenizer ../shared/fixtures/llama2-tokenizer [--sections precision,memory] \
        [--limit memory=120] [--dry_run]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ftkit.console import run_main
from ftkit.errors import FtkitError
from ftkit.io import atomic_write_json, atomic_write_text
from ftkit.lab.launch import child_env, launch_recipe, recipe_flags, single_process_flags


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one run: the GPU's, or the CPU dry run's toy ones."""

    toy_steps: int  # precision runs: enough for fp16's scaler to settle
    shape: dict  # the LLaMA-2-7B shape (memory, qlora)
    cells: tuple[tuple[int, bool], ...]  # (micro-batch, gradient checkpointing) at seq_len
    seq_len: int
    memory_steps: int
    throughput: dict  # ftkit.lab.peers arguments
    systems: tuple[str, ...]  # its rows
    engine_steps: int


LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
LLAMA2_7B.update(num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
GPU = Scale(
    toy_steps=20,
    shape=LLAMA2_7B,
    cells=((1, False), (1, True), (4, False)),
    seq_len=512,
    memory_steps=4,
    throughput=dict(hidden=2048, layers=16, records=800, steps=20, batch_size=8, max_length=512),
    systems=(
        "ftkit",
        "ftkit-own-lora",
        "ftkit-padded",
        "hf-group-by-length",
        "trl-padding-free",
        "bare",
    ),
    engine_steps=8,
)
DRY_RUN = Scale(
    toy_steps=3,
    shape=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    cells=((1, False),),
    seq_len=64,
    memory_steps=2,
    throughput=dict(hidden=32, layers=1, records=16, steps=2, batch_size=2, max_length=128),
    systems=("ftkit", "bare"),  # the HF and TRL rows: tests/test_peers.py
    engine_steps=2,
)
# Seconds each section may take on an H200, process starts included (~10 s per launch).
LIMITS = {
    "precision": 60,
    "memory": 180,
    "qlora": 90,
    "throughput": 200,
    "liger": 80,
    "engines": 100,
}
DRY_RUN_LIMIT = 600  # CPU, toy size: a hang, not a measurement, is what this bounds
ENGINE_TOLERANCE = 1e-4  # max |Δ| over max |reference| of the adapter after the steps
LOSS_KERNEL_TOLERANCE = 1e-2  # |Δ first-step loss| / loss: bf16, chunked vs whole-row softmax
# The goals the issue set, checked in the report (measured side by side in one run).
GOAL_TOY_STEP_S = 0.020
GOAL_TENSORS, GOAL_TOTAL = 0.03, 0.10
GOAL_OVER_BEST_PEER = 1.3


@dataclasses.dataclass(frozen=True)
class Context:
    out: Path
    dry_run: bool
    repo: Path
    dataset: Path
    tokenizer: Path

    @property
    def scale(self) -> Scale:
        return DRY_RUN if self.dry_run else GPU

    @property
    def precision(self) -> str:
        """The half precision of the measurements: bf16 (CPU autocast takes it too)."""
        return "bf16"


def require_cuda() -> str:
    """The GPU's name; without one, one line that says where the CPU checks are."""
    if not torch.cuda.is_available():
        raise FtkitError(
            "gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here); "
            "the CPU checks are `make test` (and this script's --dry_run)"
        )
    return torch.cuda.get_device_name(0)


def device_slug(name: str) -> str:
    """``NVIDIA H200`` → ``nvidia-h200``: the results folder's name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def missing(*packages: str) -> str | None:
    """``needs X, Y: pip install ...`` for the packages not installed, else None."""
    absent = [p for p in packages if importlib.util.find_spec(p) is None]
    if not absent:
        return None
    extras = {"bitsandbytes": "quant", "deepspeed": "deepspeed", "liger_kernel": "liger"}
    extras.update(trl="bench")
    names = ",".join(sorted({extras.get(p, p) for p in absent}))
    return f"not run: needs {', '.join(absent)} (pip install 'ftkit[{names}]')"


def _launch(flags: list[str], recipe: dict, run_dir: Path, name: str):
    return launch_recipe(flags, recipe_flags(recipe), run_dir, name=name, env=child_env())


# -- the models and records the sections share ---------------------------------------------------


def shaped_model(ctx: Context, name: str, shape: dict) -> Path:
    """``shape`` with the LLaMA-2 vocabulary, random bf16 weights, once per output dir."""
    from ftkit.lab.throughput import save_llama

    return save_llama(ctx.out / "models" / name, str(ctx.tokenizer), shape, "bf16")


def long_records(path: Path, n: int) -> Path:
    """Alpaca records long enough to fill 512 tokens, so every micro-batch is exactly N x 512."""
    text = " ".join(f"Step {i}: the river carries the boat past the {i}th mill." for i in range(80))
    records = [
        {"instruction": f"Recite the journey, version {i}.", "input": "", "output": text}
        for i in range(n)
    ]
    if not path.is_file():
        atomic_write_text(path, json.dumps(records))
    return path


def supervised_fraction(model_dir: Path, data: Path, seq_len: int) -> float:
    """Share of a record's positions whose (shifted) target is supervised, as ftkit tokenises."""
    from ftkit.data import IGNORE_INDEX, tokenize_record
    from ftkit.modeling import load_tokenizer

    record = json.loads(data.read_text())[0]
    labels = tokenize_record(record, load_tokenizer(str(model_dir)), seq_len)["labels"]
    return sum(label != IGNORE_INDEX for label in labels[1:]) / seq_len


# -- sections -----------------------------------------------------------------------------------


def section_precision(ctx: Context) -> dict:
    """fp16 (grad scaler) and bf16 on the embedded default; the toy model's step time."""
    rows = []
    for precision in ("fp16", "bf16"):
        if precision == "fp16" and not torch.cuda.is_available():
            rows.append({"precision": precision, "result": "not run: fp16 AMP needs CUDA"})
            continue
        if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            rows.append({"precision": precision, "result": "not supported by this GPU"})
            continue
        run = _launch(
            single_process_flags(precision),
            {"max_steps": ctx.scale.toy_steps, "save_steps": 0},
            ctx.out / "precision" / precision,
            f"{precision} run",
        )
        m = run.metrics
        rows.append(
            {
                "precision": precision,
                "steps": m["steps"],
                "optimizer_steps_skipped": m["optimizer_steps_skipped"],
                "eval_loss_before": m["eval_loss_before"],
                "eval_loss": m["eval_loss"],
                "first_step_time_s": run.steps[0]["step_time_s"],
                "step_time_s": run.median("step_time_s"),
                "peak_bytes": m["memory"]["peak_bytes"],
                "attn_kernels": m["techniques"]["attn_kernels"],
            }
        )
    return {"rows": rows}


def _memory_cell(ctx: Context, model_dir: Path, data: Path, micro: int, gc: bool, **extra):
    """One ``ftkit train`` run and the planner's figures for the same plan."""
    from ftkit.lab.planner import TrainingPlan, estimate
    from ftkit.lab.presets import resolve_config

    seq = ctx.scale.seq_len
    quantization = "4bit" if extra.get("load_in_4bit") else None
    name = f"{micro}x{seq}" + ("-gc" if gc else "") + ("-4bit" if quantization else "")
    recipe = {
        "model_name_or_path": str(model_dir),
        "model_dtype": ctx.precision,
        "dataset": str(data),
        "validation_size": 0,
        "max_length": seq,
        "per_device_train_batch_size": micro,
        "gradient_checkpointing": gc,
        "max_steps": ctx.scale.memory_steps,
        "save_steps": 0,
        "lora_dropout": 0.0,
        **extra,
    }
    run = _launch(single_process_flags(ctx.precision), recipe, ctx.out / "memory" / name, name)
    memory = run.metrics["memory"]
    plan = TrainingPlan(
        lora_r=8,
        precision=ctx.precision,
        quantization=quantization,
        gradient_checkpointing=gc,
        micro_batch_size=micro,
        seq_len=seq,
        supervised_fraction=supervised_fraction(model_dir, data, seq),
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    planned = estimate(resolve_config(str(model_dir)), plan)
    tensors = planned.params + planned.grads + planned.optimizer + planned.activations
    return {
        "cell": name,
        "peak_bytes": memory["peak_bytes"],
        "reserved_bytes": memory["reserved_bytes"],
        "device_used_bytes": memory.get("device_used_bytes"),
        "params_bytes": memory["params_bytes"],
        "planned_params_bytes": planned.params,
        "planned_tensors_bytes": tensors,
        "planned_overhead_bytes": planned.overhead,
        "planned_total_bytes": planned.total,
        "step_time_s": run.median("step_time_s"),
        "attn_kernels": run.metrics["techniques"]["attn_kernels"],
        **compare_with_planner(tensors, planned.total, memory),
    }


def compare_with_planner(planned_tensors: int, planned_total: int, memory: dict) -> dict:
    """Like with like. CUDA: the planner's tensors against the allocator's peak of live tensors
    (``max_memory_allocated``), and its total (CUDA context, allocator reserve) against what the
    device reports for the whole process (NVML; None where NVML is missing). CPU: the peak RSS
    holds the runtime too, so only the total compares with it."""
    device = memory.get("device_used_bytes")
    if not memory["peak_kind"].startswith("cuda"):
        return {"tensors_error": None, "total_error": planned_total / memory["peak_bytes"] - 1}
    return {
        "tensors_error": planned_tensors / memory["peak_bytes"] - 1,
        "total_error": None if device is None else planned_total / device - 1,
    }


def section_memory(ctx: Context) -> dict:
    model_dir = shaped_model(ctx, "llama2-7b-shape", ctx.scale.shape)
    data = long_records(ctx.out / "long_records.json", 64)
    cells = [_memory_cell(ctx, model_dir, data, micro, gc) for micro, gc in ctx.scale.cells]
    return {"cells": cells}


def section_qlora(ctx: Context) -> dict:
    if reason := missing("bitsandbytes"):
        return {"skipped": reason}
    model_dir = shaped_model(ctx, "llama2-7b-shape", ctx.scale.shape)
    data = long_records(ctx.out / "long_records.json", 64)
    return {"cells": [_memory_cell(ctx, model_dir, data, 1, False, load_in_4bit=True)]}


def section_throughput(ctx: Context) -> dict:
    from ftkit.lab import peers

    systems = [key for key in ctx.scale.systems if not missing(*peers.SYSTEMS[key].needs)]
    left_out = {key: missing(*peers.SYSTEMS[key].needs) for key in ctx.scale.systems}
    sizes = ctx.scale.throughput
    argv = ["--dataset", str(ctx.dataset), "--tokenizer", str(ctx.tokenizer)]
    argv += ["--output_dir", str(ctx.out / "throughput"), "--rounds", "1"]
    argv += ["--precision", ctx.precision if torch.cuda.is_available() else "fp32"]
    argv += [f"--{key}={value}" for key, value in sizes.items()]
    argv += ["--systems", *systems]
    checks = peers.main(argv)
    payload = json.loads((ctx.out / "throughput" / "peers.json").read_text())
    return {
        "table": payload["table"],
        "token_check": checks,
        "left_out": {key: why for key, why in left_out.items() if why},
        "workload": payload["workload"],
    }


def section_liger(ctx: Context) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "not run: loss_kernel liger needs CUDA"}
    if reason := missing("liger_kernel"):
        return {"skipped": reason}
    from ftkit.lab.throughput import build_model

    sizes = ctx.scale.throughput
    base = build_model(
        ctx.out / "throughput", str(ctx.tokenizer), sizes["hidden"], sizes["layers"], "bf16"
    )
    data = long_records(ctx.out / "long_records.json", 64)
    rows = []
    for kernel in ("none", "liger"):
        run = _launch(
            single_process_flags("bf16"),
            {
                "model_name_or_path": str(base),
                "model_dtype": "bf16",
                "dataset": str(data),
                "validation_size": 0,
                "max_length": 512,
                "per_device_train_batch_size": 4,
                "max_steps": ctx.scale.engine_steps,
                "save_steps": 0,
                "lora_dropout": 0.0,
                "loss_kernel": kernel,
            },
            ctx.out / "loss-kernel" / kernel,
            f"loss_kernel {kernel}",
        )
        rows.append(
            {
                "loss_kernel": kernel,
                "logits_mode": run.metrics["throughput"]["logits_mode"],
                "peak_bytes": run.metrics["memory"]["peak_bytes"],
                "reserved_bytes": run.metrics["memory"]["reserved_bytes"],
                "step_time_s": run.median("step_time_s"),
                "first_loss": run.steps[0]["loss"],
            }
        )
    reference = rows[0]["first_loss"]
    rows[1]["agrees"] = abs(rows[1]["first_loss"] - reference) <= LOSS_KERNEL_TOLERANCE * reference
    return {"rows": rows}


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


def section_engines(ctx: Context) -> dict:
    """FSDP2 and ZeRO-3 with one process against a plain run of the same steps and data."""
    cuda = torch.cuda.is_available()
    configs = {
        "FSDP2": "accelerate_configs/fsdp2.yaml" if cuda else None,
        "DeepSpeed ZeRO-3": f"accelerate_configs/deepspeed_zero3{'' if cuda else '_cpu'}.yaml",
    }
    recipe = {"max_steps": ctx.scale.engine_steps, "save_steps": 0, "lora_dropout": 0.0}
    reference_dir = ctx.out / "engines" / "plain"
    _launch(single_process_flags("no"), recipe, reference_dir, "plain run")
    reference = _adapter(reference_dir)
    scale = max(float(t.abs().max()) for t in reference.values())
    rows = []
    for engine, config in configs.items():
        reason = (
            "not run: FSDP needs CUDA"
            if config is None
            else missing("deepspeed")
            if "deepspeed" in config
            else None
        )
        if reason:
            rows.append({"engine": engine, "result": reason})
            continue
        flags = ["--config_file", str(ctx.repo / config), "--num_processes", "1"]
        flags += ["--mixed_precision", "no"]
        run_dir = ctx.out / "engines" / device_slug(engine)
        run = _launch(flags, recipe, run_dir, f"{engine} run")
        adapter = _adapter(run_dir)
        if adapter.keys() != reference.keys():
            raise FtkitError(
                f"{engine} wrote adapter tensors {sorted(adapter)[:4]}..., not plain's"
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
    return {"rows": rows}


SECTIONS = {
    "precision": section_precision,
    "memory": section_memory,
    "qlora": section_qlora,
    "throughput": section_throughput,
    "liger": section_liger,
    "engines": section_engines,
}


# -- the report ---------------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:+.1%}"


def _ms(s: float | None) -> str:
    return "—" if s is None else f"{s * 1e3:.1f} ms"


def _render_precision(fig: dict) -> list[str]:
    lines = ["| precision | steps skipped by the scaler | eval loss before → after | first step "
             "| step time (median) | padding-free attention |", "|---|---:|---|---:|---:|---|"]  # fmt: skip
    for r in fig["rows"]:
        if "result" in r:
            lines.append(f"| {r['precision']} | {r['result']} | | | | |")
            continue
        goal = "" if r["step_time_s"] <= GOAL_TOY_STEP_S else " (goal ≤ 20 ms: missed)"
        lines.append(
            f"| {r['precision']} | {r['optimizer_steps_skipped']} of {r['steps']} | "
            f"{r['eval_loss_before']:.4f} → {r['eval_loss']:.4f} | {_ms(r['first_step_time_s'])} "
            f"| {_ms(r['step_time_s'])}{goal} | {', '.join(r['attn_kernels']) or '—'} |"
        )
    return lines


def _render_memory(fig: dict) -> list[str]:
    lines = [
        "| cell | peak allocated | planned tensors | tensors error | device used (NVML) | "
        "planned total | total error | reserved | step time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in fig["cells"]:
        tensors, total = _pct(r["tensors_error"]), _pct(r["total_error"])
        if r["tensors_error"] is not None and abs(r["tensors_error"]) > GOAL_TENSORS:
            tensors += f" (goal ±{GOAL_TENSORS:.0%}: missed)"
        if r["total_error"] is not None and abs(r["total_error"]) > GOAL_TOTAL:
            total += f" (goal ±{GOAL_TOTAL:.0%}: missed)"
        lines.append(
            f"| {r['cell']} | {_gib(r['peak_bytes'])} | {_gib(r['planned_tensors_bytes'])} | "
            f"{tensors} | {_gib(r['device_used_bytes'])} | "
            f"{_gib(r['planned_total_bytes'])} | {total} | "
            f"{_gib(r['reserved_bytes'])} | {_ms(r['step_time_s'])} |"
        )
    return lines


def _render_throughput(fig: dict) -> list[str]:
    lines = ["| system | supervised tok/s | × ftkit default | s/step | peak GPU allocated |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in fig["table"]:
        speedup = "—" if r["speedup"] is None else f"{r['speedup']:.2f}"
        lines.append(
            f"| {r['label']} | {r['supervised_tokens_per_s']:.0f} | {speedup} | "
            f"{r['step_time_s']:.3f} | {_gib(r.get('peak_device_bytes'))} |"
        )
    by_key = {r["system"]: r for r in fig["table"]}
    peers = [r for r in fig["table"] if not r["system"].startswith(("ftkit", "bare"))]
    if "ftkit" in by_key and peers:
        best = max(peers, key=lambda r: r["supervised_tokens_per_s"])
        over = by_key["ftkit"]["supervised_tokens_per_s"] / best["supervised_tokens_per_s"]
        lines += ["", f"ftkit default ÷ the best peer ({best['label']}): **{over:.2f}×** "
                  f"(goal ≥ {GOAL_OVER_BEST_PEER}×)."]  # fmt: skip
    if "ftkit" in by_key and "ftkit-own-lora" in by_key:
        ratio = by_key["ftkit-own-lora"]["step_time_s"] / by_key["ftkit"]["step_time_s"]
        lines.append(f"Own LoRA ÷ PEFT LoRA step time: {ratio:.3f}×.")
    for key, why in fig.get("left_out", {}).items():
        lines.append(f"{key}: {why}.")
    return lines


def _cell(column: str, value) -> str:
    if value is None:
        return "—"
    if column.endswith("bytes"):
        return _gib(value)
    if column.endswith("time_s"):
        return _ms(value)
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def _render_rows(fig: dict, columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in fig["rows"]:
        if "result" in r:  # not run here: its name and why
            cells = [str(r[columns[0]]), r["result"], *[""] * (len(columns) - 2)]
        else:
            cells = [_cell(c, r.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


RENDER = {
    "precision": _render_precision,
    "memory": _render_memory,
    "qlora": _render_memory,
    "throughput": _render_throughput,
    "liger": lambda f: _render_rows(
        f, ["loss_kernel", "logits_mode", "peak_bytes", "step_time_s", "first_loss", "agrees"]
    ),
    "engines": lambda f: _render_rows(
        f, ["engine", "config", "adapter_relative_difference", "agrees", "step_time_s"]
    ),
}


def report(device: str, machine: str, results: dict) -> str:
    lines = [f"# gpu-check on {device}", "", f"Machine: {machine}.", ""]
    for name, fig in results.items():
        seconds = fig.get("seconds")
        lines += [f"## {name} ({seconds:.0f} s)" if seconds else f"## {name}", ""]
        if "error" in fig:
            lines += [f"FAILED: {fig['error']}", ""]
        elif "skipped" in fig:
            lines += [fig["skipped"], ""]
        else:
            try:
                lines += [*RENDER[name](fig), ""]
            except (KeyError, TypeError, ValueError) as err:  # the JSON keeps the figures
                lines += [f"(could not render this section: {err!r}; see gpu_check.json)", ""]
    return "\n".join(lines)


# -- running the sections -----------------------------------------------------------------------


def run_section_process(name: str, args, result: Path, limit: float) -> dict:
    """``--section NAME`` in a child process of its own, killed (its whole tree) at ``limit``."""
    command = [
        sys.executable,
        "-m",
        "ftkit.lab.gpucheck",
        "--section",
        name,
        "--result",
        str(result),
    ]
    command += ["--output_dir", args.output_dir, "--repo", args.repo]
    command += ["--dataset", args.dataset, "--tokenizer", args.tokenizer]
    command += ["--dry_run"] if args.dry_run else []
    log = Path(args.output_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        child = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True
        )
        code = None
        try:
            code = child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            pass
        finally:  # a timeout, or this process stopped (SIGTERM, Ctrl-C): the whole tree goes
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)  # the launches it started too
                child.wait()
    seconds = time.perf_counter() - start
    if result.is_file():
        return {**json.loads(result.read_text()), "seconds": seconds}
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
    why = f"timed out after {limit:.0f} s" if code is None else f"exit {code}"
    return {"error": f"{why}: {' / '.join(tail)[-600:]} (log: {log})", "seconds": seconds}


def _limits(values: list[str], dry_run: bool) -> dict[str, float]:
    limits = {name: DRY_RUN_LIMIT for name in SECTIONS} if dry_run else dict(LIMITS)
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in SECTIONS or not seconds.replace(".", "", 1).isdigit():
            raise FtkitError(
                f"--limit {value!r}: give SECTION=SECONDS, SECTION one of {list(SECTIONS)}"
            )
        limits[name] = float(seconds)
    return limits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftkit.lab.gpucheck", description=__doc__)
    parser.add_argument("--output_dir", default="outputs/gpu-check")
    parser.add_argument("--results_dir", default="results", help="gpu-<device>/ goes in here")
    parser.add_argument("--repo", default=".", help="the checkout whose accelerate_configs/ to use")
    parser.add_argument("--dataset", required=True, help="Alpaca JSON (the real records)")
    parser.add_argument("--tokenizer", required=True, help="the LLaMA-2 tokenizer directory")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--limit", action="append", default=[], help="SECTION=SECONDS")
    parser.add_argument("--dry_run", action="store_true", help="toy sizes on CPU")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # one section, in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # absolute: the section processes and the launches they start may run elsewhere
    args.output_dir, args.repo = (
        str(Path(args.output_dir).resolve()),
        str(Path(args.repo).resolve()),
    )
    args.dataset, args.tokenizer = (
        str(Path(args.dataset).resolve()),
        str(Path(args.tokenizer).resolve()),
    )
    if args.section:
        ctx = Context(Path(args.output_dir), args.dry_run, Path(args.repo), Path(args.dataset),
                      Path(args.tokenizer))  # fmt: skip
        atomic_write_json(args.result, SECTIONS[args.section](ctx))
        return 0
    names = [name for name in args.sections.split(",") if name]
    if unknown := [name for name in names if name not in SECTIONS]:
        raise FtkitError(f"--sections: unknown {unknown}; the sections are {list(SECTIONS)}")
    for path, what in ((args.dataset, "--dataset"), (args.tokenizer, "--tokenizer")):
        if not Path(path).exists():
            raise FtkitError(f"{what} {path} not found (the Alpaca JSON / LLaMA-2 tokenizer dir)")
    limits = _limits(args.limit, args.dry_run)
    # stopped from outside (a job's time limit): unwind, so the running section is killed too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    device = "CPU (dry run)" if args.dry_run else require_cuda()
    from ftkit.lab.ablation import machine

    results_dir = Path(args.results_dir) / f"gpu-{device_slug(device)}"
    results: dict[str, dict] = {}
    for name in names:
        results[name] = run_section_process(
            name, args, Path(args.output_dir) / "sections" / f"{name}.json", limits[name]
        )
        status = "ok" if "error" not in results[name] else results[name]["error"][:200]
        print(f"gpu-check {name}: {status} ({results[name]['seconds']:.0f} s)", flush=True)
        figures = {"device": device, "machine": machine(), "sections": results}
        atomic_write_json(results_dir / "gpu_check.json", figures)
        atomic_write_text(results_dir / "gpu_check.md", report(device, machine(), results))
    print((results_dir / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
