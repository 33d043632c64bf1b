"""Own LoRA vs PEFT LoRA on one recipe and one seed: a side-by-side parity report.

Each implementation trains in its own ``accelerate launch`` process, so peak memory is clean and
both go through exactly the path users run. Both adapters are saved in PEFT's format, so their
final weights compare key by key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ftkit.adapters import WEIGHTS_NAME
from ftkit.errors import FtkitError
from ftkit.io import atomic_write_text
from ftkit.lab.launch import (
    MEASUREMENT_RECIPE,
    launch_recipe,
    recipe_flags,
    single_process_flags,
)

IMPLS = ("ftkit", "peft")


@dataclass
class ImplRun:
    impl: str
    losses: list[float]
    step_time_s: float
    metrics: dict
    adapter: dict[str, torch.Tensor]


def run_impl(
    impl: str, recipe_args: list[str], output_dir: Path, accelerate_config: str | None
) -> ImplRun:
    out = output_dir / impl
    run = launch_recipe(
        ["--config_file", accelerate_config] if accelerate_config else single_process_flags(),
        [*recipe_flags(MEASUREMENT_RECIPE), *recipe_args, "--lora_impl", impl],
        out,
        name=f"the {impl} run",
    )
    return ImplRun(
        impl=impl,
        losses=[row["loss"] for row in run.steps],
        step_time_s=run.median("step_time_s"),
        metrics=run.metrics,
        adapter=load_file(out / WEIGHTS_NAME),
    )


def parity(own: ImplRun, peft: ImplRun) -> dict:
    """max |Δloss| over steps and max |ΔW| over the final LoRA tensors."""
    if own.adapter.keys() != peft.adapter.keys():
        raise FtkitError(
            "the two adapters have different tensors: "
            f"{sorted(own.adapter.keys() ^ peft.adapter.keys())[:4]}"
        )
    return {
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(own.losses, peft.losses, strict=True)),
        "max_abs_weight_diff": max(
            float((own.adapter[k] - peft.adapter[k]).abs().max()) for k in own.adapter
        ),
        "step_time_ratio_own_over_peft": own.step_time_s / peft.step_time_s,
    }


def report_markdown(own: ImplRun, peft: ImplRun, figures: dict, recipe_args: list[str]) -> str:
    def mem(run: ImplRun) -> str:
        peak = run.metrics["memory"].get("peak_bytes")
        return "n/a" if peak is None else f"{peak / 2**20:.1f} MiB"

    lines = [
        "# ftkit LoRA vs PEFT LoRA",
        "",
        f"Recipe arguments: `{' '.join(recipe_args) or '(embedded default)'}`; same seed, fp32.",
        "",
        "| | ftkit | PEFT |",
        "|---|---|---|",
        f"| trainable params | {own.metrics['memory']['trainable_params']:,d} "
        f"| {peft.metrics['memory']['trainable_params']:,d} |",
        f"| median step time | {own.step_time_s * 1e3:.1f} ms | {peft.step_time_s * 1e3:.1f} ms |",
        f"| peak memory | {mem(own)} | {mem(peft)} |",
        f"| final train loss | {own.losses[-1]:.6f} | {peft.losses[-1]:.6f} |",
        "",
        f"- max |Δloss| over {len(own.losses)} steps: **{figures['max_abs_loss_diff']:.3e}**",
        f"- max |ΔW| of the final LoRA tensors: **{figures['max_abs_weight_diff']:.3e}**",
        f"- step time ftkit / PEFT: **{figures['step_time_ratio_own_over_peft']:.3f}**",
        "",
        "| step | ftkit loss | PEFT loss | Δ |",
        "|---:|---:|---:|---:|",
    ]
    for step, (a, b) in enumerate(zip(own.losses, peft.losses, strict=True), start=1):
        lines.append(f"| {step} | {a:.6f} | {b:.6f} | {a - b:+.2e} |")
    return "\n".join(lines) + "\n"


def plot(own: ImplRun, peft: ImplRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    steps = range(1, len(own.losses) + 1)
    top.plot(steps, own.losses, label="ftkit LoRA")
    top.plot(steps, peft.losses, "--", label="PEFT LoRA")
    top.set_ylabel("train loss")
    top.legend()
    bottom.plot(steps, [abs(a - b) for a, b in zip(own.losses, peft.losses, strict=True)])
    bottom.set_ylabel("|Δloss|")
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_lora(
    recipe_args: list[str], output_dir: Path, accelerate_config: str | None = None
) -> dict:
    """Train both implementations and write ``lora_parity.md`` / ``.png`` / ``.json``."""
    output_dir = Path(output_dir)
    own, peft = (run_impl(impl, recipe_args, output_dir, accelerate_config) for impl in IMPLS)
    figures = parity(own, peft)
    figures.update(
        steps=len(own.losses),
        peak_bytes={run.impl: run.metrics["memory"].get("peak_bytes") for run in (own, peft)},
        trainable_params={
            run.impl: run.metrics["memory"]["trainable_params"] for run in (own, peft)
        },
    )
    atomic_write_text(
        output_dir / "lora_parity.md", report_markdown(own, peft, figures, recipe_args)
    )
    atomic_write_text(output_dir / "lora_parity.json", json.dumps(figures, indent=2) + "\n")
    plot(own, peft, output_dir / "lora_parity.png")
    return figures
