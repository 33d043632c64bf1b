"""The plan's CPU proof: every candidate of a plan trained side by side, predicted vs measured.

    python -m ftkit.lab.plancheck --dataset ../shared/data/alpaca_5000.json \\
        --output_dir outputs/plan-check --results_dir results/plan-cpu      (make plan-check)

A LLaMA-shaped model built from config (the embedded 640-piece tokenizer, so the decoder blocks
and not the LM head carry the step, as in a 7B model), real Alpaca records truncated to the
sequence length, this CPU described as a ``--gpu_spec`` from two measurements (the rate a large
fp32 GEMM reaches and the bandwidth of a large copy, on the threads the runs use), then
``make_plan`` and, in one process, one Trainer per candidate, every candidate's steps timed in turn,
round after round. Time is CPU time of one thread: it barely moves with other users' load, which
swamps wall time on a shared machine. The report fits the CPU's two constants of the step-time
model (``plan.COMPUTE_EFFICIENCY["cpu"]`` and ``plan.HOST_S_PER_OP["cpu"]``) to the measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

from ftkit.console import run_main
from ftkit.embedded import ASSETS_DIR
from ftkit.errors import ConfigError
from ftkit.io import atomic_write_text
from ftkit.lab import plan as planning
from ftkit.lab.throughput import save_llama, write_records
from ftkit.meter import MIB

SHAPE = dict(  # hidden 128, 8 blocks: the blocks carry most of a step at 640 pieces, and the
    hidden_size=128,  # host's dispatch is a large share of a small micro-batch, as on a fast GPU
    intermediate_size=344,
    num_hidden_layers=8,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def cpu_gpu_spec(memory_mib: int, name: str = "cpu") -> str:
    """This CPU as ``--gpu_spec NAME:MiB:TFLOPS:GBps``: the best of ten 1024^3 fp32 GEMMs and of
    ten 64 MiB copies (read + write), in CPU time of the threads torch uses now (as the steps are
    timed). The best, not the median: other users' load only ever adds time."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    source = torch.ones(16 * MIB)  # 64 MiB of fp32, touched
    gemm = copy = float("inf")
    for _ in range(10):
        start = time.process_time()
        torch.mm(a, b)
        gemm = min(gemm, time.process_time() - start)
        start = time.process_time()
        source.clone()
        copy = min(copy, time.process_time() - start)
    tflops = 2 * 1024**3 / gemm / 1e12
    gbps = 2 * source.numel() * 4 / copy / 1e9
    return f"{name}:{memory_mib}:{tflops:.4f}:{gbps:.1f}"


def trainer_for(candidate, model_dir: str, dataset: str, output_dir: Path):
    """A Trainer for ``candidate``'s written recipe (no held-out split, nothing saved)."""
    from ftkit.config import Recipe
    from ftkit.train import Trainer

    values = planning.recipe_values(candidate, model_dir, dataset, str(output_dir))
    return Trainer(Recipe.from_dict({**Recipe().to_dict(), **values, "validation_size": 0}))


def time_candidates(
    plan, model_dir: str, dataset: str, output_dir: Path, *, steps: int = 2, rounds: int = 3
) -> list[list[float]]:
    """CPU seconds per optimizer step of every candidate of ``plan``, one list per candidate with
    one figure per round; a warm-up step of each comes first, untimed."""
    trainers = []
    for i, candidate in enumerate(plan.candidates):
        trainer = trainer_for(candidate, model_dir, dataset, output_dir / f"c{i}")
        trainer.model.train()  # as fit() does: from_pretrained leaves it in eval mode (no GC)
        accumulation = candidate.plan.gradient_accumulation_steps
        trainer.train_loader.set_epoch(0)
        batches = list(itertools.islice(trainer.train_loader, (steps + 1) * accumulation))
        windows = [batches[k : k + accumulation] for k in range(0, len(batches), accumulation)]
        if len(windows) < steps + 1 or len(windows[-1]) < accumulation:
            raise ConfigError(
                f"{dataset} holds too few records for {steps + 1} steps of "
                f"{plan.global_batch} sequences"
            )
        trainers.append((trainer, windows))
    times: list[list[float]] = [[] for _ in trainers]
    for round_ in range(rounds + 1):  # round 0: one warm-up step each (allocator, lazy init)
        for i, (trainer, windows) in enumerate(trainers):
            timed = windows[1:] if round_ else windows[:1]
            start = time.process_time()
            for window in timed:
                trainer.backward_window(window)
                trainer.optimizer_step()
            if round_:
                times[i].append((time.process_time() - start) / len(timed))
    return times


def fit_cpu_constants(plan, measured: list[float]) -> tuple[float, float]:
    """(compute efficiency, host seconds per op) that fit ``measured`` step times best (least
    squares on t - elementwise - optimizer = FLOPs / (rate x e) + ops x h)."""
    rate = plan.hardware.gpu.tflops * 1e12
    per_op = planning.HOST_S_PER_OP["cpu"]
    xs = [(c.time.flops / rate, c.time.host_s / per_op) for c in plan.candidates]
    ys = [
        t - c.time.elementwise_s - c.time.optimizer_s
        for c, t in zip(plan.candidates, measured, strict=True)
    ]
    sxx = sum(x * x for x, _ in xs)
    sxo = sum(x * o for x, o in xs)
    soo = sum(o * o for _, o in xs)
    sxy = sum(x * y for (x, _), y in zip(xs, ys, strict=True))
    soy = sum(o * y for (_, o), y in zip(xs, ys, strict=True))
    det = sxx * soo - sxo * sxo
    inverse_e = (sxy * soo - soy * sxo) / det
    host = (sxx * soy - sxo * sxy) / det
    return 1 / inverse_e, host


def report(plan, measured: list[float], spec: str, fitted, command: str, machine: str) -> str:
    e, host = fitted
    lines = [
        "# The plan's step-time model against measured steps on CPU",
        "",
        f"Machine: {machine}. Command: `{command}`.",
        f"This CPU as `--gpu_spec {spec}` (measured: fp32 GEMM TFLOPS, copy GB/s, one thread). "
        f"{plan.workload.describe()}. LLaMA-shaped model from config (hidden "
        f"{SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers, the embedded 640-piece "
        f"tokenizer), PEFT LoRA r 8 q/v, fp32, global batch {plan.global_batch}; one Trainer per "
        "candidate in one process, candidates interleaved round by round, CPU seconds of one "
        "thread per optimizer step, the best of the rounds.",
        f"Constants used: compute efficiency {plan.hardware.compute_efficiency:.3f}, host "
        f"{planning.HOST_S_PER_OP['cpu'] * 1e6:.2f} us per op. Least-squares fit to these "
        f"steps: efficiency {e:.3f}, host {host * 1e6:.2f} us per op.",
        "",
        "| GC | micro x GA | planned MiB | predicted s/step | measured s/step | measured / predicted |",
        "|---|---|---|---|---|---|",
    ]
    for c, t in zip(plan.candidates, measured, strict=True):
        p = c.plan
        lines.append(
            f"| {'on' if p.gradient_checkpointing else 'off'} | {p.micro_batch_size} x "
            f"{p.gradient_accumulation_steps} | {c.memory.total / MIB:.1f} "
            f"| {c.time.total_s:.3f} | {t:.3f} | {t / c.time.total_s:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m ftkit.lab.plancheck")
    parser.add_argument("--dataset", required=True, help="Alpaca JSON (the real records)")
    parser.add_argument("--output_dir", default="outputs/plan-check")
    parser.add_argument("--results_dir", default=None, help="also write the report here")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from ftkit.lab.ablation import machine

    torch.set_num_threads(1)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = save_llama(out / "llama-h128-l8", str(ASSETS_DIR / "tiny-llama"), SHAPE)
    data = write_records(args.dataset, args.records, out / "records.json")
    spec = cpu_gpu_spec(memory_mib=64 * 1024)
    hardware = planning.hardware_from_flags("1xcpu", [spec], device="cpu")
    workload = planning.read_workload(str(data), str(model_dir), args.seq_len)
    plan = planning.make_plan(str(model_dir), hardware, workload, global_batch=args.global_batch)
    times = time_candidates(
        plan, str(model_dir), str(data), out / "runs", steps=args.steps, rounds=args.rounds
    )
    measured = [min(t) for t in times]  # the best round: other users' load only adds time
    fitted = fit_cpu_constants(plan, measured)
    command = shlex.join(["python", "-m", "ftkit.lab.plancheck", *(argv or sys.argv[1:])])
    text = report(plan, measured, spec, fitted, command, machine())
    rows = [
        {"candidate": c.describe(), "predicted_s": c.time.total_s, "measured_s": t, "rounds": r}
        for c, t, r in zip(plan.candidates, measured, times, strict=True)
    ]
    for where in {out, Path(args.results_dir)} if args.results_dir else {out}:
        where.mkdir(parents=True, exist_ok=True)
        atomic_write_text(where / "plan_check.md", text)
        figures = {"spec": spec, "fitted_efficiency": fitted[0], "fitted_host_s_per_op": fitted[1]}
        atomic_write_text(
            where / "plan_check.json", json.dumps({**figures, "rows": rows}, indent=2) + "\n"
        )
    print(text)
    return rows


if __name__ == "__main__":
    sys.exit(run_main(lambda: main() and 0))
