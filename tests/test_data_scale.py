"""Preprocessing at scale: records are streamed (never one list of the whole file), tokenised once
per machine into a cache keyed by everything that changes the tokens, in parallel, and the
cached tokens are exactly the record-by-record ones; text that is not Unicode is one error."""

import copy
import errno
import hashlib
import json
import logging
import os

import pytest
from datasets import Dataset
from helpers import REPO, write_records

from ftkit import cli, data
from ftkit.config import DataConfig
from ftkit.data import (
    CACHE_HIT,
    CACHE_META,
    IGNORE_INDEX,
    build_datasets,
    iter_records,
    load_template,
    tokenize_example,
    validate_records,
)
from ftkit.errors import ConfigError, DataError, FtkitError
from ftkit.io import atomic_dir


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh FTKIT_HOME, so the test's cache starts empty."""
    monkeypatch.setenv("FTKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def tokenised(monkeypatch):
    """The sizes of the batches that reached the tokenizer in this process."""
    batches = []
    real = data.tokenize_batch

    def counted(batch, *args, **kwargs):
        batches.append(len(next(iter(batch.values()))))
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(data, "tokenize_batch", counted)
    return batches


@pytest.fixture(scope="module")
def records_300(tmp_path_factory, alpaca_path):
    return write_records(tmp_path_factory.mktemp("data") / "alpaca300.json", 300, alpaca_path)


def entries(home):
    root = home / "tokenised"
    return (
        sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        if root.exists()
        else []
    )


def rows(dataset):
    return dataset.select_columns(["input_ids", "attention_mask", "labels"]).to_dict()


def config(path, **overrides):
    values = {"dataset": str(path), "validation_size": 20, "max_length": 112, "num_proc": 1}
    return DataConfig(**{**values, **overrides})


# -- the cache ----------------------------------------------------------------------------------


def test_a_second_build_tokenises_nothing(home, records_300, llama2_tokenizer, tokenised, caplog):
    caplog.set_level(logging.INFO, logger="ftkit.data")
    first = build_datasets(config(records_300), llama2_tokenizer, seed=0)
    assert sum(tokenised) == 300  # every record once: 280 train + 20 held out
    caplog.clear()
    second = build_datasets(config(records_300), llama2_tokenizer, seed=0)
    assert sum(tokenised) == 300  # the tokenizer was not called again
    assert CACHE_HIT in caplog.text
    assert "dropped 4 records whose prompt fills max_length=112" in caplog.text  # said again
    assert rows(second.train) == rows(first.train) and rows(second.eval) == rows(first.eval)
    assert (second.dropped_too_long, second.split_identity) == (4, first.split_identity)
    assert len(entries(home)) == 1


def test_cached_tokens_are_the_record_by_record_tokens(home, records_300, llama2_tokenizer):
    """The old path, record by record (``Dataset.from_list``, the seeded split, one
    ``tokenize_example`` per record, records with nothing supervised dropped), gives exactly
    the cached ids, masks and labels, and the split fingerprint runs have always recorded."""
    cfg = config(records_300)
    built = build_datasets(cfg, llama2_tokenizer, seed=3)
    cached = build_datasets(config(records_300), llama2_tokenizer, seed=3)
    records = validate_records(json.loads(records_300.read_text()), "src")
    split = Dataset.from_list(records).train_test_split(test_size=20, seed=3, shuffle=True)
    template = load_template()
    expected = {}
    for name, part in (("train", split["train"]), ("eval", split["test"])):
        examples = [tokenize_example(r, llama2_tokenizer, 112, template=template) for r in part]
        kept = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"])]
        expected[name] = {
            k: [e[k] for e in kept] for k in ("input_ids", "attention_mask", "labels")
        }
    for data_ in (built, cached):
        assert rows(data_.train) == expected["train"] and rows(data_.eval) == expected["eval"]
        assert data_.dropped_too_long == 300 - len(data_.train) - len(data_.eval) == 4

    def fingerprint(*parts):  # rundir's definition before the tokens were cached
        digest = hashlib.sha256()
        for part in parts:
            columns = {k: part[k] for k in ("input_ids", "labels")} if part["labels"] else {}
            digest.update(json.dumps(columns, sort_keys=True).encode())
        return digest.hexdigest()[:16]

    assert cached.split_identity == {
        "data": fingerprint(expected["train"], expected["eval"]),
        "held_out": fingerprint(expected["eval"]),
        "train_records": len(expected["train"]["labels"]),
        "held_out_records": len(expected["eval"]["labels"]),
    }


def _first_output_changed(path, tmp_path):
    records = json.loads(path.read_text())
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([{**records[0], "output": "Changed."}, *records[1:]]))
    return {"dataset": str(changed)}


CHANGES = {
    "records' content": _first_output_changed,
    "max_length": lambda path, tmp: {"max_length": 96},
    "train_on_inputs": lambda path, tmp: {"train_on_inputs": True},
    "validation_size": lambda path, tmp: {"validation_size": 0.2},
    "num_samples": lambda path, tmp: {"num_samples": 250},
    "skip_bad_records": lambda path, tmp: {"skip_bad_records": True},
}


@pytest.mark.parametrize("change", [*CHANGES, "seed", "tokenizer"])
def test_each_input_of_the_key_gets_its_own_entry(
    home, records_300, llama2_tokenizer, tokenised, tmp_path, change
):
    before = build_datasets(config(records_300), llama2_tokenizer, seed=0)
    tokenizer, seed, overrides = llama2_tokenizer, 0, {}
    if change == "seed":
        seed = 1
    elif change == "tokenizer":
        tokenizer = copy.deepcopy(llama2_tokenizer)
        tokenizer.add_tokens(["<ftkit-test-token>"])
    else:
        overrides = CHANGES[change](records_300, tmp_path)
    calls = len(tokenised)
    after = build_datasets(config(records_300, **overrides), tokenizer, seed=seed)
    assert len(tokenised) > calls  # tokenised again, into a second entry; the first is kept
    assert len(entries(home)) == 2
    if change in ("records' content", "max_length", "train_on_inputs", "seed"):
        assert rows(after.train) != rows(before.train) or rows(after.eval) != rows(before.eval)


def test_auto_and_the_format_it_finds_share_an_entry(
    home, records_300, llama2_tokenizer, tokenised
):
    auto = config(records_300)
    build_datasets(auto, llama2_tokenizer, seed=0)
    assert auto.data_format == "alpaca"  # resolved, for resolved_config.yaml
    calls = len(tokenised)
    build_datasets(config(records_300, data_format="alpaca"), llama2_tokenizer, seed=0)
    assert len(tokenised) == calls and len(entries(home)) == 1


def test_two_processes_tokenise_exactly_what_one_does(
    home, tmp_path, alpaca_path, llama2_tokenizer, monkeypatch
):
    path = write_records(tmp_path / "alpaca2500.json", 2500, alpaca_path)
    one = build_datasets(config(path, num_proc=1), llama2_tokenizer, seed=0)
    monkeypatch.setenv("FTKIT_HOME", str(tmp_path / "other-home"))  # num_proc is not in the key
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    two = build_datasets(config(path, num_proc=2), llama2_tokenizer, seed=0)
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # off for the workers only, then restored
    (entry,) = (tmp_path / "other-home" / "tokenised").iterdir()
    meta = json.loads((entry / CACHE_META).read_text())
    assert meta["files"]["train"] == ["train_00000_of_00002.arrow", "train_00001_of_00002.arrow"]
    assert rows(two.train) == rows(one.train) and rows(two.eval) == rows(one.eval)
    assert two.split_identity == one.split_identity


def _truncate_train_file(entry):
    path = entry / "train.arrow"
    path.write_bytes(path.read_bytes()[:1000])


def _record_other_inputs(entry):
    meta = json.loads((entry / CACHE_META).read_text())
    meta["key"]["max_length"] = 4096
    (entry / CACHE_META).write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_truncate_train_file, _record_other_inputs])
def test_a_damaged_entry_is_built_again(
    home, records_300, llama2_tokenizer, tokenised, caplog, damage
):
    expected = rows(build_datasets(config(records_300), llama2_tokenizer, seed=0).train)
    (entry,) = entries(home)
    damage(home / "tokenised" / entry)
    calls = len(tokenised)
    again = build_datasets(config(records_300), llama2_tokenizer, seed=0)
    assert "is damaged" in caplog.text and len(tokenised) > calls
    assert rows(again.train) == expected and entries(home) == [entry]


def test_a_full_disk_while_tokenising_is_one_line_and_leaves_nothing(
    home, records_300, llama2_tokenizer, monkeypatch
):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "_tokenise", full)
    with pytest.raises(FtkitError, match=r"no space left on device at .*tokenised: nothing was"):
        build_datasets(config(records_300), llama2_tokenizer, seed=0)
    assert list((home / "tokenised").iterdir()) == []  # no entry, no scratch


def test_a_second_writer_of_an_entry_keeps_the_first(tmp_path):
    """Two nodes sharing FTKIT_HOME build one key at once: the first rename wins, the other's
    files are dropped, nothing is mixed."""
    target = tmp_path / "entry"
    with atomic_dir(target, replace=False) as scratch:
        (scratch / "tokens").write_text("first")
    with atomic_dir(target, replace=False) as scratch:
        (scratch / "tokens").write_text("second")
        (scratch / "more").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["tokens"]
    assert (target / "tokens").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no scratch left behind


@pytest.mark.slow
def test_under_ddp_the_local_main_process_tokenises_and_the_other_reads(
    tmp_path, tiny_llama_dir, alpaca_path
):
    """accelerate launch, 2 CPU processes, a fresh FTKIT_HOME, rank 0 held back 4 s inside the
    data step: rank 1 still waits for it and then reads its cache."""
    from helpers import accelerate_launch

    markers = tmp_path / "markers"
    markers.mkdir()
    records = write_records(tmp_path / "alpaca64.json", 64, alpaca_path)
    done = accelerate_launch(
        "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no",
        str(REPO / "tests" / "data_worker.py"), str(markers),
        "--model_name_or_path", str(tiny_llama_dir), "--dataset", str(records),
        "--output_dir", str(tmp_path / "out"), "--num_proc", "1", "--validation_size", "8",
        timeout=300, ACCELERATE_USE_CPU="true", FTKIT_HOME=str(tmp_path / "home"),
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in markers.iterdir())
    assert names == ["split-rank0.json", "split-rank1.json", "tokenised-by-rank0"]
    split = [json.loads((markers / f"split-rank{r}.json").read_text()) for r in (0, 1)]
    assert split[0] == split[1] and split[0]["train_records"] == 56


# -- streamed reading -------------------------------------------------------------------------------

RECORDS = [
    {"instruction": "Sum.", "input": "1, 2", "output": "3", "n": 12345678, "x": [1.5, -2e-3]},
    {"instruction": 'Quote "this".', "input": "", "output": "é — ü\n\\ done", "t": True},
    {"nested": {"a": [{"b": None}]}, "output": "{ ] , [ }"},
    7,
    "a string record",
]


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_list_is_read_item_by_item_as_json_loads_reads_it(tmp_path, monkeypatch, indent):
    monkeypatch.setattr(data, "CHUNK_CHARS", 7)  # items and numbers cut by every chunk end
    path = tmp_path / "records.json"
    path.write_text(json.dumps(RECORDS * 3, indent=indent, ensure_ascii=False))
    assert list(iter_records(str(path))) == RECORDS * 3


BROKEN = [
    '[{"a": 1},\n {"b": 2}\n {"c": 3}]',
    '[{"a": 1},\n   ]',
    '[{"a": 1}, {"b": "no end',
    '[{"a": 1}]\n  x',
    '[{"a": 1},\n\n {"b": tru}]',
    "[",
]


@pytest.mark.parametrize("text", BROKEN)
def test_broken_json_is_reported_where_json_loads_reports_it(tmp_path, monkeypatch, text):
    monkeypatch.setattr(data, "CHUNK_CHARS", 5)
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(DataError) as found:
        list(iter_records(str(path)))
    assert str(found.value) == f"{path} is not valid JSON: {expected.value}"


# -- text that is not Unicode -------------------------------------------------------------------

SURROGATE = '{"instruction": "Say it.", "input": "", "output": "ok \\ud800"}'


def _with_surrogate(tmp_path, records_path):
    good = [json.dumps(r) for r in json.loads(records_path.read_text())[:6]]
    path = tmp_path / "surrogate.json"
    path.write_text("[" + ", ".join([*good[:2], SURROGATE, *good[2:]]) + "]")
    return path


def test_a_lone_surrogate_is_one_error_naming_the_record(
    home, tmp_path, records_300, llama2_tokenizer
):
    path = _with_surrogate(tmp_path, records_300)
    message = (
        rf"record 2 of {path} has text in 'output' that is not valid Unicode \(a lone surrogate "
        r"'\\ud800' at character 3\) \(alpaca format\); fix it or pass --skip_bad_records true"
    )
    with pytest.raises(DataError, match=message):
        build_datasets(config(path, validation_size=0), llama2_tokenizer, seed=0)
    kept = build_datasets(
        config(path, validation_size=0, skip_bad_records=True), llama2_tokenizer, 0
    )
    assert len(kept.train) == 6


def test_a_lone_surrogate_in_a_chat_turn_names_the_turn():
    record = {
        "messages": [{"role": "user", "content": "\udfff"}, {"role": "assistant", "content": "x"}]
    }
    with pytest.raises(
        DataError, match=r"record 0 of src turn 0 of 'messages' has text that is not"
    ):
        validate_records([record], "src", data_format="messages")


def test_ftkit_train_on_a_lone_surrogate_is_one_error_line(
    home, tmp_path, records_300, tiny_llama_dir, capsys
):
    path = _with_surrogate(tmp_path, records_300)
    argv = ["train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", str(path)]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"ftkit error: record 2 of {path} has text in 'output' that is")
    assert sum(line.startswith("ftkit error:") for line in lines) == 1


def test_num_proc_must_not_be_negative():
    with pytest.raises(ConfigError, match="num_proc must be >= 0"):
        DataConfig(num_proc=-1)


# -- the benchmark (`make bench-data`) ----------------------------------------------------------


def test_the_benchmark_varies_every_copy_and_keeps_bad_records_bad(tmp_path):
    from ftkit.lab.databench import scaled_records

    source = [
        {"instruction": "Add.", "input": "1, 2", "output": "3"},
        {"instruction": "Greet.", "input": "", "output": ""},  # bad in every copy
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
    ]
    (tmp_path / "source.json").write_text(json.dumps(source))
    records = json.loads(
        scaled_records(tmp_path / "source.json", 8, tmp_path / "8.json").read_text()
    )
    assert records[:3] == source and len(records) == 8
    assert records[3] == {"instruction": "Add. (variant 1)", "input": "1, 2", "output": "3 (1)"}
    assert records[7] == {"instruction": "Greet. (variant 2)", "input": "", "output": ""}
    assert len({json.dumps(r) for r in records}) == 8
    assert [i for i, r in enumerate(records) if not r["output"]] == [1, 4, 7]


def test_the_benchmark_checks_the_goals_on_the_first_start_against_the_smallest_run():
    from ftkit.lab.databench import goals

    mib = 2**20

    def row(records, processes, start, pss, first_step=10.0, cache="built"):
        return {
            "label": "after", "records": records, "processes": processes, "start": start,
            "file_bytes": records * 400, "first_step_s": first_step, "cache": cache,
            "peak_rss_bytes": pss + 100 * mib, "peak_pss_bytes": pss,
        }  # fmt: skip

    rows = [
        row(5000, 1, 1, 900 * mib),
        row(5000, 1, 2, 800 * mib, cache="hit"),
        row(500_000, 1, 1, 1200 * mib, first_step=130.0),  # +300 MiB for a 191 MiB file
        row(500_000, 1, 2, 950 * mib, first_step=15.0, cache="hit"),
        row(5000, 2, 1, 1500 * mib),
        row(500_000, 2, 1, 2300 * mib),  # +800 MiB: more than twice the file, and doubled
    ]
    text = "\n".join(goals(rows, "after"))
    assert "skips tokenisation (the run logs a cache hit): 2 of 2 second starts" in text
    assert "1 process(es), start 1: first step after 130 s (goal < 120 s: missed)" in text
    assert "1 process(es), start 2: first step after 15 s (goal < 120 s: met)" in text
    assert (
        "peak PSS (first start minus the 5,000-record one), 500,000 records, 1 process(es): "
        "300 MiB for a 191 MiB file (goal < 2× the file: met)" in text
    )
    assert "2 process(es): 800 MiB for a 191 MiB file (goal < 2× the file: missed)" in text
    assert "data's share of the PSS: 800 vs 300 MiB (goal: not doubled: missed)" in text
