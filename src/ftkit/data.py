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

from ftkit.config import DATA_FORMATS, EMBEDDED_DATASET, DataConfig  # noqa: F401 (re-export)
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
    """Raw records (first ``num_samples``) from a file, a ``datasets`` directory or a Hub id.

    Sources: ``.json`` (a list of records) and ``.jsonl`` parsed as written, so that validation
    sees the raw records (Arrow's JSON reader would turn a missing key into null and fail on mixed
    types without naming the record) and a broken line is reported by its line number;
    ``.parquet``, ``.csv`` and ``.arrow`` files through ``datasets``; a directory written by
    ``save_to_disk`` through ``load_from_disk``; any other directory (a Hub-style folder of data
    files) and Hub ids through ``load_dataset``. Every record is validated after loading, so the
    record-index errors are the same whatever the source.
    """
    source = resolve_dataset(dataset)
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES:
        records = _read_local(path)
    elif path.suffix in DATASETS_SUFFIXES:
        if not path.is_file():
            raise DataError(f"dataset file not found: {path} (pass --dataset an existing file)")
        builder = DATASETS_SUFFIXES[path.suffix]
        kwargs = _csv_as_text(path) if builder == "csv" else {}
        records = _via_datasets(
            source, lambda: load_dataset(builder, data_files=str(path), split="train", **kwargs)
        )
    elif path.is_dir():
        records = _read_directory(path, split)
    elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(
            f"dataset file not found or of an unknown kind: {path} (pass --dataset a .json, "
            ".jsonl, .parquet, .csv or .arrow file, a datasets directory or a Hub id)"
        )
    else:
        records = _via_datasets(source, lambda: load_dataset(source, split=split), hub=True)
    if not records:
        raise DataError(f"dataset {source!r} holds no records")
    return records[:num_samples] if num_samples else records


DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


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


def _via_datasets(source: str, load, hub: bool = False) -> list[dict]:
    try:
        loaded = load()
    except Exception as exc:  # datasets raises many types; the user needs one message
        where = "from the Hub" if hub else "with datasets"
        raise DataError(
            f"could not load dataset {source!r} {where} ({exc.__class__.__name__}: {exc}); pass "
            "--dataset a .json/.jsonl/.parquet/.csv file, a datasets directory or a Hub id"
        ) from exc
    return loaded.to_list()


def _read_directory(path: Path, split: str) -> list[dict]:
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
        return loaded.to_list()
    return _via_datasets(str(path), lambda: load_dataset(str(path), split=split))


def _read_local(path: Path) -> list[dict]:
    # Parsed with the stdlib, not datasets' Arrow reader: validation must see the raw records to
    # name the exact bad index (Arrow would coerce a missing key to null or fail on mixed types).
    if not path.is_file():
        raise DataError(f"dataset file not found: {path} (pass --dataset an existing file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); is it really {path.suffix}?") from exc
    if not text.strip():
        raise DataError(f"dataset file is empty: {path}")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); "
                    "a .jsonl file holds one JSON record per line"
                ) from exc
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
    return records


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
    return {key: record[key] for key in keys}, None


def _alpaca(record: dict):
    for key in ALPACA_FIELDS:
        if key == "input" and record.get(key) is None:
            continue  # input is optional (null in Arrow-backed files)
        if key not in record:
            return None, f"is missing the key {key!r}"
        if not isinstance(record[key], str):
            return None, f"has a non-string {key!r} ({type(record[key]).__name__})"
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
    good, skipped = [], []
    for index, record in enumerate(records):
        canonical, problem = normalize_record(record, data_format)
        if problem is None:
            good.append(canonical)
        elif skip_bad:
            skipped.append(index)
        else:
            raise DataError(
                f"record {index} of {source} {problem} ({data_format} format); fix it or pass "
                "--skip_bad_records true"
            )
    if skipped:
        logger.warning("skipped %d malformed records of %s: %s", len(skipped), source, skipped[:20])
    if not good:
        raise DataError(f"no usable {data_format} records in {source}")
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


def tokenize_plain(
    record: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, train_on_inputs: bool = False
) -> dict[str, list[int]]:
    """``prompt_completion`` (prompt masked) and ``text`` (every token supervised) records.

    Like Alpaca: BOS (if the tokenizer adds one) + prompt, then completion + EOS, each part
    tokenised on its own so the mask boundary is exact; a text record is all completion.
    """
    prompt, completion = (
        (record["prompt"], record["completion"]) if "prompt" in record else ("", record["text"])
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids + [tokenizer.eos_token_id])[:max_length]
    n_prompt = min(len(prompt_ids), len(input_ids))
    if "text" in record:
        n_prompt = 0
    labels = (
        list(input_ids) if train_on_inputs else [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
    )
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


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
    if data_format == "alpaca":
        return tokenize_record(record, tokenizer, max_length, train_on_inputs, template)
    if data_format in CHAT_FORMATS:
        return tokenize_chat(record, tokenizer, max_length, train_on_inputs)
    return tokenize_plain(record, tokenizer, max_length, train_on_inputs)


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


def build_datasets(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> InstructionData:
    """Load, validate, split and tokenise; the split is seeded so every process sees the same one.

    ``data_format: auto`` is resolved here, and written back into ``cfg`` so that the run's
    resolved_config.yaml records the format generation and evaluation must use. Chat formats give
    a tokenizer without a chat template ftkit's default one (saved with the run's tokenizer).
    """
    source = resolve_dataset(cfg.dataset)
    raw = load_records(cfg.dataset, cfg.dataset_split, cfg.num_samples)
    data_format = detect_format(raw, source) if cfg.data_format == "auto" else cfg.data_format
    cfg.data_format = data_format
    if data_format in CHAT_FORMATS:
        ensure_chat_template(tokenizer)
        data_format = "messages"  # sharegpt records are messages once normalised
    records = validate_records(raw, source, cfg.skip_bad_records, cfg.data_format)
    columns = list(records[0])
    records = Dataset.from_list(records)
    n_eval = _eval_count(cfg.validation_size, len(records))
    if n_eval:
        split = records.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, held_out = split["train"], split["test"]
    else:
        train, held_out = records, records.select([])
    template = load_template()

    def tokenize(record):
        return tokenize_example(
            record, tokenizer, cfg.max_length, cfg.train_on_inputs, data_format, template
        )

    def fits(example):
        return any(label != IGNORE_INDEX for label in example["labels"])

    tokenized = []
    dropped = 0
    for part in (train, held_out):
        part = part.map(tokenize, remove_columns=columns)
        kept = part.filter(fits)
        dropped += len(part) - len(kept)
        tokenized.append(kept)
    if dropped:
        logger.warning(
            "dropped %d records whose prompt fills max_length=%d", dropped, cfg.max_length
        )
    if len(tokenized[0]) == 0:
        raise DataError(f"no training records left from {source}; raise max_length or num_samples")
    return InstructionData(tokenized[0], tokenized[1], dropped, cfg.data_format)


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
