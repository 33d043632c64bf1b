"""Recipe configuration: one small dataclass per concern, flat unique field names (TRL style).

A recipe is a YAML file of ``field: value`` pairs; any field can be overridden on the command line as
``--field value``. Precision and process count are *not* recipe fields: they belong to the Accelerate
config (``accelerate launch --config_file accelerate_configs/...``), which says *how* to run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ftkit.errors import ConfigError
from ftkit.io import atomic_write_text

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "ftkit:tiny-llama"
EMBEDDED_DATASET = "ftkit:tiny-instructions"
LORA_IMPLS = ("peft", "ftkit", "none")
DATA_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text")
# The one precision vocabulary (recipes, planner, grid, metrics); Accelerate's and torch's
# spellings are derived from it here and nowhere else.
PRECISIONS = ("fp32", "bf16", "fp16")
ACCELERATE_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # shipped recipes: tiny, llama2-7b, ...
DEFAULT_RECIPE = "tiny"
SDPA_VARLEN = "sdpa_varlen"  # the recipe's name for ftkit.attention's per-sequence SDPA
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", SDPA_VARLEN, "flash_attention_2")
REPORT_TO_NONE, REPORT_TO_ALL = "none", "all"  # besides Accelerate's tracker names


def torch_dtype(precision: str):
    """The torch dtype of a precision name (``fp32`` -> ``torch.float32``)."""
    import torch

    return getattr(torch, _TORCH_DTYPE_NAMES[precision])


def precision_of_mixed_precision(mixed_precision: str) -> str:
    """ftkit's name for an Accelerate ``mixed_precision`` value (``no`` -> ``fp32``)."""
    by_accelerate = {value: name for name, value in ACCELERATE_MIXED_PRECISION.items()}
    return by_accelerate[str(mixed_precision)]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_TRISTATE_FIELDS = ("padding_free",)


def _tristate(name: str, value) -> str:
    """``true`` / ``false`` / ``auto`` from a YAML bool or a command-line string."""
    text = str(value).strip().lower()
    text = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false"}.get(text, text)
    _require(text in ("true", "false", "auto"), f"{name}={value!r} is not true, false or auto")
    return text


# Fields whose vocabulary is a library's: the library is imported only when the field is set.


def supported_trackers() -> tuple[str, ...]:
    """Accelerate's tracker names (``LoggerType`` without ``all``)."""
    from accelerate.utils import LoggerType

    return tuple(t.value for t in LoggerType if t is not LoggerType.ALL)


def parse_report_to(value: str) -> list[str]:
    """``none`` -> [], ``all`` -> ['all'], ``tensorboard,wandb`` -> both; unknown names fail."""
    names = [name.strip().lower() for name in str(value).split(",") if name.strip()]
    if names in ([], [REPORT_TO_NONE]):
        return []
    known = supported_trackers()
    for name in names:
        if name not in (REPORT_TO_ALL, *known):
            raise ConfigError(
                f"report_to={value!r}: unknown tracker {name!r}; use none, all or one of "
                f"Accelerate's trackers: {', '.join(known)} (comma-separated for several)"
            )
    return list(dict.fromkeys(names))


def check_hub_fields(push_to_hub: bool, hub_model_id: str | None) -> None:
    """Recipe-level checks (no network, no environment; ``ftkit.hub.check_can_push`` does those)."""
    if push_to_hub and not hub_model_id:
        raise ConfigError(
            "push_to_hub needs hub_model_id, the Hub repo to create or update "
            "(e.g. --hub_model_id your-name/tiny-llama-lora)"
        )
    if hub_model_id:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(hub_model_id)
        except HFValidationError as err:
            first = str(err).strip().splitlines()[0]
            raise ConfigError(
                f"hub_model_id={hub_model_id!r} is not a Hub repo id: {first}"
            ) from err


@dataclass
class ModelConfig:
    """Which base model to load, and how to hold its frozen weights."""

    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": "Hub id, local directory, or ftkit:tiny-llama (the embedded default)."},
    )
    model_dtype: str = field(
        default="fp32",
        metadata={"help": f"dtype of the loaded base weights: {', '.join(PRECISIONS)}."},
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "bitsandbytes 8-bit base."})
    load_in_4bit: bool = field(default=False, metadata={"help": "bitsandbytes 4-bit NF4 base."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward (use_reentrant=False)."}
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "auto (sdpa_varlen for padding-free batches, else transformers' default), "
            "sdpa, eager, sdpa_varlen (one causal SDPA per sequence of a flattened row) or "
            "flash_attention_2 (CUDA + flash-attn)."
        },
    )

    def __post_init__(self):
        _require(
            self.model_dtype in PRECISIONS,
            f"model_dtype={self.model_dtype!r} is not one of {PRECISIONS}",
        )
        _require(
            self.attn_implementation in ATTN_IMPLEMENTATIONS,
            f"attn_implementation={self.attn_implementation!r} is not one of "
            f"{ATTN_IMPLEMENTATIONS}",
        )
        _require(
            not (self.load_in_8bit and self.load_in_4bit),
            "load_in_8bit and load_in_4bit are exclusive: pick one",
        )


@dataclass
class DataConfig:
    """Which records (Alpaca, chat, prompt/completion or text) to train on, and how to tokenise."""

    dataset: str = field(
        default=EMBEDDED_DATASET,
        metadata={
            "help": "A .json/.jsonl/.parquet/.csv file, a datasets directory, a Hub dataset id, "
            "or ftkit:tiny-instructions."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    data_format: str = field(
        default="auto",
        metadata={
            "help": "auto (detected from the first records, logged), alpaca, messages, sharegpt, "
            "prompt_completion or text."
        },
    )
    num_samples: int = field(default=0, metadata={"help": "Use the first N records (0 = all)."})
    validation_size: float = field(
        default=0.1, metadata={"help": "Held-out fraction (<1) or count (>=1) of the records."}
    )
    max_length: int = field(default=256, metadata={"help": "Truncate prompt+response to N tokens."})
    allow_beyond_context: bool = field(
        default=False,
        metadata={
            "help": "Train with a max_length beyond the model's context (max_position_embeddings, "
            "times its RoPE scaling factor) with a warning, instead of refusing (RoPE models only)."
        },
    )
    train_on_inputs: bool = field(
        default=False, metadata={"help": "Also train on the prompt tokens (default: mask them)."}
    )
    skip_bad_records: bool = field(
        default=False,
        metadata={"help": "Skip malformed records (logging their count) instead of failing."},
    )
    num_proc: int = field(
        default=0,
        metadata={
            "help": "Processes that tokenise (0: one per CPU core, at most 8; each gets at "
            "least 1,000 records). The tokens are the same for any value, and cached."
        },
    )

    padding_free: str = field(
        default="auto",
        metadata={
            "help": "true: each micro-batch is one flattened row with position_ids (no padding); "
            "auto (default): on for model types proven exact (LLaMA, Mistral, Qwen2, Gemma, "
            "Phi, GPT-2), off elsewhere (BLOOM, OPT); false: right-padded batches."
        },
    )

    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Batch records of similar length (random mega-batches sorted by length, "
            "batches shuffled; seeded per epoch): far less padding than random batches."
        },
    )

    def __post_init__(self):
        self.padding_free = _tristate("padding_free", self.padding_free)
        _require(self.num_samples >= 0, f"num_samples must be >= 0, got {self.num_samples}")
        _require(
            self.data_format in DATA_FORMATS,
            f"data_format={self.data_format!r} is not one of {DATA_FORMATS}",
        )
        _require(self.validation_size >= 0, "validation_size must be >= 0")
        _require(self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}")
        _require(
            self.num_proc >= 0,
            f"num_proc must be >= 0 (0: one per CPU core), got {self.num_proc}",
        )


@dataclass
class AdapterConfig:
    """Which LoRA implementation, where, and how big."""

    lora_impl: str = field(
        default="peft",
        metadata={"help": "peft (PEFT's LoRA), ftkit (ftkit's own LoRA) or none (full fine-tune)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt, or all-linear (default: PEFT's targets for the "
            "architecture; q_proj v_proj on LLaMA, query_key_value on BLOOM)."
        },
    )
    use_rslora: bool = field(default=False, metadata={"help": "scaling = alpha / sqrt(r)."})

    def __post_init__(self):
        _require(
            self.lora_impl in LORA_IMPLS,
            f"lora_impl={self.lora_impl!r} is not one of {LORA_IMPLS}",
        )
        _require(self.lora_r > 0, f"lora_r must be > 0, got {self.lora_r}")
        _require(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        if isinstance(self.lora_target, str):  # YAML `lora_target: q_proj`: one module, not 6
            self.lora_target = [self.lora_target]
        _require(
            0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"
        )


@dataclass
class TrainConfig:
    """The optimisation schedule and where results go."""

    output_dir: str = field(default="outputs/tiny-llama-lora", metadata={"help": "Artefact dir."})
    seed: int = field(default=42)
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 = use epochs."})
    num_train_epochs: float = field(default=1.0)
    per_device_train_batch_size: int = field(default=4)
    per_device_eval_batch_size: int = field(default=8)
    gradient_accumulation_steps: int = field(default=1)
    learning_rate: float = field(default=2e-4)
    weight_decay: float = field(default=0.0)
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler."})
    warmup_ratio: float = field(default=0.03)
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip grad norm; 0 disables."})
    logging_steps: int = field(
        default=1,
        metadata={
            "help": "Log every N optimizer steps and the last (metrics.jsonl, bar, trackers)."
        },
    )
    eval_steps: int = field(
        default=0, metadata={"help": "Evaluate every N steps (0 = at the end)."}
    )
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0 = never)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep the last K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "Checkpoint dir, or 'latest' in output_dir."}
    )
    # `none` by default: a run stays offline and needs nothing beyond the core install, and
    # metrics.jsonl is written whatever this says; trackers are opt-in extras (ftkit[tensorboard]).
    report_to: str = field(
        default="none",
        metadata={
            "help": "none, all, or Accelerate trackers, comma-separated: tensorboard, wandb, ..."
        },
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload output_dir to the Hub (hub_model_id) at the end."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo for push_to_hub, e.g. user/tiny-llama-lora."}
    )
    hub_private_repo: bool = field(
        default=False,
        metadata={"help": "Create the Hub repo private (false: the Hub's default)."},
    )
    supervised_logits_only: bool = field(
        default=True,
        metadata={
            "help": "Run the LM head only at positions whose (shifted) label is supervised "
            "(transformers' logits_to_keep); same loss, less work. false: full logits."
        },
    )
    loss_kernel: str = field(
        default="none",
        metadata={"help": "none, or liger (liger-kernel's fused linear cross-entropy; CUDA)."},
    )
    exact_peak_memory: bool = field(
        default=False,
        metadata={
            "help": "CPU: pin glibc's mmap threshold so the peak RSS follows live tensors "
            "(exact, for the ablation grid and benchmarks; costs step time). Off: the kernel's "
            "high-water mark, allocator-dependent, at no cost."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace another run in output_dir (only the files ftkit wrote for it)."},
    )
    planned_peak_bytes: int = field(
        default=0,
        metadata={
            "help": "Written by `ftkit plan`: the per-device peak it predicted (0: no plan); "
            "metrics.json's `plan` block puts it beside the measured peak."
        },
    )
    planned_step_time_s: float = field(
        default=0.0,
        metadata={
            "help": "Written by `ftkit plan`: the step time it predicted (0: no plan), beside "
            "the measured median step time in metrics.json's `plan` block."
        },
    )
    ddp_timeout: int = field(
        default=1800,
        metadata={
            "help": "Seconds a process waits for the others in a collective before the run "
            "stops with one error line (the process-group timeout, as in the HF Trainer): a "
            "node that stops answering ends the run within this time."
        },
    )

    def __post_init__(self):
        _require(
            self.max_steps == -1 or self.max_steps > 0,
            f"max_steps must be > 0, or -1 to train by epochs, got {self.max_steps}",
        )
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _require(
            self.lr_scheduler_type in scheduler_names(),
            f"lr_scheduler_type={self.lr_scheduler_type!r} is not one of {scheduler_names()}",
        )
        _require(
            self.max_steps > 0 or self.num_train_epochs > 0,
            "set max_steps > 0 or num_train_epochs > 0",
        )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        _require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        _require(self.learning_rate > 0, "learning_rate must be > 0")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        _require(self.save_total_limit >= 1, "save_total_limit must be >= 1")
        _require(self.logging_steps >= 1, f"logging_steps must be >= 1, got {self.logging_steps}")
        _require(self.ddp_timeout >= 1, f"ddp_timeout must be >= 1 second, got {self.ddp_timeout}")
        _require(
            self.planned_peak_bytes >= 0 and self.planned_step_time_s >= 0,
            "planned_peak_bytes and planned_step_time_s must be >= 0 (0: no plan)",
        )
        if self.report_to != REPORT_TO_NONE:
            parse_report_to(self.report_to)  # imports accelerate: only when asked
        if self.push_to_hub or self.hub_model_id:
            check_hub_fields(self.push_to_hub, self.hub_model_id)
        _require(
            self.loss_kernel in ("none", "liger"),
            f"loss_kernel={self.loss_kernel!r} is not one of ('none', 'liger')",
        )


RECIPE_SECTIONS = (ModelConfig, DataConfig, AdapterConfig, TrainConfig)


def scheduler_names() -> list[str]:
    """transformers' scheduler names (``get_scheduler``'s ``name``)."""
    from transformers import SchedulerType

    return [kind.value for kind in SchedulerType]


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """``ceil(ratio * total)``, clamped so at least one step trains with a learning rate > 0.

    Warmup starts at lr 0, so ``total`` steps with ``w >= 1`` warmup steps give ``total - 1``
    steps with lr > 0: with the default ratio a 1-step run would train nothing. The clamp only
    changes such tiny runs, and says so; a ratio meant for long runs is no reason to refuse.
    """
    wanted = math.ceil(warmup_ratio * total_steps)
    if wanted and total_steps == 1:
        logger.warning(
            "warmup_ratio=%s gives %d warmup step(s) of %d: the only step would have learning "
            "rate 0 and train nothing; using no warmup",
            warmup_ratio,
            wanted,
            total_steps,
        )
        return 0
    return min(wanted, total_steps)


_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a module name or a list of them",
}


def _type_problem(value, hint) -> str | None:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint
    base = typing.get_origin(base) or base
    if base not in _TYPE_WORDS:
        return None
    if value is None:
        return None if optional else f"must be {_TYPE_WORDS[base]}, got null"
    plain_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, str) and base in (int, float):  # YAML 1.1 reads 2e-4 as a string
        with contextlib.suppress(ValueError):
            base(value)
            return None
    ok = {
        int: plain_number and isinstance(value, int),
        float: plain_number,
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        list: isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
    }[base]
    return None if ok else f"must be {_TYPE_WORDS[base]}, got {value!r}"


def _check_types(values: dict[str, Any], source: str) -> None:
    """Wrongly typed values (``lora_r: 8.5``, ``lora_alpha: null``) are one line, before loading."""
    hints = {k: v for section in RECIPE_SECTIONS for k, v in typing.get_type_hints(section).items()}
    for key, value in values.items():
        if key in _TRISTATE_FIELDS:  # true/false/auto: a YAML bool is fine, _tristate checks it
            continue
        problem = _type_problem(value, hints.get(key))
        if problem:
            raise ConfigError(f"{key} in {source} {problem}")


@dataclass
class Recipe:
    """Everything one training run needs, grouped by concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """The flat ``field: value`` mapping a recipe YAML holds."""
        flat: dict[str, Any] = {}
        for section in (self.model, self.data, self.adapter, self.train):
            flat.update(dataclasses.asdict(section))
        return flat

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "recipe") -> Recipe:
        """Build from a flat mapping; unknown keys are an error naming the nearest valid ones."""
        _check_known(values, source)
        _check_types(values, source)
        return cls(*HfArgumentParser(RECIPE_SECTIONS).parse_dict(values))


def field_names() -> list[str]:
    return [f.name for section in RECIPE_SECTIONS for f in dataclasses.fields(section)]


def _check_known(keys, source: str) -> None:
    valid = field_names()
    for key in keys:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise ConfigError(
                f"unknown field {key!r} in {source}: {hint}valid fields: {', '.join(valid)}"
            )


class ArgParser(HfArgumentParser):
    """``HfArgumentParser`` whose usage errors are a ``ConfigError``: one ``ftkit error:`` line."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")

    def parse_args_into_dataclasses(self, args=None, **kwargs):
        """As HfArgumentParser's, but a flag no dataclass knows is a ConfigError, not ValueError."""
        *sections, rest = super().parse_args_into_dataclasses(
            args, return_remaining_strings=True, **kwargs
        )
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        return tuple(sections)


def shipped_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe YAML path, or the name of a shipped recipe (``tiny``, ``llama2-7b``, ...)."""
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    return shipped if shipped.is_file() else Path(name_or_path)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"recipe file not found: {path} (pass --config PATH.yaml or a shipped recipe: "
            f"{', '.join(shipped_recipes())})"
        )
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML: {problem}{where}") from err
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path} must hold a mapping of field: value, got {type(values).__name__}"
        )
    return values


def parse_recipe(
    argv: list[str] | None = None,
    default_config: str | Path | None = None,
    prog: str = "ftkit train",
) -> Recipe:
    """``[--config NAME|X.yaml] [--field value ...]`` → Recipe; the command line wins over YAML."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = default_config
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ConfigError("--config needs a recipe: a YAML path or a shipped recipe name")
        config = argv[at + 1]
        del argv[at : at + 2]
    config_path = recipe_path(config) if config else None
    yaml_values = load_yaml(config_path) if config_path else {}
    _check_known(yaml_values, str(config_path))
    _check_types(yaml_values, str(config_path))
    _check_known([f for f in _flag_names(argv) if f != "help"], "the command line")

    parser = ArgParser(RECIPE_SECTIONS, prog=prog, allow_abbrev=False)
    parser.set_defaults(**yaml_values)
    sections = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return Recipe(*sections)


def _flag_names(argv: list[str]) -> list[str]:
    return [arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")]


RESOLVED_CONFIG_NAME = "resolved_config.yaml"  # written beside the adapter by every run


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe; it parses back into the same Recipe."""
    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
