"""Experiment tracking through Accelerate's trackers (``report_to``), and the rows a run logs.

Every ``logging_steps`` optimizer steps, and at the last one, one row goes to ``metrics.jsonl``,
the progress bar and every tracker alike (HF Trainer's convention): the mean loss over the steps
since the last row, the current learning rate, the last grad norm, tokens/s over the interval and
the mean step time.  ``report_to`` is validated with the recipe's other fields, against
Accelerate's own list of trackers (``ftkit.config.parse_report_to``); a tracker whose package is
missing is one ``ConfigError`` line before the model loads (Accelerate itself would silently skip
it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ftkit.config import REPORT_TO_ALL, parse_report_to
from ftkit.errors import ConfigError

logger = logging.getLogger(__name__)

PROJECT_NAME = "ftkit"  # wandb/mlflow project; TensorBoard writes OUTPUT_DIR/ftkit/
# ftkit ships extras for the trackers it documents; the others install under their own name.
EXTRAS = {"tensorboard": "ftkit[tensorboard]", "wandb": "ftkit[wandb]", "mlflow": "ftkit[mlflow]"}
PIP_NAMES = {"comet_ml": "comet-ml"}


def check_installed(value: str) -> list[str]:
    """The trackers to use; a named one whose package is missing is one clear error."""
    from accelerate.tracking import get_available_trackers

    names = parse_report_to(value)
    available = [str(t.value) for t in get_available_trackers()]
    for name in names:
        if name != REPORT_TO_ALL and name not in available:
            install = EXTRAS.get(name, PIP_NAMES.get(name, name))
            raise ConfigError(
                f"report_to={name} needs the {name} package, which is not installed: "
                f"pip install '{install}' (or set report_to none; metrics.jsonl is always written)"
            )
    if names == [REPORT_TO_ALL] and not available:
        logger.warning("report_to=all but no tracker is installed: metrics.jsonl only")
    return names


def accelerator_kwargs(train_cfg) -> dict:
    """``Accelerator(log_with=..., project_dir=output_dir)`` for the recipe's ``report_to``."""
    names = check_installed(train_cfg.report_to)
    return {"log_with": names or None, "project_dir": str(train_cfg.output_dir)}


def hparams(recipe) -> dict:
    """The flat recipe as tracker config: lists joined, None spelled out (TensorBoard's hparams
    take only bool, int, float and str)."""
    values = {}
    for key, value in recipe.to_dict().items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        values[key] = "none" if value is None else value
    return values


def scalars(row: dict) -> dict:
    """What a tracker gets from a row: its numbers (``step`` is the tracker's own axis)."""
    return {
        key: value
        for key, value in row.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class LogInterval:
    """The optimizer steps since the last logged row."""

    def __init__(self):
        self.rows: list[dict] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def pop(self) -> dict:
        """One row for the interval: mean loss and step time, tokens/s over the whole interval,
        the last step's lr and grad norm."""
        rows, self.rows = self.rows, []
        last = rows[-1]
        time_s = sum(r["step_time_s"] for r in rows)
        tokens = sum(r["tokens"] for r in rows)
        return {
            "step": last["step"],
            "loss": sum(r["loss"] for r in rows) / len(rows),
            "lr": last["lr"],
            "grad_norm": last["grad_norm"],
            "tokens_per_s": tokens / time_s,
            "step_time_s": time_s / len(rows),
        }


class StepLogger:
    """Where a run's rows go: ``metrics.jsonl`` (the RunLog), the trackers, the progress bar."""

    def __init__(self, accelerator, recipe, run_log, bar, total_steps: int):
        self.accelerator = accelerator
        self.recipe = recipe
        self.run_log = run_log
        self.bar = bar
        self.total_steps = total_steps
        self.every = recipe.train.logging_steps
        self.interval = LogInterval()
        self.tracking = bool(accelerator.log_with)

    def start(self) -> None:
        if not self.tracking:
            return
        run_name = Path(self.recipe.train.output_dir).name
        self.accelerator.init_trackers(
            PROJECT_NAME,
            config=hparams(self.recipe),
            init_kwargs={"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}},
        )

    def track(self, values: dict, step: int) -> None:
        """Trackers only (e.g. the eval before training, which metrics.json already holds)."""
        values = scalars(values)
        if self.tracking and values:
            self.accelerator.log(values, step=step)

    def train_step(self, row: dict) -> dict | None:
        """Add one optimizer step; every ``logging_steps`` (and at the last) log the interval."""
        self.interval.add(row)
        step = row["step"]
        if step % self.every and step < self.total_steps:
            return None
        return self.flush()

    def flush(self) -> dict | None:
        if not self.interval:
            return None
        logged = self.interval.pop()
        self.run_log.event(**logged)
        self.track(logged, logged["step"])
        self.bar.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['lr']:.2e}")
        return logged

    def evaluation(self, step: int, values: dict) -> None:
        if values:
            self.run_log.event(step=step, **values)
            self.track(values, step)

    def end(self) -> None:
        """Close the trackers (``end_training``; it also ends the process group, so it comes
        after the run's last collective)."""
        if self.tracking:
            self.accelerator.end_training()
