"""Regenerate ftkit's embedded default assets: a toy instruction set and a tiny LLaMA config + tokenizer.

Everything is derived from the templates below with a fixed seed, so running this script again
reproduces ``src/ftkit/assets`` byte-for-byte (the test suite checks that). No weights are written:
``ftkit.embedded`` builds them from the config and a fixed seed on first use.

    python scripts/build_embedded_assets.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SEED = 1234
N_PER_FAMILY = 70
VOCAB_SIZE = 640
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, in this order
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "ftkit" / "assets"

# The Stanford Alpaca prompt templates; the tokenizer is trained on them so they encode compactly.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

WORDS = [
    "cat",
    "dog",
    "fox",
    "owl",
    "cow",
    "hen",
    "bee",
    "ant",
    "pig",
    "rat",
    "sun",
    "moon",
    "star",
    "tree",
    "lake",
    "rock",
    "boat",
    "cup",
    "hat",
    "key",
]
LETTERS = "abcdefgh"
ANTONYMS = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("old", "new"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("full", "empty"),
    ("early", "late"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("high", "low"),
    ("left", "right"),
    ("yes", "no"),
    ("day", "night"),
    ("rich", "poor"),
    ("win", "lose"),
]
COLOURS = {
    "a banana": "yellow",
    "a lemon": "yellow",
    "the sun": "yellow",
    "grass": "green",
    "a leaf": "green",
    "a frog": "green",
    "the sky": "blue",
    "the sea": "blue",
    "a tomato": "red",
    "a strawberry": "red",
    "a cherry": "red",
    "snow": "white",
    "milk": "white",
    "a cloud": "white",
    "coal": "black",
    "a crow": "black",
    "a carrot": "orange",
    "a pumpkin": "orange",
    "chocolate": "brown",
    "a bear": "brown",
}
NUMBER_WORDS = ["two", "three", "four"]


def _reverse(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return _record("Reverse the order of the words.", " ".join(words), " ".join(words[::-1]))


def _sort_letters(rng: random.Random) -> dict:
    letters = rng.sample(LETTERS, rng.randint(3, 5))
    instruction = "Sort the letters in alphabetical order."
    return _record(instruction, " ".join(letters), " ".join(sorted(letters)))


def _add(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return _record("Add the two numbers.", f"{a} + {b}", f"{a} + {b} = {a + b}")


def _antonym(rng: random.Random) -> dict:
    pair = rng.choice(ANTONYMS)
    word, opposite = pair if rng.random() < 0.5 else pair[::-1]
    answer = f"The opposite of {word} is {opposite}."
    if rng.random() < 0.5:
        return _record("Give the opposite of the word.", word, answer)
    return _record(f"What is the opposite of {word}?", "", answer)


def _colour(rng: random.Random) -> dict:
    thing = rng.choice(sorted(COLOURS))
    answer = f"{thing[0].upper()}{thing[1:]} is {COLOURS[thing]}."
    form = rng.randrange(3)
    if form == 0:
        return _record(f"What colour is {thing}?", "", answer)
    if form == 1:
        return _record(f"Name the colour of {thing}.", "", answer)
    return _record("Name the colour of the thing.", thing, answer)


def _repeat(rng: random.Random) -> dict:
    word, n = rng.choice(WORDS), rng.randint(2, 4)
    answer = " ".join([word] * n)
    if rng.random() < 0.5:
        return _record(f"Repeat the word {word} {NUMBER_WORDS[n - 2]} times.", "", answer)
    return _record(f"Say the word {NUMBER_WORDS[n - 2]} times.", word, answer)


FAMILIES = [_reverse, _sort_letters, _add, _antonym, _colour, _repeat]


def _record(instruction: str, input_: str, output: str) -> dict:
    return {"instruction": instruction, "input": input_, "output": output}


def format_prompt(record: dict) -> str:
    """The Alpaca prompt for ``record`` (the text the model is conditioned on, response excluded)."""
    template = PROMPT_INPUT if record["input"] else PROMPT_NO_INPUT
    return template.format(**record)


def build_records(seed: int = SEED) -> list[dict]:
    """Distinct records, families interleaved so any contiguous slice covers every family."""
    rng = random.Random(seed)
    seen: set[tuple[str, str, str]] = set()
    records: list[dict] = []
    for _ in range(N_PER_FAMILY):
        for family in FAMILIES:
            for _attempt in range(100):  # small families can run out of fresh records
                record = family(rng)
                key = (record["instruction"], record["input"], record["output"])
                if key not in seen:
                    seen.add(key)
                    records.append(record)
                    break
    rng.shuffle(records)
    return records


def build_tokenizer(records: list[dict]) -> Tokenizer:
    """Byte-level BPE: any text encodes, and decoding restores spaces and newlines exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [format_prompt(r) + r["output"] for r in records]
    texts += [PROMPT_INPUT, PROMPT_NO_INPUT]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # LLaMA-style: BOS prepended, no EOS appended (the trainer appends EOS to responses itself).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def model_config(vocab_size: int) -> dict:
    """A LlamaConfig small enough to train on two CPU cores in about a minute."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "unk_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }


def tokenizer_files() -> dict[str, dict]:
    """tokenizer_config.json + special_tokens_map.json for ``AutoTokenizer.from_pretrained``."""
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "padding_side": "right",
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out: Path) -> None:
    records = build_records()
    tokenizer = build_tokenizer(records)
    model_dir = out / "tiny-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out / "tiny_instructions.json", records)
    _write_json(model_dir / "config.json", model_config(tokenizer.get_vocab_size()))
    (model_dir / "tokenizer.json").write_text(
        tokenizer.to_str(pretty=True) + "\n", encoding="utf-8"
    )
    for name, obj in tokenizer_files().items():
        _write_json(model_dir / name, obj)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="assets directory to write")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
