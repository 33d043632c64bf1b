"""Run artefacts a person reads: per-step metrics (JSONL), final metrics (JSON), loss curve, summary."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ftkit.io import atomic_write_json, atomic_write_text
from ftkit.meter import trainable_parameters_line

METRICS_STEPS = "metrics.jsonl"
METRICS_FINAL = "metrics.json"
LOSS_CURVE = "loss_curve.png"


class RunLog:
    """Appends one JSON line per logged step; only the main process writes."""

    def __init__(self, output_dir: Path, enabled: bool = True, append: bool = False):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.history: list[dict] = []
        if enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not append:  # a resumed run continues the same log
                (self.output_dir / METRICS_STEPS).write_text("", encoding="utf-8")

    @property
    def last_loss(self) -> float | None:
        losses = [row["loss"] for row in self.history if "loss" in row]
        return losses[-1] if losses else None

    def event(self, **row) -> None:
        self.history.append(row)
        if self.enabled:
            with open(self.output_dir / METRICS_STEPS, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def resume_at(self, step: int) -> None:
        """Continue the log of a run resumed at ``step``: rows past it (logged by the run that was
        killed after its checkpoint) are dropped, so each step appears once."""
        path = self.output_dir / METRICS_STEPS
        rows = []
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        self.history = [row for row in rows if row.get("step", 0) <= step]
        if self.enabled:
            text = "".join(json.dumps(row) + "\n" for row in self.history)
            atomic_write_text(path, text)

    def finish(self, metrics: dict, directory: Path | None = None) -> None:
        """metrics.json and the loss curve, into ``directory`` (default: the output dir)."""
        directory = Path(directory or self.output_dir)
        atomic_write_json(directory / METRICS_FINAL, metrics)
        plot_loss_curve(self.history, metrics, directory / LOSS_CURVE)


def plot_loss_curve(history: list[dict], metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history if "loss" in row]
    losses = [row["loss"] for row in history if "loss" in row]
    evals = [(row["step"], row["eval_loss"]) for row in history if "eval_loss" in row]
    if metrics.get("eval_loss") is not None:
        evals = [(0, metrics["eval_loss_before"]), *evals, (metrics["steps"], metrics["eval_loss"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, label="train loss (per supervised token)")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o--", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{metrics['techniques']['lora_impl']} LoRA, {metrics['techniques']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plan_beside_measured(train_cfg, memory: dict, history: list[dict]) -> dict:
    """``{"plan": ...}``: what ``ftkit plan`` predicted (the recipe's ``planned_*`` fields) beside
    what the run measured, or ``{}`` for a run without a plan. The measured step time is the
    median of the logged steps after the first (which pays one-off start-up costs)."""
    if not (train_cfg.planned_peak_bytes or train_cfg.planned_step_time_s):
        return {}
    times = [row["step_time_s"] for row in history if "step_time_s" in row]
    return {
        "plan": {
            "predicted_peak_bytes": train_cfg.planned_peak_bytes or None,
            "measured_peak_bytes": memory.get("peak_bytes"),
            "predicted_step_time_s": train_cfg.planned_step_time_s or None,
            "measured_step_time_s": statistics.median(times[1:] or times) if times else None,
        }
    }


def _mib(n_bytes) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.1f} MiB"


def summary(metrics: dict, output_dir: Path) -> str:
    """The few lines a person looks at after a run."""
    mem = metrics["memory"]
    lines = [
        "",
        "== ftkit run summary ==",
        trainable_parameters_line(mem["trainable_params"], mem["total_params"]),
        f"steps: {metrics['steps']}  wall time: {metrics['wall_time_s']:.1f} s"
        f"  peak memory: {_mib(mem.get('peak_bytes'))} ({mem.get('peak_kind', 'n/a')})",
    ]
    if metrics.get("eval_loss") is not None:
        before, after = metrics["eval_loss_before"], metrics["eval_loss"]
        lines.append(
            f"eval loss: {before:.4f} -> {after:.4f} ({100 * (after - before) / before:+.1f} %)"
            f"  perplexity: {metrics['eval_perplexity_before']:.2f} -> {metrics['eval_perplexity']:.2f}"
        )
    speed = metrics.get("throughput") or {}
    if speed.get("tokens_per_s"):
        lines.append(
            f"throughput: {speed['tokens_per_s']:.0f} tokens/s "
            f"({speed['supervised_tokens_per_s']:.0f} supervised)  batching: {speed['batching']}"
            f"  padding waste: {speed['padding_waste']:.2f}"
        )
    plan = metrics.get("plan")
    if plan:
        step = plan["measured_step_time_s"]
        lines.append(
            f"plan: peak {_mib(plan['predicted_peak_bytes'])} predicted, "
            f"{_mib(plan['measured_peak_bytes'])} measured; step "
            f"{plan['predicted_step_time_s'] or 0:.3g} s predicted, "
            f"{'n/a' if step is None else f'{step:.3g} s'} measured (median)"
        )
    lines.append(f"techniques: {json.dumps(metrics['techniques'])}")
    lines.append(f"artefacts: {output_dir}")
    return "\n".join(lines)
