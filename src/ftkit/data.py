"""Alpaca-format instruction data: load, validate, template, tokenise with exact label masks.

Label policy (tested in tests/test_data.py):
- prompt tokens (BOS + template + instruction [+ input]) get label -100 unless ``train_on_inputs``;
- the response is followed by EOS, and EOS is always supervised, so the model learns to stop;
- prompt and response are tokenised separately and concatenated, so the mask boundary is exact and
  decoding the supervised labels gives exactly ``response + eos_token``;
- truncation to ``max_length`` cuts the *end*: a truncated example loses its EOS (we never teach the
  model to stop mid-answer); a record whose prompt alone fills ``max_length`` is dropped and counted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from datasets import Dataset, load_dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from ftkit.config import EMBEDDED_DATASET, DataConfig
from ftkit.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ALPACA_FIELDS = ("instruction", "input", "output")
LOCAL_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template kept as data (``src/ftkit/templates/<name>.json``)."""

    prompt_input: str
    prompt_no_input: str

    def format(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)


@cache
def load_template(name: str = "alpaca") -> PromptTemplate:
    path = resources.files("ftkit") / "templates" / f"{name}.json"
    if not path.is_file():
        raise DataError(f"unknown prompt template {name!r}: no {path}")
    spec = json.loads(path.read_text(encoding="utf-8"))
    return PromptTemplate(spec["prompt_input"], spec["prompt_no_input"])


def resolve_dataset(dataset: str) -> str:
    if dataset == EMBEDDED_DATASET:
        from ftkit.embedded import embedded_dataset_path

        return str(embedded_dataset_path())
    return dataset


def load_records(dataset: str, split: str = "train", num_samples: int = 0) -> list[dict]:
    """Raw records from a local .json/.jsonl file or a Hub dataset id (first ``num_samples``)."""
    source = resolve_dataset(dataset)
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        records = _read_local(path)
    else:
        try:
            records = load_dataset(source, split=split).to_list()
        except Exception as exc:  # datasets raises many types; the user needs one message
            raise DataError(
                f"could not load dataset {source!r} from the Hub ({exc.__class__.__name__}: {exc}); "
                "pass a local .json/.jsonl file with --dataset PATH"
            ) from exc
    if not records:
        raise DataError(f"dataset {source!r} holds no records; expected a list of Alpaca records")
    return records[:num_samples] if num_samples else records


def _read_local(path: Path) -> list[dict]:
    # Parsed with the stdlib, not datasets' Arrow reader: validation must see the raw records to
    # name the exact bad index (Arrow would coerce a missing key to null or fail on mixed types).
    if not path.is_file():
        raise DataError(f"dataset file not found: {path} (pass --dataset a .json/.jsonl file)")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"dataset file is empty: {path}")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
    return records


def record_problem(record) -> str | None:
    """Why a record is not a usable Alpaca record, or None if it is."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object with {ALPACA_FIELDS}"
    for key in ALPACA_FIELDS:
        if key not in record:
            return f"is missing the key {key!r}"
        if not isinstance(record[key], str):
            return f"has a non-string {key!r} ({type(record[key]).__name__})"
    if not record["instruction"].strip():
        return "has an empty 'instruction'"
    if not record["output"].strip():
        return "has an empty 'output'"
    return None


def validate_records(records: list, source: str, skip_bad: bool = False) -> list[dict]:
    """Fail on the first bad record (naming its index), or drop bad records with a logged count."""
    good, skipped = [], []
    for index, record in enumerate(records):
        problem = record_problem(record)
        if problem is None:
            good.append({key: record[key] for key in ALPACA_FIELDS})
        elif skip_bad:
            skipped.append(index)
        else:
            raise DataError(
                f"record {index} of {source} {problem}; fix it or pass --skip_bad_records true"
            )
    if skipped:
        logger.warning("skipped %d malformed records of %s: %s", len(skipped), source, skipped[:20])
    if not good:
        raise DataError(f"no usable records in {source}")
    return good


def tokenize_record(
    record: dict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on_inputs: bool = False,
    template: PromptTemplate | None = None,
) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels for one record (see the module docstring for the policy)."""
    template = template or load_template()
    prompt = template.format(record["instruction"], record["input"])
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids + [tokenizer.eos_token_id])[:max_length]
    n_prompt = min(len(prompt_ids), len(input_ids))
    labels = (
        list(input_ids) if train_on_inputs else [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
    )
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


ADDED_PAD_TOKEN = "<|pad|>"  # added (and the embeddings resized) only when nothing else fits


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad id distinct from EOS; never pad with EOS.

    Padding with EOS would make the collator's attention mask and any pad-based masking swallow the
    real EOS, and the model would never learn to stop. In order:

    1. a pad token that is not EOS is kept;
    2. ``<unk>`` (LLaMA-2, Mistral): never produced for text the model sees, no resize needed;
    3. a reserved special token of the vocabulary (``pad_token_candidates``: a token named like a
       pad, e.g. Llama-3.1's ``<|finetune_right_pad_id|>``; Qwen's ``<|endoftext|>`` when it is
       not EOS; Llama-3's ``<|reserved_special_token_N|>``), no resize needed;
    4. otherwise ``<|pad|>`` is added: the tokenizer grows by one and
       ``ftkit.modeling.fit_embeddings`` resizes the model to match (new row = mean of the others).
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = tokenizer.unk_token
        return tokenizer
    candidates = pad_token_candidates(tokenizer)
    if candidates:
        tokenizer.pad_token = candidates[0]
        logger.info("padding with the tokenizer's reserved special token %s", candidates[0])
        return tokenizer
    tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
    logger.warning(
        "the tokenizer has no pad, no <unk> and no reserved special token: added %s (id %d); the "
        "model's embeddings are resized to %d rows, the new one the mean of the others",
        ADDED_PAD_TOKEN,
        tokenizer.pad_token_id,
        len(tokenizer),
    )
    return tokenizer


def pad_token_candidates(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Special tokens already in the vocabulary that nothing else uses, best pad first.

    EOS, BOS and every token the chat template writes (``<|im_end|>``, ``<|eot_id|>``...) are
    excluded: padding with a token the model must learn to produce or read would teach it wrong.
    """
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    used = {tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token}
    special = [
        (index, token.content)
        for index, token in sorted(tokenizer.added_tokens_decoder.items())
        if token.special and token.content not in used and token.content not in template
    ]

    def rank(item):
        index, content = item
        name = content.lower()
        if "pad" in name:
            return (0, index)
        if content == "<|endoftext|>":
            return (1, index)
        if "reserved" in name:
            return (2, index)
        return None

    ranked = sorted((rank(item), item[1]) for item in special if rank(item) is not None)
    return [content for _, content in ranked]


@dataclass
class InstructionData:
    train: Dataset
    eval: Dataset
    dropped_too_long: int


def build_datasets(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> InstructionData:
    """Load, validate, split and tokenise; the split is seeded so every process sees the same one."""
    source = resolve_dataset(cfg.dataset)
    records = validate_records(
        load_records(cfg.dataset, cfg.dataset_split, cfg.num_samples), source, cfg.skip_bad_records
    )
    records = Dataset.from_list(records)
    n_eval = _eval_count(cfg.validation_size, len(records))
    if n_eval:
        split = records.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, held_out = split["train"], split["test"]
    else:
        train, held_out = records, records.select([])
    template = load_template()

    def tokenize(record):
        return tokenize_record(record, tokenizer, cfg.max_length, cfg.train_on_inputs, template)

    def fits(example):
        return any(label != IGNORE_INDEX for label in example["labels"])

    tokenized = []
    dropped = 0
    for part in (train, held_out):
        part = part.map(tokenize, remove_columns=list(ALPACA_FIELDS))
        kept = part.filter(fits)
        dropped += len(part) - len(kept)
        tokenized.append(kept)
    if dropped:
        logger.warning(
            "dropped %d records whose prompt fills max_length=%d", dropped, cfg.max_length
        )
    if len(tokenized[0]) == 0:
        raise DataError(f"no training records left from {source}; raise max_length or num_samples")
    return InstructionData(tokenized[0], tokenized[1], dropped)


def _eval_count(validation_size: float, n_records: int) -> int:
    n_eval = int(validation_size) if validation_size >= 1 else round(validation_size * n_records)
    if n_eval >= n_records:
        raise DataError(
            f"validation_size={validation_size} leaves no training records out of {n_records}"
        )
    return n_eval


def collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Dynamic per-batch padding: pad ids + attention 0 for inputs, -100 for labels."""
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
