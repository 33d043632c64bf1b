"""The ablation grid: what gradient accumulation, mixed precision, LoRA and gradient
checkpointing each buy, measured on one model, one set of records and a fixed number of steps.

Every cell trains through ``accelerate launch -m ftkit train`` (the path users run) in a fresh
process, so its peak memory starts clean (see :class:`ftkit.meter.PeakMemoryMeter`). Per
cell the report reads the run's ``metrics.json`` / ``metrics.jsonl`` beside the planner's
prediction for the same setting, and writes Table 2 (one row per cell), Table 1 (↑ ↓ ≈ per
technique and category, derived from pairs of cells that differ in that technique only) and two
charts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ftkit.config import (
    ACCELERATE_MIXED_PRECISION,
    EMBEDDED_DATASET,
    PRECISIONS,
    Recipe,
    torch_dtype,
)
from ftkit.embedded import ASSETS_DIR
from ftkit.errors import ConfigError, FtkitError
from ftkit.io import atomic_write_json, atomic_write_text
from ftkit.lab.launch import (
    MEASUREMENT_RECIPE,
    child_env,
    launch_recipe,
    recipe_flags,
    single_process_flags,
)
from ftkit.lab.planner import TrainingPlan, estimate
from ftkit.meter import MIB, cpu_has_native_bf16

logger = logging.getLogger(__name__)

GRIDS_DIR = Path(__file__).resolve().parent / "grids"  # quick, full, bench, planner-32k
SYNTHETIC_DATASET = "synthetic"  # identical records: every micro-batch has the same shape
EMBEDDED_TOKENIZER = ASSETS_DIR / "tiny-llama"
LORA_IMPLS = ("none", "ftkit", "peft")
CATEGORIES = ("params", "grads", "optimizer", "activations")


# --------------------------------------------------------------------------- the grid


CELL_OPTIONS = ("seq", "padding_free", "supervised_logits", "calibration")


@dataclass(frozen=True)
class Cell:
    """One setting of the four techniques.  GA is ``micro_batch`` x ``accumulation``: GA on
    splits the same effective batch into smaller micro-batches.

    Optional, for the planner's validation grid: ``seq`` (tokens per sequence, at most the grid's
    ``max_length``, which is the default), the batching (``padding_free``: one flattened row per
    micro-batch; ``supervised_logits``: the LM head only at supervised positions; both off by
    default) and ``calibration`` (the cell was used to set a planner constant, so its error is
    reported apart from the held-out cells'; not part of the cell's identity).
    """

    micro_batch: int
    accumulation: int
    precision: str
    lora: str
    gc: bool
    seq: int | None = None
    padding_free: bool = False
    supervised_logits: bool = False
    calibration: bool = field(default=False, compare=False)

    @classmethod
    def parse(cls, ga: str, precision: str, lora: str, gc: bool, options=None) -> Cell:
        try:
            micro, acc = (int(n) for n in str(ga).lower().split("x"))
        except ValueError:
            raise ConfigError(
                f"GA level {ga!r} must be MICROxACCUMULATION, e.g. 4x1 or 1x4"
            ) from None
        if min(micro, acc) < 1:
            raise ConfigError(f"GA level {ga!r}: micro-batch and accumulation must be >= 1")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not one of {PRECISIONS}")
        if lora not in LORA_IMPLS:
            raise ConfigError(f"lora {lora!r} is not one of {LORA_IMPLS}")
        if not isinstance(gc, bool):
            raise ConfigError(f"gc must be true or false, got {gc!r}")
        options = options or {}
        unknown = set(options) - set(CELL_OPTIONS)
        if not isinstance(options, dict) or unknown:
            raise ConfigError(f"cell options {options!r}: valid keys are {CELL_OPTIONS}")
        seq = options.get("seq")
        if seq is not None and (not isinstance(seq, int) or seq < 2):
            raise ConfigError(f"cell seq must be an integer >= 2, got {seq!r}")
        flags = {k: options.get(k, False) for k in CELL_OPTIONS[1:]}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ConfigError(f"cell {key} must be true or false, got {value!r}")
        return cls(micro, acc, precision, lora, gc, seq, **flags)

    @property
    def name(self) -> str:
        gc = "gc" if self.gc else "nogc"
        name = f"{self.micro_batch}x{self.accumulation}-{self.precision}-{self.lora}-{gc}"
        if self.seq is not None:
            name += f"-s{self.seq}"
        return (
            name
            + ("-pf" if self.padding_free else "")
            + ("-suplogits" if self.supervised_logits else "")
        )

    @property
    def batching(self) -> str:
        rows = "padding-free" if self.padding_free else "padded"
        return f"{rows}, {'supervised' if self.supervised_logits else 'full'} logits"

    @property
    def ga(self) -> str:
        return (
            f"{'on' if self.accumulation > 1 else 'off'} ({self.micro_batch}×{self.accumulation})"
        )

    @property
    def base_dtype(self) -> str:
        """LoRA in half precision loads the frozen base in that dtype (adapters stay fp32); full
        fine-tuning in half precision is AMP over fp32 weights, as the planner assumes."""
        return "fp32" if self.lora == "none" else self.precision


@dataclass(frozen=True)
class Grid:
    """A grid file (a shipped name: ``quick``, ``full``, ``bench``, ``planner-32k``; or a path).

    ``model`` is a mapping of LlamaConfig values (built with seed 0, vocabulary and special ids
    from ``tokenizer``) or a model name/path the recipe accepts (with its own tokenizer).
    ``tokenizer`` and ``dataset`` are ``embedded`` / ``ftkit:tiny-instructions`` or paths,
    relative to the current directory; a path that is missing is an error, never a substitute.
    ``dataset: synthetic`` makes identical records (see :func:`synthetic_records`).
    """

    cells: tuple[Cell, ...]
    model: str | dict
    tokenizer: str = "embedded"
    dataset: str = EMBEDDED_DATASET
    max_length: int = 256
    steps: int = 2
    recipe: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, **overrides) -> Grid:
        """Read a grid; ``overrides`` (e.g. ``dataset``) replace the file's values."""
        shipped = GRIDS_DIR / f"{path}.yaml"
        path = shipped if shipped.is_file() else Path(path)
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in GRIDS_DIR.glob("*.yaml")))
            raise ConfigError(f"grid file {path} not found; pass a path or a shipped grid: {names}")
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        spec.update({key: value for key, value in overrides.items() if value is not None})
        factors = ("ga", "precision", "lora", "gc")
        if "cells" in spec:
            rows = spec.pop("cells")
        elif all(f in spec for f in factors):
            rows = itertools.product(*(spec.pop(f) for f in factors))
        else:
            raise ConfigError(f"{path}: list the cells, or levels for each of {factors}")
        cells = [Cell.parse(*row) for row in rows]
        try:
            grid = cls(cells=tuple(cells), **spec)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        Recipe.from_dict({**Recipe().to_dict(), **grid.recipe}, source=str(path))
        pinned = sorted(set(grid.recipe) & set(CELL_BATCHING))
        if pinned:
            raise ConfigError(f"{path}: set {pinned} per cell (padding_free, supervised_logits)")
        longer = [c.name for c in cells if c.seq is not None and c.seq > grid.max_length]
        if longer:
            raise ConfigError(f"{path}: cells {longer} are longer than max_length")
        if grid.steps < 2:
            raise ConfigError("steps must be >= 2: the peak of interest has the optimizer state")
        return grid

    @property
    def records_needed(self) -> int:
        return self.steps * max(c.micro_batch * c.accumulation for c in self.cells)

    def recipe_value(self, name: str):
        return {**Recipe().to_dict(), **self.recipe}[name]


# --------------------------------------------------------------------------- shared inputs


@dataclass(frozen=True)
class Setup:
    """What every cell shares: the base checkpoint per dtype, the records, the sequence length."""

    model_dirs: dict[str, Path]
    dataset: Path
    seq_len: int
    config: object  # the transformers config, for the planner
    prompt_tokens: tuple[int, ...] = ()  # masked prompt tokens of each record

    def seq(self, cell: Cell) -> int:
        return min(cell.seq or self.seq_len, self.seq_len)

    def supervised_fraction(self, cell: Cell) -> float:
        """The largest share of a record's positions whose (shifted) target is supervised."""
        seq = self.seq(cell)
        if any(p >= seq for p in self.prompt_tokens):
            raise ConfigError(f"cell {cell.name}: a record's prompt fills its {seq} tokens")
        return max((seq - p) / seq for p in self.prompt_tokens) if self.prompt_tokens else 1.0


def _local(path: str, embedded: Path | str, what: str) -> str:
    """The embedded file, or ``path`` (relative to the current directory) if it exists."""
    if path in ("embedded", EMBEDDED_DATASET):
        return str(embedded)
    if not Path(path).exists():
        raise ConfigError(
            f"grid {what} {path} not found (relative to {Path.cwd()}); pass --{what} PATH or "
            "run from the directory the grid's paths are relative to"
        )
    return str(Path(path).resolve())


def filling_records(records: list[dict], tokenizer, max_length: int, n: int):
    """The first ``n`` records whose tokens fill ``max_length`` (so every micro-batch of every
    cell has the same shape and no padding), or, when fewer do, the longest length ``n`` reach."""
    from ftkit.data import IGNORE_INDEX, tokenize_record

    spans, filling = [], 0
    for record in records:
        tokens = tokenize_record(record, tokenizer, 10**9)
        prompt, total = tokens["labels"].count(IGNORE_INDEX), len(tokens["input_ids"])
        spans.append((prompt, total))
        filling += prompt < max_length <= total
        if filling == n:
            break
    for seq in range(max_length, 1, -1):
        chosen = [r for r, (p, t) in zip(records, spans, strict=False) if p < seq <= t][:n]
        if len(chosen) == n:
            if seq < max_length:
                logger.warning(
                    "fewer than %d records reach %d tokens: using %d", n, max_length, seq
                )
            return chosen, seq
    raise FtkitError(f"the dataset has fewer than {n} records; lower steps or the batch")


def synthetic_records(n: int, max_length: int) -> list[dict]:
    """``n`` copies of one Alpaca record whose response outlasts ``max_length`` tokens (one
    token per word with a SentencePiece tokenizer), so every micro-batch of a cell has the same
    tokens and the same supervised positions: the planner's inputs are then exact."""
    record = {
        "instruction": "Repeat the word.",
        "input": "",
        "output": " ".join(["word"] * max_length),
    }
    return [dict(record) for _ in range(n)]


def prepare(grid: Grid, out: Path) -> Setup:
    """Build (or load) the base model once and save it in every dtype a cell loads, so no cell
    pays a dtype conversion during loading (its transient would sit in the peak)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from ftkit.data import (
        IGNORE_INDEX,
        load_records,
        resolve_dataset,
        tokenize_record,
        validate_records,
    )
    from ftkit.modeling import load_tokenizer, resolve_model_path

    if isinstance(grid.model, dict):
        tokenizer = load_tokenizer(_local(grid.tokenizer, EMBEDDED_TOKENIZER, "tokenizer"))
        config = LlamaConfig(
            **{
                "vocab_size": len(tokenizer),
                "max_position_embeddings": max(grid.max_length, 256),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "tie_word_embeddings": False,
                **grid.model,
            }
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    else:
        source = resolve_model_path(grid.model)
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    dirs = {"fp32": out / "base" / "fp32"}
    model.save_pretrained(dirs["fp32"])
    for dtype in sorted({c.base_dtype for c in grid.cells} - {"fp32"}):
        dirs[dtype] = out / "base" / dtype  # what from_pretrained(dtype=...) makes of fp32
        half = AutoModelForCausalLM.from_pretrained(dirs["fp32"], dtype=torch_dtype(dtype))
        half.save_pretrained(dirs[dtype])
    for path in dirs.values():
        tokenizer.save_pretrained(path)

    if grid.dataset == SYNTHETIC_DATASET:
        records = synthetic_records(grid.records_needed, grid.max_length)
    else:
        dataset = _local(grid.dataset, resolve_dataset(EMBEDDED_DATASET), "dataset")
        records = validate_records(load_records(dataset), dataset, skip_bad=True)
    chosen, seq_len = filling_records(records, tokenizer, grid.max_length, grid.records_needed)
    atomic_write_text(out / "records.json", json.dumps(chosen))
    prompts = tuple(
        tokenize_record(r, tokenizer, seq_len)["labels"].count(IGNORE_INDEX) for r in chosen
    )
    return Setup(dirs, out / "records.json", seq_len, model.config, prompts)


# --------------------------------------------------------------------------- one cell


def _flags(values: dict) -> list[str]:
    return recipe_flags(values)


def plan_for(grid: Grid, setup: Setup, cell: Cell) -> TrainingPlan:
    targets = grid.recipe_value("lora_target")
    return TrainingPlan(
        lora_r=None if cell.lora == "none" else grid.recipe_value("lora_r"),
        lora_targets=tuple(targets) if targets and cell.lora != "none" else None,
        lora_dropout=0.0 if cell.lora == "none" else grid.recipe_value("lora_dropout"),
        precision=cell.precision,
        gradient_checkpointing=cell.gc,
        micro_batch_size=cell.micro_batch,
        gradient_accumulation_steps=cell.accumulation,
        seq_len=setup.seq(cell),
        padding_free=cell.padding_free,
        supervised_logits_only=cell.supervised_logits,
        supervised_fraction=setup.supervised_fraction(cell),
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


# Recipe fields each cell sets from its own factors (the grid's recipe may not): the batching
# the planner is told about, and no length grouping (every record of a cell has one length).
CELL_BATCHING = ("padding_free", "supervised_logits_only", "group_by_length")


def cell_batching(cell: Cell) -> dict:
    return {
        "padding_free": "true" if cell.padding_free else "false",
        "supervised_logits_only": cell.supervised_logits,
        "group_by_length": False,
    }


def run_cell(grid: Grid, setup: Setup, cell: Cell, out: Path, threads: int) -> dict:
    """Train one cell in a fresh ``accelerate launch`` process and return its Table 2 row."""
    run_dir = out / "cells" / cell.name
    if cell.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("fp16 cells need CUDA; on CPU use fp32 and bf16")
    launch = single_process_flags(ACCELERATE_MIXED_PRECISION[cell.precision], threads)
    recipe = {
        **MEASUREMENT_RECIPE,
        **grid.recipe,
        **cell_batching(cell),
        "model_name_or_path": setup.model_dirs[cell.base_dtype],
        "model_dtype": cell.base_dtype,
        "dataset": setup.dataset,
        "validation_size": 0,
        "max_length": setup.seq(cell),
        "max_steps": grid.steps,
        "per_device_train_batch_size": cell.micro_batch,
        "gradient_accumulation_steps": cell.accumulation,
        "lora_impl": cell.lora,
        "gradient_checkpointing": cell.gc,
        "save_steps": 0,
    }
    env = child_env()
    logger.info("cell %s", cell.name)
    run = launch_recipe(launch, _flags(recipe), run_dir, name=f"cell {cell.name}", env=env)
    for weights in run_dir.glob("*.safetensors"):  # the grid measures; it keeps no weights
        weights.unlink()
    metrics = run.metrics
    mem = metrics["memory"]
    planned = estimate(setup.config, plan_for(grid, setup, cell))
    measured = {c: mem[f"{c}_bytes"] for c in CATEGORIES}
    return {
        "cell": cell.name,
        "ga": cell.ga,
        "micro_batch": cell.micro_batch,
        "accumulation": cell.accumulation,
        "precision": cell.precision,
        "lora": cell.lora,
        "gc": "on" if cell.gc else "off",
        "seq": setup.seq(cell),
        "cell_seq": cell.seq,
        "padding_free": cell.padding_free,
        "supervised_logits": cell.supervised_logits,
        "calibration": cell.calibration,
        "peak_bytes": mem["peak_bytes"],
        "reserved_bytes": mem["reserved_bytes"],  # CUDA's caching allocator; None on CPU
        **{f"{c}_bytes": v for c, v in measured.items()},
        "planned_bytes": planned.total,
        **{f"planned_{c}_bytes": getattr(planned, c) for c in CATEGORIES},
        "planner_error": planned.total / mem["peak_bytes"] - 1,
        "planner_peak_phase": max(planned.phases, key=lambda phase: phase[1])[0],
        "planner_static_exact": all(
            getattr(planned, c) == measured[c] for c in ("params", "grads", "optimizer")
        ),
        "wall_time_s": metrics["wall_time_s"],
        "step_time_s": run.median("step_time_s"),
        "tokens_per_s": run.median("tokens_per_s"),
        "trainable_params": mem["trainable_params"],
        "total_params": mem["total_params"],
        "train_loss": metrics["train_loss"],
        "peak_kind": mem["peak_kind"],
    }


def cell_of(row: dict) -> Cell:
    """The cell a Table 2 row was run from (``seq`` as the grid gave it; the row's own ``seq`` is
    the length it ran at)."""
    return Cell(
        row["micro_batch"],
        row["accumulation"],
        row["precision"],
        row["lora"],
        row["gc"] == "on",
        row["cell_seq"],
        row["padding_free"],
        row["supervised_logits"],
        row["calibration"],
    )


# --------------------------------------------------------------------------- Table 1


def _ga_on(cell: Cell, rows: dict[Cell, dict]) -> list[dict]:
    """Partners of a GA-off cell: its effective batch split into micro-batches, all else equal."""
    return [
        rows[c]
        for c in rows
        if cell.accumulation == 1
        and c.accumulation > 1
        and c.micro_batch * c.accumulation == cell.micro_batch
        and dataclasses.replace(c, micro_batch=cell.micro_batch, accumulation=1) == cell
    ]


def _switch(factor: str, off, on):
    """Partner of a cell whose ``factor`` is ``off``: the same cell with ``factor`` = ``on``."""

    def partner(cell: Cell, rows: dict[Cell, dict]) -> list[dict]:
        other = dataclasses.replace(cell, **{factor: on})
        return [rows[other]] if getattr(cell, factor) == off and other in rows else []

    return partner


def _method(cell: Cell) -> str:
    return "full FT" if cell.lora == "none" else "LoRA"


def _precision(cell: Cell) -> str:
    return cell.precision


# (name, the "on" partners of an "off" cell, the context a pair is reported under): what a
# technique buys differs between LoRA and full fine-tuning, and LoRA's between precisions.
TECHNIQUES = (
    ("GA, same effective batch", _ga_on, _method),
    ("bf16 mixed precision", _switch("precision", "fp32", "bf16"), _method),
    ("fp16 mixed precision", _switch("precision", "fp32", "fp16"), _method),
    ("gradient checkpointing", _switch("gc", False, True), _method),
    ("ftkit LoRA vs full FT", _switch("lora", "none", "ftkit"), _precision),
    ("PEFT LoRA vs full FT", _switch("lora", "none", "peft"), _precision),
    ("ftkit LoRA vs PEFT LoRA", _switch("lora", "peft", "ftkit"), _precision),
)
TABLE1_COLUMNS = (*CATEGORIES, "peak", "time")
_COLUMN_KEY = {**{c: f"{c}_bytes" for c in CATEGORIES}, "peak": "peak_bytes", "time": "step_time_s"}


def _arrow(ratio: float) -> str:
    return "↓" if ratio < 0.9 else "↑" if ratio > 1.1 else "≈"


def technique_effects(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """For each technique and context, the on/off ratio of every column over all pairs of cells
    that differ in that technique only (the other three factors equal)."""
    by_cell = {cell_of(row): row for row in rows}
    effects: dict[str, dict[str, list[float]]] = {}
    for name, partner, context in TECHNIQUES:
        for cell, off in by_cell.items():
            for on in partner(cell, by_cell):
                ratios = effects.setdefault(
                    f"{name} ({context(cell)})", {c: [] for c in TABLE1_COLUMNS}
                )
                for col in TABLE1_COLUMNS:
                    if off[_COLUMN_KEY[col]] > 0:
                        ratios[col].append(on[_COLUMN_KEY[col]] / off[_COLUMN_KEY[col]])
    return effects


def _effect_text(ratios: list[float]) -> str:
    if not ratios:
        return "n/a"
    lo, hi = min(ratios), max(ratios)
    if _arrow(lo) == _arrow(hi):
        return f"{_arrow(statistics.median(ratios))} ×{statistics.median(ratios):.2g}"
    return f"{_arrow(lo)}/{_arrow(hi)} ×{lo:.2g}–{hi:.2g}"


# --------------------------------------------------------------------------- the report


def _cores() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine() -> str:
    if torch.cuda.is_available():
        return f"GPU, {torch.cuda.get_device_name()}"
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        model = names[0] if names else ""
    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = "native" if cpu_has_native_bf16() else "emulated"
    return f"CPU, {_cores()} cores ({model}; torch kernels: {isa}; bf16 {bf16})"


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def table2(rows: list[dict]) -> str:
    head = (
        "| GA (micro×acc) | precision | LoRA | GC | seq | batching | peak MiB | planned MiB "
        "| planner error | time s "
        "| tokens/s | speed vs row 1 | trainable % | loss | params MiB | grads MiB | optimizer MiB "
        "| activations MiB | peak phase (planner) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    first = rows[0]["tokens_per_s"]
    for r in rows:
        lines.append(
            f"| {r['ga']} | {r['precision']} | {r['lora']} | {r['gc']} | {r['seq']} "
            f"| {cell_of(r).batching}{' (calibration)' if r['calibration'] else ''} "
            f"| {_mib(r['peak_bytes'])} "
            f"| {_mib(r['planned_bytes'])} | {100 * r['planner_error']:+.1f} % | {r['wall_time_s']:.1f} "
            f"| {r['tokens_per_s']:.0f} | ×{r['tokens_per_s'] / first:.2f} "
            f"| {100 * r['trainable_params'] / r['total_params']:.3f} | {r['train_loss']:.4f} "
            + " ".join(f"| {_mib(r[f'{c}_bytes'])}" for c in CATEGORIES)
            + f" | {r['planner_peak_phase']} |"
        )
    return "\n".join(lines)


def table1(rows: list[dict]) -> str:
    lines = [
        "| technique | " + " | ".join(TABLE1_COLUMNS) + " | pairs |",
        "|---|" + "---|" * (len(TABLE1_COLUMNS) + 1),
    ]
    for name, ratios in technique_effects(rows).items():
        cells = " | ".join(_effect_text(ratios[col]) for col in TABLE1_COLUMNS)
        lines.append(f"| {name} | {cells} | {len(ratios['time'])} |")
    return "\n".join(lines)


def _prompts(setup: Setup) -> str:
    lengths = sorted(set(setup.prompt_tokens))
    if len(lengths) == 1:
        return f"every record's first {lengths[0]} tokens are its masked prompt"
    return f"masked prompts of {lengths[0]}–{lengths[-1]} tokens"


def planner_table(rows: list[dict]) -> str:
    """Predicted vs measured peak per cell, the cells that set the planner's constants apart
    from the held-out ones, each group summarised by its largest and median error."""
    lines = [
        "| cell | role | seq | batching | GC | measured MiB | planned MiB | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for label, calibration in (("calibration", True), ("held-out", False)):
        group = [r for r in rows if r["calibration"] == calibration]
        for r in group:
            lines.append(
                f"| {r['cell']} | {label} | {r['seq']} | {cell_of(r).batching} | {r['gc']} "
                f"| {_mib(r['peak_bytes'])} | {_mib(r['planned_bytes'])} "
                f"| {100 * r['planner_error']:+.1f} % |"
            )
        if group:
            errors = [abs(r["planner_error"]) for r in group]
            summary.append(
                f"{label} ({len(group)} cells): |error| max {100 * max(errors):.1f} %, median "
                f"{100 * statistics.median(errors):.1f} %"
            )
    return "\n".join([*lines, "", "; ".join(summary) + "."])


def report_markdown(rows: list[dict], grid: Grid, setup: Setup, title: str) -> str:
    errors = [abs(r["planner_error"]) for r in rows]
    exact = sum(r["planner_static_exact"] for r in rows)
    cfg = setup.config
    n_params = rows[0]["total_params"] if rows[0]["lora"] == "none" else None
    size = f"{n_params / 1e6:.1f}M parameters, " if n_params else ""
    return "\n".join(
        [
            f"# {title}",
            "",
            f"Machine: **{machine()}**, torch {torch.__version__}. Model: {cfg.model_type}, {size}"
            f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocabulary {cfg.vocab_size}. "
            f"Every cell: {grid.steps} optimizer steps on the same {grid.records_needed} records, "
            f"each exactly the cell's seq tokens (no padding; {_prompts(setup)}); "
            "effective batch = micro × acc; "
            f"LoRA r={grid.recipe_value('lora_r')} on {grid.recipe_value('lora_target') or 'q/v'}, "
            f"dropout {grid.recipe_value('lora_dropout')}; one fresh `accelerate launch` process "
            "per cell.",
            "",
            "## Table 2: every cell",
            "",
            table2(rows),
            "",
            f"Peak: {rows[0]['peak_kind']}. On CPU that is the kernel's high-water mark of the "
            "resident set (`VmHWM`, reset when the Trainer starts, after imports and before the "
            "model) minus the RSS at that moment, shared-library (code) pages left out of both, with glibc's mmap threshold pinned so freed activations leave the "
            "resident set as they do on a GPU allocator. params/grads/optimizer are exact bytes "
            "counted from the tensors after the last step; activations = peak − the three: "
            "whatever else the peak holds, i.e. activations, every transient buffer alive at the "
            "peak and the runtime's own growth. Where the peak is the optimizer step (full "
            "fine-tuning without accumulation: gradients are freed between steps, so forward "
            "and backward never hold them all) that residual is the optimizer's temporaries, "
            "not activations; the last column names the phase the planner puts the peak in. "
            "Half-precision LoRA loads the frozen base in that dtype (adapters fp32); half-"
            "precision full fine-tuning is AMP over fp32 weights. time = wall time of the steps; "
            "tokens/s = median over the steps after the first, real (non-pad) tokens.",
            "",
            f"Planner (`ftkit.lab.planner.estimate`, same settings, before anything is loaded): "
            f"params/grads/optimizer exact in {exact}/{len(rows)} cells; total vs measured peak "
            f"within {100 * max(errors):.1f} % in every cell (median "
            f"{100 * statistics.median(errors):.1f} %).",
            "",
            *(
                ["## Planner: calibration and held-out cells", "", planner_table(rows), ""]
                if any(r["calibration"] for r in rows)
                else []
            ),
            "## Table 1: what each technique buys, derived from the cells above",
            "",
            table1(rows),
            "",
            "Each entry is the ratio with / without the technique over every pair of cells that "
            "differ in that technique only (median; a range when pairs disagree): ↓ below ×0.9, "
            "↑ above ×1.1, ≈ between; time is the median step time after the first step. Nothing "
            "in this table is typed in. Read activations against Table 2's last column: where a "
            "cell peaks at the optimizer step its residual is the optimizer's temporaries, so a "
            "ratio against it is not an activation ratio (peak is the unambiguous column).",
            "",
            "![memory breakdown](memory.png)",
            "",
            "![time](time.png)",
            "",
        ]
    )


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r['micro_batch']}×{r['accumulation']}\n{r['precision']}\n{r['lora']}\n{'GC' if r['gc'] == 'on' else '-'}"
        for r in rows
    ]
    x = range(len(rows))
    width = max(6, 0.55 * len(rows))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    bottom = [0.0] * len(rows)
    for category in CATEGORIES:
        values = [r[f"{category}_bytes"] / MIB for r in rows]
        ax.bar(x, values, bottom=bottom, label=category)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.scatter(
        x,
        [r["planned_bytes"] / MIB for r in rows],
        marker="_",
        s=300,
        color="black",
        label="planner total",
        zorder=3,
    )
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title(f"Measured memory by category ({machine()})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(width, 4))
    colors = {"fp32": "tab:blue", "bf16": "tab:orange", "fp16": "tab:green"}
    ax.bar(x, [r["wall_time_s"] for r in rows], color=[colors[r["precision"]] for r in rows])
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("wall time of the steps, s")
    ax.set_title("Time per cell (blue fp32, orange bf16, green fp16)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "time.png", dpi=100)
    plt.close(fig)


def write_report(rows: list[dict], grid: Grid, setup: Setup, out: Path, title: str) -> None:
    """``ablation.md`` (Tables 2 and 1), ``ablation.csv``, ``ablation.json``, two PNG charts."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "ablation.csv", buffer.getvalue())
    atomic_write_json(
        out / "ablation.json",
        {"machine": machine(), "rows": rows, "effects": technique_effects(rows)},
    )
    atomic_write_text(out / "ablation.md", report_markdown(rows, grid, setup, title))
    plot(rows, out)


def run_grid(grid: Grid, out: str | Path, jobs: int = 1, title: str = "Ablation") -> list[dict]:
    """Every cell of ``grid`` in its own process, ``jobs`` at a time (memory figures do not
    depend on ``jobs``; timings are only comparable with ``jobs=1``)."""
    out = Path(out).resolve()
    setup = prepare(grid, out)
    threads = max(1, _cores() // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(lambda cell: run_cell(grid, setup, cell, out, threads), grid.cells))
    write_report(rows, grid, setup, out, title)
    return rows
