"""Score base vs fine-tuned on held-out data, per supervised token, exactly as training scores.

Evaluation uses training's tokenisation and masks; without a file it rebuilds the run's own
held-out split with training's code, so its figures can be checked against the run's
``metrics.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ftkit.adapters import (
    BASE_LABEL,
    TUNED_LABEL,
    Adapter,
    AdapterArgs,
    attach_adapter,
    load_base,
)
from ftkit.config import RESOLVED_CONFIG_NAME, Recipe, load_yaml
from ftkit.data import (
    CHAT_FORMATS,
    IGNORE_INDEX,
    build_datasets,
    collator,
    detect_format,
    ensure_chat_template,
    load_records,
    load_template,
    resolve_dataset,
    tokenize_example,
    validate_records,
)
from ftkit.errors import ConfigError, DataError
from ftkit.metrics import example_losses, perplexity, use_supervised_logits

logger = logging.getLogger(__name__)


@dataclass
class EvalArgs:
    """What to score per supervised response token, as training does: a file, or the run's split."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Held-out data in any data format (file, datasets dir or Hub id). Default: the "
            "training run's "
            f"own held-out split, rebuilt from its {RESOLVED_CONFIG_NAME}."
        },
    )
    num_samples: int = field(default=0, metadata={"help": "With --dataset: first N records."})
    max_length: int = field(
        default=256, metadata={"help": "With --dataset: truncate prompt+response to N tokens."}
    )
    batch_size: int = field(default=8, metadata={"help": "Records per forward pass."})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "With --dataset: skip malformed records, don't fail."}
    )
    supervised_logits_only: bool = field(
        default=True,
        metadata={
            "help": "Run the LM head only at supervised positions, as training does: the same "
            "loss, less work (false: full logits)."
        },
    )
    allow_changed_split: bool = field(
        default=False,
        metadata={
            "help": "Without --dataset: score the rebuilt split even if the data changed since "
            "training (warns: its records may have been trained on)."
        },
    )

    def __post_init__(self):
        if self.num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {self.num_samples}")
        if self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8, got {self.max_length}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def run_recipe(run_dir: Path) -> Recipe:
    """The training run's resolved recipe, which fixes its held-out split (dataset, size, seed)."""
    path = run_dir / RESOLVED_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            f"{path} not found, so the run's held-out split is unknown; pass --dataset"
        )
    recipe = Recipe.from_dict(load_yaml(path), str(path))
    if recipe.data.validation_size == 0:
        raise ConfigError(
            f"the run in {run_dir} held out no records (validation_size 0); pass --dataset"
        )
    return recipe


def held_out_examples(
    recipe: Recipe, tokenizer, run_dir: Path | None = None, allow_changed: bool = False
) -> list[dict]:
    """The run's held-out split, rebuilt (split, tokenised, filtered) by training's own code.

    With ``run_dir``, checked against the split identity the run recorded (``ftkit_run.json``).
    """
    data = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    if run_dir is not None:
        from ftkit.rundir import check_split

        check_split(run_dir, data, allow_changed)
    return data.eval.to_list()


def tokenize_examples(
    records: Sequence[dict], tokenizer, max_length: int, data_format: str = "alpaca"
) -> list[dict]:
    """Training's tokenisation and label masks, less records whose prompt fills max_length.

    ``records`` are canonical (``validate_records``); chat records use the run's chat template.
    """
    template = load_template()
    if data_format in CHAT_FORMATS:
        ensure_chat_template(tokenizer)  # the run's own one if it has one
        data_format = "messages"
    examples = [
        tokenize_example(r, tokenizer, max_length, data_format=data_format, template=template)
        for r in records
    ]
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    if not kept:
        raise DataError(f"every record's prompt fills max_length={max_length}; raise it")
    if len(kept) < len(examples):
        logger.warning(
            "not scored: %d records whose prompt fills max_length=%d",
            len(examples) - len(kept),
            max_length,
        )
    return kept


@torch.no_grad()
def evaluate_loss(
    model, tokenizer, examples: Sequence[dict], batch_size: int, supervised_logits_only: bool = True
) -> dict:
    """Mean cross-entropy per supervised token over tokenised examples, and its perplexity."""
    supervised_logits_only = use_supervised_logits(supervised_logits_only, model)
    pad = collator(tokenizer)
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad(list(examples[start : start + batch_size])).to(device)
        sums, counts = example_losses(model, batch, supervised_logits_only)
        loss_sum += float(sums.sum())
        tokens += int(counts.sum())  # >= 1: every example supervises a response token
    loss = loss_sum / tokens
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "tokens": tokens,
        "records": len(examples),
    }


def evaluate_before_after(args: AdapterArgs, eval_args: EvalArgs) -> EvalReport:
    """Base, then fine-tuned, on the same examples; the data is checked before any model loads."""
    adapter = Adapter.read(args.adapter_dir)
    if eval_args.dataset is None:
        dataset = f"the held-out split of {adapter.path}"
        examples_for = partial(
            held_out_examples,
            run_recipe(adapter.path),
            run_dir=adapter.path,
            allow_changed=eval_args.allow_changed_split,
        )
    else:
        dataset = eval_args.dataset
        records = load_records(dataset, num_samples=eval_args.num_samples)
        source = resolve_dataset(dataset)
        data_format = detect_format(records, source)  # the file's own format, logged
        records = validate_records(records, source, eval_args.skip_bad_records, data_format)
        examples_for = partial(
            tokenize_examples, records, max_length=eval_args.max_length, data_format=data_format
        )
    loaded = load_base(args, adapter=adapter)
    examples = examples_for(tokenizer=loaded.tokenizer)
    score = (loaded.tokenizer, examples, eval_args.batch_size, eval_args.supervised_logits_only)
    base = evaluate_loss(loaded.model, *score)
    tuned = evaluate_loss(attach_adapter(loaded), *score)
    results = {BASE_LABEL: base, TUNED_LABEL: tuned}
    return EvalReport(str(adapter.path), loaded.base, dataset, results)


@dataclass
class EvalReport:
    """Loss and perplexity per model, and what was scored."""

    adapter_dir: str
    base_model: str
    dataset: str
    results: dict[str, dict]

    def table(self) -> str:
        records = next(iter(self.results.values()))["records"]
        rows = [f"{records} records of {self.dataset}, per supervised token:", ""]
        rows += ["| model | loss | perplexity | tokens |", "|---|---:|---:|---:|"]
        rows += [
            f"| {label} | {m['loss']:.4f} | {m['perplexity']:.3f} | {m['tokens']} |"
            for label, m in self.results.items()
        ]
        return "\n".join(rows)
