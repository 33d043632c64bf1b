"""Exact label masks on real LLaMA-2 tokens and real Alpaca records; bad input fails clearly."""

import json

import pytest

from ftkit.config import DataConfig
from ftkit.data import (
    IGNORE_INDEX,
    build_datasets,
    collator,
    load_records,
    load_template,
    tokenize_record,
    validate_records,
)
from ftkit.errors import DataError


@pytest.fixture(scope="module")
def alpaca_records(alpaca_path):
    return json.loads(alpaca_path.read_text())


def _supervised(example):
    return [t for t in example["labels"] if t != IGNORE_INDEX]


@pytest.mark.parametrize("with_input", [True, False])
def test_labels_decode_to_exactly_response_plus_eos(llama2_tokenizer, alpaca_records, with_input):
    records = [r for r in alpaca_records if bool(r["input"]) == with_input][:50]
    tok = llama2_tokenizer
    for record in records:
        example = tokenize_record(record, tok, max_length=4096)
        assert tok.decode(_supervised(example)) == record["output"] + tok.eos_token
        assert example["input_ids"][0] == tok.bos_token_id
        assert example["input_ids"][-1] == tok.eos_token_id
        assert example["labels"][-1] == tok.eos_token_id  # EOS is supervised
        prompt = load_template().format(record["instruction"], record["input"])
        n_prompt = len(tok(prompt)["input_ids"])
        assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]


def test_both_templates_are_used(alpaca_records):
    template = load_template()
    with_input = next(r for r in alpaca_records if r["input"])
    without = next(r for r in alpaca_records if not r["input"])
    assert "### Input:\n" + with_input["input"] in template.format(**_fields(with_input))
    assert "### Input:" not in template.format(**_fields(without))


def _fields(record):
    return {"instruction": record["instruction"], "input": record["input"]}


def test_train_on_inputs_keeps_prompt(llama2_tokenizer, alpaca_records):
    example = tokenize_record(alpaca_records[0], llama2_tokenizer, 4096, train_on_inputs=True)
    assert example["labels"] == example["input_ids"]


def test_llama2_pad_is_not_eos(llama2_tokenizer):
    assert llama2_tokenizer.pad_token_id is not None
    assert llama2_tokenizer.pad_token_id != llama2_tokenizer.eos_token_id
    assert llama2_tokenizer.pad_token == "<unk>"


def test_truncation_cuts_the_end_and_drops_eos(llama2_tokenizer, alpaca_records):
    record = max(alpaca_records[:200], key=lambda r: len(r["output"]))
    prompt_len = len(
        llama2_tokenizer(load_template().format(record["instruction"], record["input"]))[
            "input_ids"
        ]
    )
    example = tokenize_record(record, llama2_tokenizer, max_length=prompt_len + 5)
    assert len(example["input_ids"]) == prompt_len + 5
    assert len(_supervised(example)) == 5
    assert llama2_tokenizer.eos_token_id not in _supervised(example)


def test_collator_pads_dynamically(llama2_tokenizer, alpaca_records):
    tok = llama2_tokenizer
    examples = [tokenize_record(r, tok, 4096) for r in alpaca_records[:3]]
    batch = collator(tok)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (3, longest)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["attention_mask"][row].sum() == n
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_split_and_count(alpaca_path, llama2_tokenizer):
    cfg = DataConfig(dataset=str(alpaca_path), num_samples=200, validation_size=0.1, max_length=512)
    data = build_datasets(cfg, llama2_tokenizer, seed=0)
    assert len(data.train) + len(data.eval) + data.dropped_too_long == 200
    assert data.dropped_too_long == 0
    assert len(data.eval) == 20  # 10 % of 200
    again = build_datasets(cfg, llama2_tokenizer, seed=0)
    assert again.eval["input_ids"] == data.eval["input_ids"]


def test_prompt_longer_than_max_length_is_dropped(alpaca_path, llama2_tokenizer):
    cfg = DataConfig(dataset=str(alpaca_path), num_samples=30, validation_size=0, max_length=72)
    data = build_datasets(cfg, llama2_tokenizer, seed=0)
    assert data.dropped_too_long > 0
    assert len(data.train) + data.dropped_too_long == 30
    assert all(any(t != IGNORE_INDEX for t in ex) for ex in data.train["labels"])


GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"input": "", "output": "y"}, "record 1 of src is missing the key 'instruction'"),
        ({**GOOD, "output": 3}, "record 1 of src has a non-string 'output' \\(int\\)"),
        ({**GOOD, "output": "  "}, "record 1 of src has an empty 'output'"),
        (["not", "a", "dict"], "record 1 of src is a list"),
    ],
)
def test_bad_record_names_its_index(bad, message):
    with pytest.raises(DataError, match=message):
        validate_records([GOOD, bad, GOOD], "src")


def test_alpaca_input_is_optional():
    assert validate_records([{"instruction": "x", "output": "y"}], "src") == [
        {"instruction": "x", "input": "", "output": "y"}
    ]


def test_skip_bad_records_counts(caplog):
    kept = validate_records([GOOD, {**GOOD, "output": ""}, GOOD], "src", skip_bad=True)
    assert kept == [GOOD, GOOD]
    assert "skipped 1 malformed records of src: [1]" in caplog.text


def test_real_alpaca_has_two_empty_outputs(alpaca_records):
    with pytest.raises(DataError, match=r"record 2335 .* empty 'output'"):
        validate_records(alpaca_records, "alpaca_5000.json")
    assert len(validate_records(alpaca_records, "alpaca", skip_bad=True)) == 4998


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_records(str(tmp_path / "nope.json"))
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(DataError, match="dataset file is empty"):
        load_records(str(tmp_path / "empty.json"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="holds no records"):
        load_records(str(tmp_path / "list.json"))


def test_jsonl_and_num_samples(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({**GOOD, "output": str(i)}) for i in range(5)))
    assert [r["output"] for r in load_records(str(path), num_samples=3)] == ["0", "1", "2"]
