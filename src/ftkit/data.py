"""Instruction data: load, validate, template, tokenise with exact label masks, cache the tokens.

Label policy (tested in tests/test_data.py):
- prompt tokens (BOS + template + instruction [+ input]) get label -100 unless ``train_on_inputs``;
- the response is followed by EOS, and EOS is always supervised, so the model learns to stop;
- prompt and response are tokenised separately and concatenated, so the mask boundary is exact and
  decoding the supervised labels gives exactly ``response + eos_token``;
- truncation to ``max_length`` cuts the *end*: a truncated example loses its EOS (we never teach the
  model to stop mid-answer); a record whose prompt alone fills ``max_length`` is dropped and counted.

At scale (tested in tests/test_data_scale.py): records are streamed from the source, never held as
one list; the tokens are built once per key in batches, in ``num_proc`` processes, into Arrow
files under ``$FTKIT_HOME/tokenised`` that later starts (and the other processes of a DDP run)
memory-map instead of tokenising again.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from itertools import islice
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, load_dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from ftkit.config import DATA_FORMATS, EMBEDDED_DATASET, DataConfig  # noqa: F401 (re-export)
from ftkit.errors import DataError
from ftkit.io import atomic_dir, atomic_write_json

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
    """Raw records (the first ``num_samples``) as a list, for callers that need them all at once
    (generation, evaluation); training streams them (``iter_records``)."""
    records = list(islice(iter_records(dataset, split), num_samples or None))
    if not records:
        raise DataError(f"dataset {resolve_dataset(dataset)!r} holds no records")
    return records


def iter_records(dataset: str, split: str = "train") -> Iterator:
    """Raw records one at a time, from a file, a ``datasets`` directory or a Hub id.

    Sources: ``.json`` (a list of records) and ``.jsonl`` parsed record by record as written, so
    that validation sees the raw records (Arrow's JSON reader would turn a missing key into null
    and fail on mixed types without naming the record) and a broken line is reported by its line
    number; ``.parquet``, ``.csv`` and ``.arrow`` files through ``datasets``; a directory written
    by ``save_to_disk`` through ``load_from_disk``; any other directory (a Hub-style folder of
    data files) and Hub ids through ``load_dataset``. ``datasets`` sources are read a batch at a
    time from their memory-mapped Arrow files: nothing holds the whole dataset as Python objects.
    A missing path fails here; a file's own problems when its records are read.
    """
    source = resolve_dataset(dataset)
    path = _local_path(source)
    if path is not None and path.suffix in LOCAL_SUFFIXES:
        return _read_local(path)
    return _rows(_load_with_datasets(source, path, split))


DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
ROWS_PER_BATCH = 1000  # rows read, validated or tokenised at a time


def _local_path(source: str) -> Path | None:
    """The file or directory ``source`` names (it must exist), or None for a Hub id."""
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES or path.suffix in DATASETS_SUFFIXES:
        if not path.is_file():
            raise DataError(f"dataset file not found: {path} (pass --dataset an existing file)")
        return path
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(
            f"dataset file not found or of an unknown kind: {path} (pass --dataset a .json, "
            ".jsonl, .parquet, .csv or .arrow file, a datasets directory or a Hub id)"
        )
    return None


def _load_with_datasets(source: str, path: Path | None, split: str) -> Dataset:
    if path is None:
        return _via_datasets(source, lambda: load_dataset(source, split=split), hub=True)
    if path.is_dir():
        return _read_directory(path, split)
    builder = DATASETS_SUFFIXES[path.suffix]
    kwargs = _csv_as_text(path) if builder == "csv" else {}
    return _via_datasets(
        source, lambda: load_dataset(builder, data_files=str(path), split="train", **kwargs)
    )


def _rows(dataset: Dataset) -> Iterator[dict]:
    """A dataset's rows as dicts, read ``ROWS_PER_BATCH`` at a time."""
    for batch in dataset.iter(batch_size=ROWS_PER_BATCH):
        columns = list(batch)
        for values in zip(*batch.values(), strict=True):
            yield dict(zip(columns, values, strict=True))


def _csv_as_text(path: Path) -> dict:
    """CSV cells are text: every column read as a string, empty cells as "" (not null or 3)."""
    import csv

    from datasets import Features, Value

    with path.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    return {
        "features": Features({name: Value("string") for name in header}),
        "keep_default_na": False,
    }


def _via_datasets(source: str, load, hub: bool = False) -> Dataset:
    try:
        return load()
    except Exception as exc:  # datasets raises many types; the user needs one message
        where = "from the Hub" if hub else "with datasets"
        raise DataError(
            f"could not load dataset {source!r} {where} ({exc.__class__.__name__}: {exc}); pass "
            "--dataset a .json/.jsonl/.parquet/.csv file, a datasets directory or a Hub id"
        ) from exc


def _read_directory(path: Path, split: str) -> Dataset:
    """``save_to_disk`` output (Dataset or DatasetDict) or a Hub-style folder of data files."""
    from datasets import DatasetDict, load_from_disk

    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            loaded = load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"could not load the saved dataset {path}: {exc}") from exc
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"{path} holds the splits {list(loaded)}, not {split!r}; pass --dataset_split"
                )
            loaded = loaded[split]
        return loaded
    return _via_datasets(str(path), lambda: load_dataset(str(path), split=split))


def _read_local(path: Path) -> Iterator:
    """The records of a ``.json`` list or a ``.jsonl`` file, parsed one at a time.

    Parsed with the stdlib, not datasets' Arrow reader: validation must see the raw records to
    name the exact bad index (Arrow would coerce a missing key to null or fail on mixed types).
    """
    try:
        with path.open(encoding="utf-8") as fh:
            if path.suffix == ".jsonl":
                yield from _jsonl_records(fh, path)
            else:
                yield from _json_list_records(fh, path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); is it really {path.suffix}?") from exc


def _jsonl_records(fh, path: Path) -> Iterator:
    empty = True
    for number, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        empty = False
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); "
                "a .jsonl file holds one JSON record per line"
            ) from exc
        yield record
    if empty:
        raise DataError(f"dataset file is empty: {path}")


def _json_list_records(fh, path: Path) -> Iterator:
    reader = _JsonListReader(fh, path)
    first = reader.next_char()
    if not first:
        raise DataError(f"dataset file is empty: {path}")
    if first != "[":  # not a list, so an error either way: json's own message for it
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from exc
        raise DataError(f"{path} must hold a JSON list of records, got {type(value).__name__}")
    reader.pos += 1
    if reader.next_char() != "]":
        while True:
            yield reader.value()
            separator = reader.next_char()
            if separator == "]":
                break
            if separator != ",":
                raise reader.error("Expecting ',' delimiter")
            reader.pos += 1
            reader.next_char()
    reader.pos += 1
    if reader.next_char():
        raise reader.error("Extra data")


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
CHUNK_CHARS = 1 << 20


class _JsonListReader:
    """The items of a top-level JSON list, decoded one at a time from a text file.

    Written by hand because nothing streams a top-level JSON list: ``json.load`` and datasets'
    JSON builder hold the whole file as Python objects (several times its size). The text is
    read a chunk at a time and each item decoded by the stdlib (``raw_decode``); an item the
    chunk cuts, or that ends exactly at its end (a number may go on), is decoded again once the
    next chunk is in. Error positions are the file's, as ``json.loads`` would give them.
    """

    def __init__(self, fh, path: Path):
        self.fh, self.path = fh, path
        self.decoder = json.JSONDecoder()
        self.text, self.pos, self.eof = "", 0, False
        # Where self.text starts in the file: characters, newlines, and its column there.
        self.offset, self.lines, self.column = 0, 0, 0

    def refill(self) -> bool:
        """Drop the text before ``pos`` and read the next chunk; False at the end of the file."""
        chunk = "" if self.eof else self.fh.read(CHUNK_CHARS)
        if not chunk:
            self.eof = True
            return False
        dropped = self.text[: self.pos]
        newline = dropped.rfind("\n")
        self.column = len(dropped) - newline - 1 if newline >= 0 else self.column + len(dropped)
        self.offset += len(dropped)
        self.lines += dropped.count("\n")
        self.text, self.pos = self.text[self.pos :] + chunk, 0
        return True

    def next_char(self) -> str:
        """The next character after whitespace (not consumed); "" at the end of the file."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self.refill():
                return self.text[self.pos : self.pos + 1]

    def value(self):
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                if self.refill():
                    continue
                raise self.error(exc.msg, exc.pos) from exc
            if end < len(self.text) or not self.refill():
                self.pos = end
                return value

    def error(self, message: str, pos: int | None = None) -> DataError:
        """``json.loads``'s message for a problem at ``pos`` of the text (default: here)."""
        pos = self.pos if pos is None else pos
        newline = self.text.rfind("\n", 0, pos)
        column = pos - newline if newline >= 0 else self.column + pos + 1
        line = self.lines + self.text.count("\n", 0, pos) + 1
        where = f"line {line} column {column} (char {self.offset + pos})"
        return DataError(f"{self.path} is not valid JSON: {message}: {where}")


# -- formats --------------------------------------------------------------------------------------

CHAT_FORMATS = ("messages", "sharegpt")
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
SHAREGPT_ROLES["assistant"] = "assistant"
TOOL_ROLES = ("tool", "function", "function_call", "observation", "tool_call", "ipython")
# The keys that identify each format, in detection order (the first record that has one decides).
FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
DETECTION_WINDOW = 10  # records looked at by auto-detection

# The template a tokenizer without one gets for chat data (docs/data.md, "Data formats"): ChatML's
# layout with plain-text role markers, and the tokenizer's own EOS as the end-of-turn token, so no
# token is added and generation stops where training taught it to. It is set on the tokenizer,
# which the run saves (tokenizer_config.json / chat_template.jinja), so generation, evaluation and
# the merged model all use this same template.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def alpaca_chat_template() -> str:
    """A chat template that renders user turns with the Alpaca prompt (``prompt_no_input``).

    Given to the merged model of an alpaca run whose tokenizer has no template, so that chat-style
    calls (``pipeline`` with messages, ``apply_chat_template``) prompt it the way it was trained;
    system turns are dropped (the Alpaca prompt has its own preamble).
    """
    template = load_template().prompt_no_input
    before, after = template.split("{instruction}")
    return (
        "{% if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
        "{% for message in messages %}"
        f"{{% if message['role'] == 'user' %}}{{{{ {json.dumps(before)} + message['content'] + "
        f"{json.dumps(after)} }}}}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    )


def run_data_format(run_dir) -> str:
    """The data format a training run used, from its resolved_config.yaml (alpaca if unknown)."""
    from ftkit.config import RESOLVED_CONFIG_NAME, load_yaml

    path = Path(run_dir) / RESOLVED_CONFIG_NAME
    if not path.is_file():
        return "alpaca"  # runs from before data formats were recorded trained on Alpaca
    data_format = load_yaml(path).get("data_format", "alpaca")
    return "alpaca" if data_format == "auto" else data_format


def detect_format(records: list, source: str) -> str:
    """The format of ``records`` from the keys of the first records; logged."""
    for index, record in enumerate(records[:DETECTION_WINDOW]):
        if not isinstance(record, dict):
            continue
        for data_format, keys in FORMAT_KEYS.items():
            if all(key in record for key in keys):
                logger.info(
                    "data_format auto: %s records in %s (record %d has %s)",
                    data_format,
                    source,
                    index,
                    list(keys),
                )
                return data_format
    expected = "; ".join(f"{name}: {list(keys)}" for name, keys in FORMAT_KEYS.items())
    first = records[0] if records else None
    seen = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise DataError(
        f"cannot tell the format of {source}: its first records have none of the keys of a known "
        f"format ({expected}); record 0 has {seen}. Fix the records or pass --data_format"
    )


def record_problem(record, data_format: str = "alpaca") -> str | None:
    """Why a record is not a usable record of ``data_format``, or None if it is."""
    return normalize_record(record, data_format)[1]


def normalize_record(record, data_format: str = "alpaca") -> tuple[dict | None, str | None]:
    """``(the record in ftkit's canonical form, None)`` or ``(None, what is wrong with it)``.

    Canonical forms: alpaca ``{instruction, input, output}`` (input defaults to ""), chat formats
    ``{messages: [{role, content}]}`` with roles system/user/assistant, prompt_completion
    ``{prompt, completion}``, text ``{text}``.
    """
    keys = FORMAT_KEYS[data_format]
    if not isinstance(record, dict):
        return None, f"is a {type(record).__name__}, not an object with {list(keys)}"
    if data_format == "alpaca":
        return _alpaca(record)
    if data_format in CHAT_FORMATS:
        return _chat(record, data_format)
    for key in keys:
        if key not in record:
            return None, f"is missing the key {key!r}"
        if not isinstance(record[key], str):
            return None, f"has a non-string {key!r} ({type(record[key]).__name__})"
        if not record[key].strip():
            return None, f"has an empty {key!r}"
        if bad := _not_unicode(record[key]):
            return None, f"has text in {key!r} that is not valid Unicode ({bad})"
    return {key: record[key] for key in keys}, None


def _not_unicode(text: str) -> str | None:
    """What makes ``text`` invalid Unicode, or None.

    JSON's ``\\u`` escapes can spell a lone surrogate (``"\\ud800"``): Python decodes it, but it
    encodes to no UTF-8, so neither a tokenizer nor Arrow takes it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate {text[exc.start]!r} at character {exc.start}"
    return None


def _alpaca(record: dict):
    for key in ALPACA_FIELDS:
        if key == "input" and record.get(key) is None:
            continue  # input is optional (null in Arrow-backed files)
        if key not in record:
            return None, f"is missing the key {key!r}"
        if not isinstance(record[key], str):
            return None, f"has a non-string {key!r} ({type(record[key]).__name__})"
        if bad := _not_unicode(record[key]):
            return None, f"has text in {key!r} that is not valid Unicode ({bad})"
    if not record["instruction"].strip():
        return None, "has an empty 'instruction'"
    if not record["output"].strip():
        return None, "has an empty 'output'"
    return {
        "instruction": record["instruction"],
        "input": record.get("input") or "",
        "output": record["output"],
    }, None


def _chat(record: dict, data_format: str):
    key, role_key, content_key = (
        ("messages", "role", "content")
        if data_format == "messages"
        else ("conversations", "from", "value")
    )
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        got = "missing" if key not in record else f"a {type(turns).__name__}"
        if isinstance(turns, list):
            got = "empty"
        return None, f"needs {key!r} as a non-empty list of turns, got {got}"
    messages = []
    for number, turn in enumerate(turns):
        where = f"turn {number} of {key!r}"
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            return None, f"{where} is not an object with {role_key!r} and {content_key!r}"
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str) or not isinstance(content, str):
            return None, f"{where} has a non-string {role_key!r} or {content_key!r}"
        if role in TOOL_ROLES:
            return None, (
                f"{where} has the role {role!r}: tool/function turns are not supported (ftkit "
                "trains on system, user and assistant turns); drop those records or turns"
            )
        known = CHAT_ROLES if data_format == "messages" else tuple(SHAREGPT_ROLES)
        if role not in known:
            return (
                None,
                f"{where} has the unknown {role_key} {role!r} (expected one of {list(known)})",
            )
        role = role if data_format == "messages" else SHAREGPT_ROLES[role]
        if role == "system" and number != 0:
            return None, f"{where} is a system turn; a system turn can only come first"
        if role == "assistant" and not content.strip():
            return None, f"{where} is an empty assistant turn"
        if bad := _not_unicode(content):
            return None, f"{where} has text that is not valid Unicode ({bad})"
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        return None, f"has no assistant turn in {key!r}: nothing to train on"
    return {"messages": messages}, None


def validate_records(
    records: list, source: str, skip_bad: bool = False, data_format: str = "alpaca"
) -> list[dict]:
    """Fail on the first bad record (naming its index), or drop bad records with a logged count.

    Returns the good records in their canonical form (``normalize_record``); ``auto`` detects the
    format from the first records.
    """
    if data_format == "auto":
        data_format = detect_format(records, source)
    skipped: list[int] = []
    good = list(valid_records(records, source, skip_bad, data_format, skipped))
    log_skipped(skipped, source)
    if not good:
        raise DataError(f"no usable {data_format} records in {source}")
    return good


def valid_records(
    records: Iterable, source: str, skip_bad: bool, data_format: str, skipped: list[int]
) -> Iterator[dict]:
    """The canonical form of each good record, in order, as the records stream by.

    A bad record fails naming its index; with ``skip_bad`` its index is appended to ``skipped``.
    """
    for index, record in enumerate(records):
        canonical, problem = normalize_record(record, data_format)
        if problem is None:
            yield canonical
        elif skip_bad:
            skipped.append(index)
        else:
            raise DataError(
                f"record {index} of {source} {problem} ({data_format} format); fix it or pass "
                "--skip_bad_records true"
            )


def log_skipped(skipped: list[int], source: str) -> None:
    if skipped:
        logger.warning("skipped %d malformed records of %s: %s", len(skipped), source, skipped[:20])


def tokenize_record(
    record: dict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on_inputs: bool = False,
    template: PromptTemplate | None = None,
) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels for one record (see the module docstring for the policy)."""
    return tokenize_example(record, tokenizer, max_length, train_on_inputs, "alpaca", template)


EXAMPLE_COLUMNS = ("input_ids", "attention_mask", "labels")


def tokenize_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on_inputs: bool = False,
    data_format: str = "alpaca",
    template: PromptTemplate | None = None,
) -> dict[str, list[list[int]]]:
    """``tokenize_example`` for a batch of canonical records (columns of equal length).

    Alpaca, ``prompt_completion`` and ``text``: BOS (if the tokenizer adds one) + prompt, then
    response + EOS, each part tokenised on its own so the mask boundary is exact, all prompts in
    one tokenizer call and all responses in another; a text record is all response and all
    supervised. Chat records go one by one through the chat template (``tokenize_chat``).
    """
    if data_format in CHAT_FORMATS:
        examples = [
            tokenize_chat({"messages": messages}, tokenizer, max_length, train_on_inputs)
            for messages in batch["messages"]
        ]
        return {column: [e[column] for e in examples] for column in EXAMPLE_COLUMNS}
    if data_format == "alpaca":
        template = template or load_template()
        prompts = [
            template.format(instruction, context)
            for instruction, context in zip(batch["instruction"], batch["input"], strict=True)
        ]
        responses = batch["output"]
    elif data_format == "prompt_completion":
        prompts, responses = batch["prompt"], batch["completion"]
    else:
        prompts, responses = [""] * len(batch["text"]), batch["text"]
        train_on_inputs = True  # text: every token is supervised
    columns = {column: [] for column in EXAMPLE_COLUMNS}
    if not prompts:
        return columns
    # The ids alone: a quarter less time than with the masks transformers would build too.
    ids_only = {"return_attention_mask": False, "return_token_type_ids": False}
    prompt_ids = tokenizer(prompts, add_special_tokens=True, **ids_only)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False, **ids_only)["input_ids"]
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        input_ids = (prompt + response + [tokenizer.eos_token_id])[:max_length]
        n_masked = 0 if train_on_inputs else min(len(prompt), len(input_ids))
        columns["input_ids"].append(input_ids)
        columns["attention_mask"].append([1] * len(input_ids))
        columns["labels"].append([IGNORE_INDEX] * n_masked + input_ids[n_masked:])
    return columns


_SENTINEL = "\u2063ftkit-assistant-turn\u2063"


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a chat template ``DEFAULT_CHAT_TEMPLATE`` (logged)."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        logger.info("the tokenizer has no chat template: using ftkit's default (see docs/data.md)")
    return tokenizer


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict]
) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, supervised)`` pieces, in order.

    Each assistant turn is found by rendering the conversation up to it twice, once with a
    sentinel in place of its content: what precedes the sentinel is prompt, the content follows,
    and the supervised piece runs to the end of the first special token after it (the template's
    end-of-turn token: ``<|im_end|>``, ``<|eot_id|>``, EOS...). Everything after the last
    assistant turn is dropped. A template that does not render a conversation as the
    concatenation of its prefixes, or changes the assistant's text, is refused: the mask could
    not be exact.
    """
    specials = sorted(
        {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        | set(tokenizer.all_special_tokens),
        key=len,
        reverse=True,
    )
    full = render_chat(tokenizer, messages)
    pieces, done = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = render_chat(tokenizer, messages[: index + 1])
        marked = render_chat(
            tokenizer, [*messages[:index], {"role": "assistant", "content": _SENTINEL}]
        )
        if not full.startswith(upto) or _SENTINEL not in marked:
            raise DataError(
                "the chat template does not render a conversation as the concatenation of its "
                "turns, so the assistant turns cannot be masked exactly; set another template"
            )
        start = marked.index(_SENTINEL)
        tail = marked[start + len(_SENTINEL) :]
        content = message["content"]
        if marked[:start] + content + tail != upto or start < done:
            raise DataError(
                "the chat template changes the assistant's text (e.g. strips it), so the "
                "supervised tokens cannot be exactly the assistant turn; strip the data instead"
            )
        hits = [(tail.find(t), -len(t), t) for t in specials if t and t in tail]
        if not hits:
            raise DataError(
                "the chat template writes no special end-of-turn token after an assistant turn, "
                "so the model could not learn to stop; use a template that does"
            )
        position, _, token = min(hits)
        end = start + len(content) + position + len(token)
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    return [(text, supervised) for text, supervised in pieces if text]


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of the token the chat template ends an assistant turn with (None: no template)."""
    if not tokenizer.chat_template:
        return None
    probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    _, (answer, _) = chat_segments(tokenizer, probe)[-2:]
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids[-1] if ids else None


def tokenize_chat(
    record: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, train_on_inputs: bool = False
) -> dict[str, list[int]]:
    """A ``messages`` record through the tokenizer's chat template; only assistant turns supervised.

    Pieces are tokenised one by one without added special tokens (the template writes BOS if the
    model wants one), so decoding the supervised labels of each assistant turn gives exactly its
    content plus its end-of-turn token.
    """
    input_ids, labels = [], []
    for text, supervised in chat_segments(tokenizer, record["messages"]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if supervised or train_on_inputs else [IGNORE_INDEX] * len(ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_example(
    record: dict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on_inputs: bool = False,
    data_format: str = "alpaca",
    template: PromptTemplate | None = None,
) -> dict[str, list[int]]:
    """Tokenise a canonical record of ``data_format`` (``normalize_record``) with exact labels."""
    batch = {key: [value] for key, value in record.items()}
    columns = tokenize_batch(batch, tokenizer, max_length, train_on_inputs, data_format, template)
    return {column: values[0] for column, values in columns.items()}


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
    data_format: str = "alpaca"
    # Fingerprints of the tokens of all records and of the held-out ones (``rundir.split_identity``).
    split_identity: dict = field(default_factory=dict)


def build_datasets(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> InstructionData:
    """Load, validate, split and tokenise, once: the tokens are cached on disk and reused.

    The split is seeded so every process sees the same one. ``data_format: auto`` is resolved
    here, and written back into ``cfg`` so that the run's resolved_config.yaml records the format
    generation and evaluation must use. Chat formats give a tokenizer without a chat template
    ftkit's default one (saved with the run's tokenizer).

    The cache entry is keyed by everything that changes the tokens (``cache_inputs``): a second
    start with the same key tokenises nothing and reads the tokens memory-mapped. Under DDP the
    local main process builds the entry while the others wait, then they read it (``Trainer``).
    """
    source = resolve_dataset(cfg.dataset)
    if cfg.data_format == "auto":  # first: `auto` and the format it finds share cache entries
        cfg.data_format = detect_format(_first_records(cfg, source), source)
    if cfg.data_format in CHAT_FORMATS:
        ensure_chat_template(tokenizer)
    inputs = cache_inputs(cfg, tokenizer, seed)
    entry = tokenised_cache_dir() / hashlib.sha256(_canonical_json(inputs)).hexdigest()[:32]
    found = _read_entry(entry, inputs)
    if found is None:
        started = time.perf_counter()
        processes = _build_entry(entry, inputs, source, cfg, tokenizer, seed)
        found = _read_entry(entry, inputs)
        if found is None:  # just written: only a damaged disk gets here
            raise DataError(f"could not read back the tokenised data written to {entry}")
        logger.info(
            "%s in %s (%.0f s, %d tokenising process(es))",
            CACHE_BUILT,
            entry,
            time.perf_counter() - started,
            processes,
        )
    else:
        logger.info("%s in %s: nothing to tokenise", CACHE_HIT, entry)
    meta, train, held_out = found
    log_skipped(meta["skipped"], source)
    if meta["dropped_too_long"]:
        logger.warning(
            "dropped %d records whose prompt fills max_length=%d",
            meta["dropped_too_long"],
            cfg.max_length,
        )
    return InstructionData(
        train, held_out, meta["dropped_too_long"], cfg.data_format, meta["split_identity"]
    )


# -- the tokenised cache ----------------------------------------------------------------------------

CACHE_HIT = "tokenised data from the cache"  # log lines (the lab's data benchmark reads them)
CACHE_BUILT = "tokenised data cached"
CACHE_META = "ftkit_tokenised.json"
MAX_AUTO_PROCESSES = 8  # num_proc 0: one per core up to this
# On disk: 32-bit ids (vocabularies stay far below 2^31) and 8-bit masks, a third of the 64-bit
# lists datasets would infer; every reader gets Python ints or tensors alike.
TOKENISED_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("attention_mask", pa.list_(pa.int8())),
        ("labels", pa.list_(pa.int32())),
    ]
)
CANONICAL_SCHEMAS = {
    "alpaca": pa.schema([(key, pa.string()) for key in ALPACA_FIELDS]),
    "messages": pa.schema(
        [("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))]
    ),
    "prompt_completion": pa.schema([("prompt", pa.string()), ("completion", pa.string())]),
    "text": pa.schema([("text", pa.string())]),
}


def tokenised_cache_dir() -> Path:
    """``$FTKIT_HOME/tokenised``: beside the embedded base, one entry per key.

    Not datasets' own cache: its map cache is keyed by a hash of the pickled function (here a
    closure over a tokenizer), which does not say what changes the tokens, is not shared by
    processes that pickle differently, and is not published atomically. An entry is never
    changed once written; removing the folder is always safe (the next run rebuilds).
    """
    from ftkit.embedded import ftkit_home

    return ftkit_home() / "tokenised"


def cache_inputs(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> dict:
    """Everything that changes the tokens: the records' bytes, how they are read, validated,
    split and tokenised, the tokenizer and template, and this module's code."""
    import datasets

    read = ("dataset_split", "data_format", "num_samples", "skip_bad_records")
    tokenised = ("validation_size", "max_length", "train_on_inputs")
    return {
        "records": source_digest(cfg.dataset, cfg.dataset_split),
        **{name: getattr(cfg, name) for name in (*read, *tokenised)},
        "seed": seed,
        "tokenizer": tokenizer_digest(tokenizer),
        "template": asdict(load_template()),
        "code": _file_digest([Path(__file__)]),
        "datasets": datasets.__version__,  # the Arrow files' features metadata is datasets'
    }


def source_digest(dataset: str, split: str = "train") -> str:
    """sha256 of the records' bytes: the file, every file of a directory (with its relative
    path), or the Arrow files ``datasets`` keeps for a Hub dataset."""
    source = resolve_dataset(dataset)
    path = _local_path(source)
    if path is None:
        loaded = _load_with_datasets(source, None, split)
        return _file_digest([Path(f["filename"]) for f in loaded.cache_files])
    if path.is_dir():
        return _file_digest(sorted(p for p in path.rglob("*") if p.is_file()), path)
    return _file_digest([path])


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer as ``save_pretrained`` writes it: vocabulary, merges, special and
    added tokens (an added pad), chat template; any tokenizer class, nothing of its load path."""
    with tempfile.TemporaryDirectory(prefix="ftkit-tokenizer-") as scratch:
        tokenizer.save_pretrained(scratch)
        return _file_digest(sorted(p for p in Path(scratch).rglob("*") if p.is_file()), scratch)


def _file_digest(files: list[Path], root: str | Path | None = None) -> str:
    digest = hashlib.sha256()
    for path in files:
        if root is not None:
            digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def _read_entry(entry: Path, inputs: dict) -> tuple[dict, Dataset, Dataset] | None:
    """A complete entry's metadata and memory-mapped splits; None if there is none.

    Entries are published whole (one rename), so one that does not read back, or that records
    other inputs than its name stands for, was damaged afterwards: it is removed (ftkit wrote
    it) and rebuilt, with a warning.
    """
    if not (entry / CACHE_META).is_file():
        return None
    try:
        meta = json.loads((entry / CACHE_META).read_text(encoding="utf-8"))
        if meta["key"] != inputs:
            raise ValueError("it was written for other inputs")
        parts = [_open_part(entry, meta["files"][name]) for name in ("train", "eval")]
        counts = [len(part) for part in parts]
        if counts != [meta["records"]["train"], meta["records"]["eval"]]:
            raise ValueError(f"{counts} records, not {meta['records']}")
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        logger.warning("the tokenised data in %s is damaged (%s): tokenising again", entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return meta, *parts


def _open_part(entry: Path, names: list[str]) -> Dataset:
    from datasets import concatenate_datasets

    parts = [Dataset.from_file(str(entry / name)) for name in names]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _build_entry(
    entry: Path,
    inputs: dict,
    source: str,
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
) -> int:
    """Read, validate, split and tokenise into ``entry``; returns the tokenising processes.

    Records stream from the source into an Arrow file (validated on the way), which is split
    and tokenised by ``datasets.map`` in batches, in ``num_proc`` processes, straight into the
    entry's files. Written in a scratch folder and renamed into place: a reader never sees half
    an entry, and of two builders of one key (two nodes sharing ``$FTKIT_HOME``) the first wins
    and the other's identical result is dropped. A full disk is one line.
    """
    from ftkit.rundir import disk_full, no_space_error

    root = entry.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        return _build_entry_files(entry, inputs, source, cfg, tokenizer, seed)
    except Exception as err:  # Arrow and datasets' workers report a full disk in their own types
        if disk_full(err):
            raise no_space_error(root, err) from err
        raise


def _build_entry_files(
    entry: Path,
    inputs: dict,
    source: str,
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
) -> int:
    root = entry.parent
    with (
        tempfile.TemporaryDirectory(prefix=".records-", dir=root) as work,
        atomic_dir(entry, replace=False) as scratch,
    ):
        records, skipped = _canonical_records(cfg, source, Path(work) / "records.arrow")
        n_eval = _eval_count(cfg.validation_size, len(records))
        if n_eval:
            split = records.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
            parts = {"train": split["train"], "eval": split["test"]}
        else:
            parts = {"train": records, "eval": records.select([])}
        tokenize = _KeepSupervised(
            tokenizer,
            cfg.max_length,
            cfg.train_on_inputs,
            "messages" if cfg.data_format in CHAT_FORMATS else cfg.data_format,
            load_template(),
        )
        processes = min(cfg.num_proc or default_num_proc(), _batches(len(parts["train"])))
        files, counts = {}, {}
        for name, part in parts.items():
            path = scratch / f"{name}.arrow"
            tokenised = _tokenise(part, tokenize, path, processes, f"{entry.name}-{name}")
            files[name] = [Path(f["filename"]).name for f in tokenised.cache_files]
            counts[name] = len(tokenised)
        if counts["train"] == 0:
            raise DataError(
                f"no training records left from {source}; raise max_length or num_samples"
            )
        meta = {
            "key": inputs,
            "data_format": cfg.data_format,
            "files": files,
            "records": counts,
            "dropped_too_long": len(records) - counts["train"] - counts["eval"],
            "skipped": skipped,
            "split_identity": split_identity(
                ([scratch / name for name in files["train"]], counts["train"]),
                ([scratch / name for name in files["eval"]], counts["eval"]),
            ),
        }
        atomic_write_json(scratch / CACHE_META, meta)
    return processes


def _first_records(cfg: DataConfig, source: str) -> list:
    """The records ``auto`` detection looks at (of the first ``num_samples``)."""
    window = min(DETECTION_WINDOW, cfg.num_samples or DETECTION_WINDOW)
    head = list(islice(iter_records(cfg.dataset, cfg.dataset_split), window))
    if not head:
        raise DataError(f"dataset {source!r} holds no records")
    return head


def _canonical_records(cfg: DataConfig, source: str, path: Path) -> tuple[Dataset, list[int]]:
    """The source's good records in canonical form, streamed into an Arrow file at ``path``.

    Returns them memory-mapped, with the indices of the records skipped.
    """
    raw = iter_records(cfg.dataset, cfg.dataset_split)
    if cfg.num_samples:
        raw = islice(raw, cfg.num_samples)
    skipped: list[int] = []
    good = valid_records(raw, source, cfg.skip_bad_records, cfg.data_format, skipped)
    canonical = "messages" if cfg.data_format in CHAT_FORMATS else cfg.data_format
    records = write_arrow(good, CANONICAL_SCHEMAS[canonical], path)
    if len(records) == 0:
        if not skipped:
            raise DataError(f"dataset {source!r} holds no records")
        raise DataError(f"no usable {cfg.data_format} records in {source}")
    return records, skipped


def write_arrow(rows: Iterable[dict], schema: pa.Schema, path: Path) -> Dataset:
    """``rows`` written to an Arrow stream file (datasets' own format) a batch at a time, and
    read back memory-mapped; only one batch is ever in memory."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch = []
        for row in rows:
            batch.append(row)
            if len(batch) == ROWS_PER_BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
    return Dataset.from_file(str(path))


def default_num_proc() -> int:
    """``num_proc: 0``: one tokenising process per core this process may run on (at most 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_AUTO_PROCESSES))


def _batches(n_records: int) -> int:
    return max(1, math.ceil(n_records / ROWS_PER_BATCH))


@dataclass(frozen=True)
class _KeepSupervised:
    """``tokenize_batch``, less the records whose prompt fills max_length (nothing supervised).

    A picklable object, not a closure: ``datasets.map`` sends it to its worker processes.
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    train_on_inputs: bool
    data_format: str
    template: PromptTemplate

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        columns = tokenize_batch(
            batch,
            self.tokenizer,
            self.max_length,
            self.train_on_inputs,
            self.data_format,
            self.template,
        )
        keep = [i for i, labels in enumerate(columns["labels"]) if _supervises(labels)]
        return {name: [values[i] for i in keep] for name, values in columns.items()}


def _supervises(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


def _tokenise(
    part: Dataset, tokenize: _KeepSupervised, path: Path, processes: int, fingerprint: str
) -> Dataset:
    """``part`` tokenised into ``path`` (``path``'s name + ``_0000i_of_0000n`` with several
    processes); each process gets at least one batch. An empty part is an empty file (``map``
    writes none)."""
    from datasets import Features

    if len(part) == 0:
        return write_arrow([], TOKENISED_SCHEMA, path)
    processes = min(processes, _batches(len(part)))
    with _forking_workers() if processes > 1 else contextlib.nullcontext():
        return part.map(
            tokenize,
            batched=True,
            batch_size=ROWS_PER_BATCH,
            num_proc=processes if processes > 1 else None,
            remove_columns=part.column_names,
            features=Features.from_arrow_schema(TOKENISED_SCHEMA),
            cache_file_name=str(path),
            load_from_cache_file=False,
            new_fingerprint=fingerprint,  # the entry's key: datasets need not hash the tokenizer
            desc="tokenise",
        )


@contextlib.contextmanager
def _forking_workers() -> Iterator[None]:
    """This process, ready to fork tokenising workers.

    - Its objects are frozen for the garbage collector: forked workers share its pages until they
      write to them, and a collection in a worker would touch (so copy) every object; the gc
      module's documentation advises freezing before fork() (measured: ~190 MiB less PSS
      while 500 k records are tokenised on 2 cores).
    - The tokenizer's own threads are off in the workers (``TOKENIZERS_PARALLELISM=false``, the
      tokenizers library's switch, which they inherit): the processes are the parallelism, and
      threads in each would compete for the same cores. With one process (``num_proc: 1``) the
      threads stay on: they then parallelise the tokenizer's part of the work.
    """
    threads = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if threads is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = threads


def split_identity(train: tuple[list[Path], int], held_out: tuple[list[Path], int]) -> dict:
    """Fingerprints of the tokens of all the records and of the held-out ones, and their counts.

    ``train`` and ``held_out`` are (Arrow files, records). The value runs have always recorded
    (``ftkit_run.json``): sha256 of ``json.dumps({"input_ids": ..., "labels": ...},
    sort_keys=True)`` of the training records, then of the held-out ones; computed here a batch
    at a time from the files, read rather than memory-mapped (so their pages do not stay in the
    process), instead of from one list of lists of the whole dataset.
    """
    data, held = hashlib.sha256(), hashlib.sha256()
    _feed_tokens_json(*train, [data])
    _feed_tokens_json(*held_out, [data, held])
    return {
        "data": data.hexdigest()[:16],
        "held_out": held.hexdigest()[:16],
        "train_records": train[1],
        "held_out_records": held_out[1],
    }


def _feed_tokens_json(files: list[Path], n_records: int, digests: list) -> None:
    """Feed ``digests`` the JSON text of the records' input_ids and labels ("{}" for none)."""

    def feed(text: str) -> None:
        for digest in digests:
            digest.update(text.encode())

    if not n_records:
        feed("{}")
        return
    for column in ("input_ids", "labels"):
        feed('{"input_ids": [' if column == "input_ids" else '], "labels": [')
        separator = ""
        for path in files:
            # datasets' files are Arrow streams; OSFile reads them without memory-mapping
            with pa.OSFile(str(path)) as source:
                for batch in pa.ipc.open_stream(source):
                    rows = batch.column(column).to_pylist()
                    if rows:
                        feed(separator + json.dumps(rows)[1:-1])
                        separator = ", "
    feed("]}")


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
