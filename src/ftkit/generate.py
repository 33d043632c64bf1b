"""Generate with a trained adapter, optionally next to its base model (before/after).

Prompts are rendered the way the run was trained (its ``data_format`` in resolved_config.yaml):
the Alpaca template (``load_template``) for alpaca runs, the run's chat template (saved with its
tokenizer) with a generation prompt for messages/sharegpt runs, and as plain text to complete for
text and prompt_completion runs, so the model sees what it learned on.
Batches are padded on the LEFT: every row's next token then follows its own last real token, which
is what makes batched greedy decoding equal one-by-one decoding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ftkit.adapters import BASE_LABEL, TUNED_LABEL, AdapterArgs, attach_adapter, load_base
from ftkit.data import (
    CHAT_FORMATS,
    detect_format,
    end_of_turn_token,
    load_records,
    load_template,
    render_chat,
    resolve_dataset,
    run_data_format,
    validate_records,
)
from ftkit.errors import ConfigError, DataError

# -- prompts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One instruction (+ optional input); ``reference`` is the dataset's answer, if any."""

    instruction: str
    input: str = ""
    reference: str | None = None
    messages: tuple = ()  # the conversation before the answer, for prompts from chat records

    def text(self) -> str:
        """The Alpaca prompt (alpaca runs)."""
        return load_template().format(self.instruction, self.input)

    def plain(self) -> str:
        """The text to complete (text and prompt_completion runs)."""
        return self.instruction + (f"\n\n{self.input}" if self.input else "")

    def chat(self) -> list[dict]:
        """The conversation to answer (chat runs): the record's turns, or one user turn."""
        if self.messages:
            return [dict(message) for message in self.messages]
        return [{"role": "user", "content": self.plain()}]


def render_prompts(prompts: Sequence[Prompt], tokenizer, data_format: str) -> list[str]:
    """Each prompt as the run's format shows it to the model (see the module docstring)."""
    if data_format in CHAT_FORMATS:
        return [
            render_chat(tokenizer, prompt.chat(), add_generation_prompt=True) for prompt in prompts
        ]
    if data_format == "alpaca":
        return [prompt.text() for prompt in prompts]
    return [prompt.plain() for prompt in prompts]


def stop_token_ids(tokenizer, data_format: str) -> list[int]:
    """EOS, and for chat runs the template's end-of-turn token when it is another one."""
    ids = [tokenizer.eos_token_id]
    if data_format in CHAT_FORMATS:
        end = end_of_turn_token(tokenizer)
        if end is not None and end not in ids:
            ids.append(end)
    return ids


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
        default=None,
        metadata={
            "help": "A dataset in any data format (file, datasets dir or Hub id): its prompts."
        },
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
    source = resolve_dataset(args.dataset)
    data_format = detect_format(records, source)
    records = validate_records(records, source, args.skip_bad_records, data_format)
    return [_prompt_from_record(record) for record in records]


def _prompt_from_record(record: dict) -> Prompt:
    """A dataset record (canonical form) as a prompt, its answer as the reference."""
    if "instruction" in record:
        return Prompt(record["instruction"], record["input"], record["output"])
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        users = [m["content"] for m in messages[:last] if m["role"] == "user"]
        history = tuple(messages[:last])
        return Prompt(
            users[-1] if users else "", reference=messages[last]["content"], messages=history
        )
    if "prompt" in record:
        return Prompt(record["prompt"], reference=record["completion"])
    words = record["text"].split(" ")  # text records: complete the second half from the first
    half = max(1, len(words) // 2)
    return Prompt(" ".join(words[:half]), reference=" ".join(words[half:]))


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

    def generation_config(
        self, tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int] | None = None
    ) -> GenerationConfig:
        # top_k=0: no hidden top-k cut (transformers would fill in 50); temperature and top_p rule.
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        stop_ids = list(stop_ids or [tokenizer.eos_token_id])
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **(sampling if self.do_sample else {}),
        )


@dataclass(frozen=True)
class Completion:
    """The new tokens of one prompt, cut before the first EOS (or end of turn), and their text."""

    text: str
    token_ids: tuple[int, ...]
    stopped_at_eos: bool

    def shown(self) -> str:
        """The text for a reader; an empty answer is marked so that it is not mistaken for a gap."""
        return self.text if self.token_ids else "(empty: EOS came first)"


@torch.no_grad()
def generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    options: GenerationOptions,
    *,
    add_special_tokens: bool = True,
    stop_ids: Sequence[int] | None = None,
) -> list[Completion]:
    """Complete each prompt text; only the new tokens are decoded (the prompt is not echoed).

    Rendered chat prompts already hold what the template wants (BOS...): pass
    ``add_special_tokens=False`` for them, and the end-of-turn token in ``stop_ids``.
    """
    config = options.generation_config(tokenizer, stop_ids)
    stop_ids = list(stop_ids or [tokenizer.eos_token_id])
    torch.manual_seed(options.seed)  # sampling draws from torch only
    device = next(model.parameters()).device
    completions = []
    for start in range(0, len(prompts), options.batch_size):
        batch = tokenizer(
            list(prompts[start : start + options.batch_size]),
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=add_special_tokens,
        ).to(device)
        output = model.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
        completions += [_completion(ids, tokenizer, stop_ids) for ids in new_tokens]
    return completions


def _completion(
    new_ids: list[int], tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int] = ()
) -> Completion:
    # Rows that finished early are padded after their EOS; everything from the EOS on is dropped.
    stops = [
        i for i, token in enumerate(new_ids) if token in (stop_ids or [tokenizer.eos_token_id])
    ]
    stopped = bool(stops)
    if stopped:
        new_ids = new_ids[: stops[0]]
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
    data_format = run_data_format(loaded.adapter.path)
    texts = render_prompts(prompts, loaded.tokenizer, data_format)
    how = {
        "add_special_tokens": data_format not in CHAT_FORMATS,  # the template writes BOS
        "stop_ids": stop_token_ids(loaded.tokenizer, data_format),
    }
    columns = {}
    if compare_base:
        columns[BASE_LABEL] = generate(loaded.model, loaded.tokenizer, texts, options, **how)
    columns[TUNED_LABEL] = generate(attach_adapter(loaded), loaded.tokenizer, texts, options, **how)
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
