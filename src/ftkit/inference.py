"""Use a trained adapter: load it onto its base, generate, compare with the base, evaluate.

Adapters are told apart by their files, as ``ftkit.lora`` writes them: ``adapter_config.json`` is
PEFT's format (loaded with ``PeftModel.from_pretrained``, whichever LoRA trained it) and
``ftkit_adapter_config.json`` is ftkit's BLOOM q/v-only format (``ftkit.lora.load_adapter``).

Before/after runs use one model: the base runs first, then the adapter is attached to the same
weights, so a 7B base is held once and both formats are handled alike.

Prompts go through the training template (``load_template``) so the model sees what it learned on.
Batches are padded on the LEFT: every row's next token then follows its own last real token, which
is what makes batched greedy decoding equal one-by-one decoding.

Evaluation scores what training scores (loss per supervised response token, training's
tokenisation and masks); without a file it rebuilds the run's own held-out split with training's
code, so its figures can be checked against the run's ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ftkit.config import MODEL_DTYPES, RESOLVED_CONFIG_NAME, ModelConfig, Recipe, load_yaml
from ftkit.data import (
    IGNORE_INDEX,
    build_datasets,
    collator,
    load_records,
    load_template,
    resolve_dataset,
    tokenize_record,
    validate_records,
)
from ftkit.errors import ConfigError, DataError
from ftkit.lora import FTKIT_CONFIG_NAME, PEFT_CONFIG_NAME, AdapterError, load_adapter
from ftkit.metrics import example_losses, perplexity
from ftkit.modeling import load_base_model, load_tokenizer, resolve_model_path

logger = logging.getLogger(__name__)

BASE_LABEL = "base"
TUNED_LABEL = "fine-tuned"
ADAPTER_FORMATS = {PEFT_CONFIG_NAME: "peft", FTKIT_CONFIG_NAME: "ftkit"}


# -- the adapter and its base ---------------------------------------------------------------------


@dataclass
class AdapterArgs:
    """Which adapter to use, on which base, with the base held in which (full-precision) dtype."""

    adapter_dir: str = field(
        metadata={"help": "A training output_dir: a PEFT or ftkit adapter (+ its tokenizer)."}
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model (default: the adapter's base_model_name_or_path)."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": f"dtype of the base weights: {', '.join(MODEL_DTYPES)}."},
    )

    def __post_init__(self):
        if self.dtype not in MODEL_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {MODEL_DTYPES}")


@dataclass(frozen=True)
class Adapter:
    """A saved adapter directory: its format and the base model it was trained on."""

    path: Path
    format: str
    base_model_name_or_path: str | None

    @classmethod
    def read(cls, adapter_dir: str | Path) -> Adapter:
        path = Path(adapter_dir)
        if not path.is_dir():
            raise AdapterError(
                f"adapter directory not found: {path} (pass --adapter_dir the output_dir of a "
                "training run)"
            )
        for config_name, adapter_format in ADAPTER_FORMATS.items():
            config_path = path / config_name
            if config_path.is_file():
                try:
                    config = json.loads(config_path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as err:
                    raise AdapterError(f"cannot read {config_path}: {err}") from err
                return cls(path, adapter_format, config.get("base_model_name_or_path"))
        raise AdapterError(
            f"{path} holds neither {PEFT_CONFIG_NAME} nor {FTKIT_CONFIG_NAME}: it is no saved "
            "adapter (a full fine-tune is a model: load it with from_pretrained)"
        )

    def base_for(self, base_model: str | None) -> str:
        """The base given on the command line, else the one recorded at training time."""
        if base_model:
            return base_model
        base = self.base_model_name_or_path
        if not base:
            raise ConfigError(f"{self.path} does not name its base model; pass --base_model")
        if Path(base).is_absolute() and not Path(base).exists():  # e.g. trained on another machine
            raise AdapterError(
                f"{self.path} was trained on {base}, which does not exist here; pass --base_model "
                "the same base model (a local dir or Hub id)"
            )
        return base

    @property
    def tokenizer_path(self) -> Path | None:
        """Training saves its tokenizer beside the adapter; that one matches the training data."""
        return self.path if (self.path / "tokenizer_config.json").is_file() else None


@dataclass
class LoadedBase:
    """A base model in eval mode, the tokenizer to use with it, and the adapter to attach."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    base: str


def load_base(args: AdapterArgs, device: torch.device | str | None = None) -> LoadedBase:
    """Read the adapter dir (cheap checks first), then load its base and tokenizer."""
    adapter = Adapter.read(args.adapter_dir)
    base = adapter.base_for(args.base_model)
    model = load_base_model(ModelConfig(model_name_or_path=base, model_dtype=args.dtype))
    model.config.use_cache = True  # load_base_model turns it off for training
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    tokenizer = load_tokenizer(str(adapter.tokenizer_path or resolve_model_path(base)))
    return LoadedBase(model, tokenizer, adapter, base)


def attach_adapter(loaded: LoadedBase) -> torch.nn.Module:
    """The fine-tuned model (eval mode); a failure names the adapter's base and the model given."""
    adapter = loaded.adapter
    try:
        if adapter.format == "peft":
            from peft import PeftModel

            model = PeftModel.from_pretrained(loaded.model, adapter.path)
        else:
            load_adapter(loaded.model, adapter.path)
            model = loaded.model
    # PEFT raises RuntimeError (size mismatch) or ValueError (no target); ftkit an AdapterError.
    except (RuntimeError, ValueError) as err:
        # PEFT puts each mismatched tensor on a line of its own: the first one says it all.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = " ".join(lines[:2]).rstrip(".")
        own_base = adapter.base_model_name_or_path
        hint = "" if loaded.base == own_base else " (leave out --base_model to use its own base)"
        raise AdapterError(
            f"cannot load adapter {adapter.path}, trained on {own_base!r}, onto the model given, "
            f"{loaded.base!r}: {cause}{hint}"
        ) from err
    return model.eval()


# -- prompts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One instruction (+ optional input); ``reference`` is the dataset's answer, if any."""

    instruction: str
    input: str = ""
    reference: str | None = None

    def text(self) -> str:
        return load_template().format(self.instruction, self.input)


@dataclass
class PromptArgs:
    """Where the prompts come from: exactly one of instruction, prompts_file, dataset."""

    instruction: str | None = field(default=None, metadata={"help": "One instruction."})
    input: str = field(default="", metadata={"help": "Optional input for --instruction."})
    prompts_file: str | None = field(
        default=None,
        metadata={"help": "One instruction per line, or (.json) a list of strings or objects."},
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Alpaca .json/.jsonl file (or Hub id): its instructions."}
    )
    num_samples: int = field(default=5, metadata={"help": "First N --dataset records (0 = all)."})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Skip malformed --dataset records instead of failing."}
    )

    def __post_init__(self):
        given = [self.instruction, self.prompts_file, self.dataset]
        if sum(source is not None for source in given) != 1:
            raise ConfigError("give exactly one of --instruction, --prompts_file, --dataset")
        if self.input and self.instruction is None:
            raise ConfigError("--input goes with --instruction")
        if self.num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {self.num_samples}")


def load_prompts(args: PromptArgs) -> list[Prompt]:
    if args.instruction is not None:
        return [Prompt(args.instruction, args.input)]
    if args.prompts_file is not None:
        return read_prompts_file(args.prompts_file)
    records = load_records(args.dataset, num_samples=args.num_samples)
    records = validate_records(records, resolve_dataset(args.dataset), args.skip_bad_records)
    return [Prompt(r["instruction"], r["input"], r["output"]) for r in records]


def read_prompts_file(path: str | Path) -> list[Prompt]:
    """One instruction per line; a `.json` file: a list of strings or {"instruction", "input"}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"prompts file not found: {path} (pass --prompts_file a text file with one instruction "
            "per line, or a .json list)"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        prompts = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(items, list):
            raise DataError(f"{path} must hold a JSON list, got {type(items).__name__}")
        prompts = [_prompt_from_item(item, index, path) for index, item in enumerate(items)]
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


def _prompt_from_item(item, index: int, path: Path) -> Prompt:
    if isinstance(item, str) and item.strip():
        return Prompt(item)
    if (
        isinstance(item, dict)
        and isinstance(item.get("instruction"), str)
        and item["instruction"].strip()
        and isinstance(item.get("input", ""), str)
    ):
        return Prompt(item["instruction"], item.get("input", ""))
    raise DataError(
        f"item {index} of {path} is neither a non-empty string nor an object with a string "
        "'instruction' (and optional string 'input')"
    )


# -- generation -----------------------------------------------------------------------------------


@dataclass
class GenerationOptions:
    """Decoding settings; greedy unless ``do_sample``."""

    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep this mass."})
    seed: int = field(default=42, metadata={"help": "Seed for sampling."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def describe(self) -> str:
        decoding = (
            f"sampling (temperature {self.temperature}, top_p {self.top_p}, seed {self.seed})"
            if self.do_sample
            else "greedy"
        )
        return f"{decoding}, max_new_tokens {self.max_new_tokens}"

    def generation_config(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        # top_k=0: no hidden top-k cut (transformers would fill in 50); temperature and top_p rule.
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **(sampling if self.do_sample else {}),
        )


@dataclass(frozen=True)
class Completion:
    """The new tokens of one prompt, cut before the first EOS, and their text."""

    text: str
    token_ids: tuple[int, ...]
    stopped_at_eos: bool

    def shown(self) -> str:
        """The text for a reader; an empty answer is marked so that it is not mistaken for a gap."""
        return self.text if self.token_ids else "(empty: EOS came first)"


@torch.no_grad()
def generate(
    model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], options: GenerationOptions
) -> list[Completion]:
    """Complete each prompt text; only the new tokens are decoded (the prompt is not echoed)."""
    config = options.generation_config(tokenizer)
    torch.manual_seed(options.seed)  # sampling draws from torch only
    device = next(model.parameters()).device
    completions = []
    for start in range(0, len(prompts), options.batch_size):
        batch = tokenizer(
            list(prompts[start : start + options.batch_size]),
            return_tensors="pt",
            padding=True,
            padding_side="left",
        ).to(device)
        output = model.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
        completions += [_completion(ids, tokenizer) for ids in new_tokens]
    return completions


def _completion(new_ids: list[int], tokenizer: PreTrainedTokenizerBase) -> Completion:
    # Rows that finished early are padded after their EOS; everything from the EOS on is dropped.
    stopped = tokenizer.eos_token_id in new_ids
    if stopped:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return Completion(text, tuple(new_ids), stopped)


def generate_before_after(
    args: AdapterArgs,
    prompts: Sequence[Prompt],
    options: GenerationOptions,
    compare_base: bool = False,
) -> BeforeAfter:
    """The fine-tuned model's answers and, with ``compare_base``, first the base's alone."""
    loaded = load_base(args)
    texts = [prompt.text() for prompt in prompts]
    columns = {}
    if compare_base:
        columns[BASE_LABEL] = generate(loaded.model, loaded.tokenizer, texts, options)
    columns[TUNED_LABEL] = generate(attach_adapter(loaded), loaded.tokenizer, texts, options)
    return BeforeAfter(list(prompts), columns, loaded.adapter.path, loaded.base, options)


@dataclass
class BeforeAfter:
    """Each model's answers to the same prompts, and what produced them."""

    prompts: list[Prompt]
    columns: dict[str, list[Completion]]
    adapter_dir: Path
    base: str
    options: GenerationOptions

    def console(self) -> str:
        """A lone fine-tuned answer as is (scriptable); otherwise each prompt with its answers."""
        if len(self.prompts) == 1 and len(self.columns) == 1:
            return self.columns[TUNED_LABEL][0].text
        blocks = []
        for index, prompt in enumerate(self.prompts):
            lines = [f"=== [{index + 1}/{len(self.prompts)}] {prompt.instruction}"]
            if prompt.input:
                lines.append(f"--- input: {prompt.input}")
            for label, completions in self.columns.items():
                lines += [f"--- {label}:", completions[index].shown()]
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def markdown(self) -> str:
        """One table row per prompt: the prompt, each model's answer, the reference if known."""
        with_reference = any(prompt.reference is not None for prompt in self.prompts)
        header = ["#", "prompt", *self.columns, *(["reference"] if with_reference else [])]
        caption = f"adapter `{self.adapter_dir}` on base `{self.base}`; {self.options.describe()}"
        lines = ["# Before / after fine-tuning", "", caption, ""]
        lines += [_row(header), _row(["---"] * len(header))]
        for index, prompt in enumerate(self.prompts):
            cell = prompt.instruction + (f"\n\ninput: {prompt.input}" if prompt.input else "")
            answers = [completions[index].shown() for completions in self.columns.values()]
            reference = [prompt.reference or ""] if with_reference else []
            lines.append(_row([str(index + 1), cell, *answers, *reference]))
        return "\n".join(lines) + "\n"


def _row(cells: Sequence[str]) -> str:
    # Every line break str.splitlines knows (\r, \u2028, ...) would end the table row: use <br>.
    escaped = ["<br>".join(cell.replace("|", "\\|").strip().splitlines()) for cell in cells]
    return "| " + " | ".join(escaped) + " |"


# -- evaluation -----------------------------------------------------------------------------------


@dataclass
class EvalArgs:
    """What to score per supervised response token, as training does: a file, or the run's split."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Held-out Alpaca .json/.jsonl file (or Hub id). Default: the training run's "
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


def held_out_examples(recipe: Recipe, tokenizer) -> list[dict]:
    """The run's held-out split, rebuilt (split, tokenised, filtered) by training's own code."""
    return build_datasets(recipe.data, tokenizer, recipe.train.seed).eval.to_list()


def tokenize_examples(records: Sequence[dict], tokenizer, max_length: int) -> list[dict]:
    """Training's tokenisation and label masks, less records whose prompt fills max_length."""
    template = load_template()
    examples = [tokenize_record(r, tokenizer, max_length, template=template) for r in records]
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
def evaluate_loss(model, tokenizer, examples: Sequence[dict], batch_size: int) -> dict:
    """Mean cross-entropy per supervised token over tokenised examples, and its perplexity."""
    pad = collator(tokenizer)
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad(list(examples[start : start + batch_size])).to(device)
        sums, counts = example_losses(model, batch)
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
        examples_for = partial(held_out_examples, run_recipe(adapter.path))
    else:
        dataset = eval_args.dataset
        records = load_records(dataset, num_samples=eval_args.num_samples)
        records = validate_records(records, resolve_dataset(dataset), eval_args.skip_bad_records)
        examples_for = partial(tokenize_examples, records, max_length=eval_args.max_length)
    loaded = load_base(args)
    score = (loaded.tokenizer, examples_for(tokenizer=loaded.tokenizer), eval_args.batch_size)
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
