"""Data formats: detection, exact chat label masks, one clear error per malformed record, training.

Formats: alpaca (input optional), messages, sharegpt, prompt_completion, text. Chat formats go
through the tokenizer's chat template (Qwen-like ChatML here) or ftkit's default template.
"""

import json

import pytest
import yaml
from helpers import tiny_recipe
from tiny_archs import byte_tokenizer, embedded_tokenizer, save_tiny
from transformers import AutoTokenizer

from ftkit.data import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    detect_format,
    ensure_chat_template,
    ensure_pad_token,
    tokenize_example,
    validate_records,
)
from ftkit.errors import DataError
from ftkit.train import Trainer

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [
        SYSTEM,
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "That makes 6, of course."},
    ],
    [{"role": "assistant", "content": "Hello, I am here to help!"}],  # assistant only
    [SYSTEM, {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def messages_records(n=8):
    return [{"messages": CONVERSATIONS[i % len(CONVERSATIONS)]} for i in range(n)]


def sharegpt_records(n=8):
    return [
        {
            "conversations": [
                {"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]}
                for m in CONVERSATIONS[i % len(CONVERSATIONS)]
            ]
        }
        for i in range(n)
    ]


def alpaca_records(n=8):  # half of them without an "input" key at all
    return [
        {"instruction": f"Repeat the number {i}.", "output": f"{i} {i} {i}"}
        if i % 2
        else {"instruction": "Add the numbers.", "input": f"{i}, 1", "output": str(i + 1)}
        for i in range(n)
    ]


def prompt_completion_records(n=8):
    return [
        {"prompt": f"Count from {i}:", "completion": f" {i + 1} {i + 2} {i + 3}"} for i in range(n)
    ]


def text_records(n=8):
    return [
        {"text": f"The number {i} comes before {i + 1}, and after it comes {i + 2}."}
        for i in range(n)
    ]


RECORDS = {
    "alpaca": alpaca_records,
    "messages": messages_records,
    "sharegpt": sharegpt_records,
    "prompt_completion": prompt_completion_records,
    "text": text_records,
}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    files = {}
    for name, make in RECORDS.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("\n".join(json.dumps(r) for r in make()) + "\n")
    return files


def _spans(example):
    """The supervised labels as contiguous runs."""
    spans, current = [], []
    for label in example["labels"]:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def _tokenizers():
    return {
        "qwen": ensure_pad_token(byte_tokenizer("qwen")),  # its own ChatML template
        "default-template": ensure_chat_template(ensure_pad_token(embedded_tokenizer())),
        "gpt2-default-template": ensure_chat_template(ensure_pad_token(byte_tokenizer("gpt2"))),
    }


@pytest.mark.parametrize("name", ["qwen", "default-template", "gpt2-default-template"])
@pytest.mark.parametrize(
    "conversation", CONVERSATIONS, ids=["one-turn", "multi", "asst-only", "sys"]
)
def test_chat_labels_are_exactly_each_assistant_turn_plus_end_of_turn(name, conversation):
    tok = _tokenizers()[name]
    end_of_turn = "<|im_end|>" if name == "qwen" else tok.eos_token
    example = tokenize_example({"messages": conversation}, tok, 4096, data_format="messages")
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert [tok.decode(span) for span in _spans(example)] == [a + end_of_turn for a in answers]
    # Everything else (system, user, role headers, the default system turn) is masked, and the
    # tokens are the template's rendering of the conversation.
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert rendered.startswith(tok.decode(example["input_ids"]))
    masked = [
        t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label == -100
    ]
    for message in conversation:
        if message["role"] != "assistant":
            assert message["content"] in tok.decode(masked)
    assert example["labels"][-1] == tok.convert_tokens_to_ids(end_of_turn)


def test_sharegpt_is_messages_with_other_keys():
    tok = _tokenizers()["qwen"]
    (shared,) = validate_records(sharegpt_records(2)[1:], "src", data_format="sharegpt")
    assert shared == {"messages": CONVERSATIONS[1]}
    assert tokenize_example(shared, tok, 4096, data_format="messages") == tokenize_example(
        {"messages": CONVERSATIONS[1]}, tok, 4096, data_format="messages"
    )


def test_prompt_completion_and_text_labels():
    tok = ensure_pad_token(embedded_tokenizer())
    record = {"prompt": "Count from 1:", "completion": " 2 3 4"}
    example = tokenize_example(record, tok, 4096, data_format="prompt_completion")
    n_prompt = len(tok(record["prompt"])["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert (
        tok.decode(example["labels"][n_prompt:])
        == tok.decode(tok(" 2 3 4", add_special_tokens=False)["input_ids"]) + tok.eos_token
    )
    text = tokenize_example({"text": "All of it."}, tok, 4096, data_format="text")
    assert text["labels"] == text["input_ids"] and text["labels"][-1] == tok.eos_token_id


@pytest.mark.parametrize("name", list(RECORDS))
def test_auto_detection_is_logged(name, caplog):
    caplog.set_level("INFO")
    assert detect_format(RECORDS[name](), "file.jsonl") == name
    assert f"data_format auto: {name} records in file.jsonl" in caplog.text


def test_undetectable_records_name_the_formats():
    with pytest.raises(
        DataError, match=r"cannot tell the format.*messages: \['messages'\].*--data_format"
    ):
        detect_format([{"question": "q", "answer": "a"}], "src")


def test_a_chat_file_is_not_dropped_as_bad_alpaca():
    kept = validate_records(messages_records(4), "src", data_format="auto")
    assert len(kept) == 4


BAD = {
    "alpaca": [
        ({"input": "", "output": "y"}, "is missing the key 'instruction'"),
        ({"instruction": "x", "input": 3, "output": "y"}, "non-string 'input'"),
    ],
    "messages": [
        ({"messages": []}, "needs 'messages' as a non-empty list of turns, got empty"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
        (
            {"messages": [{"role": "user"}]},
            "turn 0 of 'messages' is not an object with 'role' and 'content'",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "{}"}]},
            "turn 1 .* role 'tool': tool/function turns are not supported",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    SYSTEM,
                    {"role": "assistant", "content": "y"},
                ]
            },
            "turn 1 .* system turn can only come first",
        ),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "assistant", "content": " "}]}, "empty assistant turn"),
    ],
    "sharegpt": [
        ({"conversations": "hi"}, "needs 'conversations' as a non-empty list of turns, got a str"),
        (
            {
                "conversations": [
                    {"from": "human", "value": "x"},
                    {"from": "function_call", "value": "{}"},
                ]
            },
            "turn 1 .* role 'function_call': tool/function turns are not supported",
        ),
        ({"conversations": [{"from": "human", "value": 1}]}, "non-string 'from' or 'value'"),
    ],
    "prompt_completion": [
        ({"prompt": "x"}, "is missing the key 'completion'"),
        ({"prompt": "x", "completion": ""}, "has an empty 'completion'"),
    ],
    "text": [({"text": None}, "non-string 'text'"), ("just a string", "is a str, not an object")],
}


@pytest.mark.parametrize(
    "data_format, bad, message", [(f, b, m) for f, cases in BAD.items() for b, m in cases]
)
def test_each_malformed_record_is_one_clear_error_with_its_index(data_format, bad, message):
    good = RECORDS[data_format](1)[0]
    with pytest.raises(DataError, match=f"record 2 of src .*{message}") as excinfo:
        validate_records([good, good, bad], "src", data_format="auto")
    assert "\n" not in str(excinfo.value) and f"({data_format} format)" in str(excinfo.value)
    assert validate_records([good, bad], "src", skip_bad=True, data_format="auto") == [
        validate_records([good], "src", data_format=data_format)[0]
    ]


# -- training on each format, on each architecture -------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {
        arch: save_tiny(arch, tmp_path_factory.mktemp(arch))
        for arch in ("mistral", "qwen2", "gpt2", "phi")
    }


@pytest.mark.parametrize("impl", ["peft", "ftkit"])
@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gpt2", "phi"])
@pytest.mark.parametrize("data_format", list(RECORDS))
def test_every_format_trains_with_no_extra_flag(
    model_dirs, data_files, tmp_path, arch, data_format, impl
):
    recipe = tiny_recipe(
        model_dirs[arch], data_files[data_format], tmp_path, lora_impl=impl, max_steps=3
    )
    result = Trainer(recipe).fit()
    assert result.metrics["steps"] == 3 and result.metrics["train_loss"] > 0
    resolved = yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())
    assert resolved["data_format"] == data_format  # auto, resolved: what generation will use
    saved = AutoTokenizer.from_pretrained(tmp_path)
    if data_format in ("messages", "sharegpt"):
        own = AutoTokenizer.from_pretrained(model_dirs[arch]).chat_template
        assert saved.chat_template == (own or DEFAULT_CHAT_TEMPLATE)


# -- sources ---------------------------------------------------------------------------------------


def _sources(root, records):
    """The same records as every kind of source ftkit reads."""
    from datasets import Dataset, DatasetDict

    data = Dataset.from_list(records)
    (root / "hub" / "data").mkdir(parents=True)
    data.to_parquet(str(root / "hub" / "data" / "train-00000-of-00001.parquet"))
    data.to_parquet(str(root / "d.parquet"))
    data.save_to_disk(str(root / "saved"))
    DatasetDict(train=data, test=data.select([0])).save_to_disk(str(root / "saved-dict"))
    (root / "d.json").write_text(json.dumps(records))
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return ["d.json", "d.jsonl", "d.parquet", "saved", "saved-dict", "hub"]


@pytest.mark.parametrize("data_format", ["alpaca", "messages"])
def test_every_source_gives_the_same_records(tmp_path, data_format):
    from ftkit.data import load_records

    records = RECORDS[data_format]()
    if data_format == "alpaca":  # Arrow needs one schema: every record with its input
        records = [{"input": "", **r} for r in records]
    expected = validate_records(records, "src", data_format=data_format)
    for name in _sources(tmp_path, records):
        loaded = load_records(str(tmp_path / name))
        assert validate_records(loaded, name, data_format="auto") == expected, name


def test_csv_cells_are_text(tmp_path):
    from ftkit.data import load_records

    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nAdd the numbers.,"1, 2",3\nSay hi.,,hi\n')
    assert validate_records(load_records(str(path)), "d.csv", data_format="auto") == [
        {"instruction": "Add the numbers.", "input": "1, 2", "output": "3"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]


def test_source_errors_keep_the_line_and_the_record_index(tmp_path):
    from datasets import Dataset

    from ftkit.data import load_records

    lines = [json.dumps(r) for r in alpaca_records(8)]
    lines[5] = '{"instruction": "broken'
    (tmp_path / "broken.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"broken\.jsonl line 6 is not valid JSON"):
        load_records(str(tmp_path / "broken.jsonl"))
    records = [{"input": "", **r} for r in alpaca_records(6)]
    records[3]["output"] = None
    Dataset.from_list(records).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"record 3 of .*bad\.parquet has a non-string 'output'"):
        validate_records(load_records(str(tmp_path / "bad.parquet")), str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match="dataset file not found"):
        load_records(str(tmp_path / "nope.parquet"))
    (tmp_path / "saved-dict").mkdir()
    from datasets import DatasetDict

    DatasetDict(test=Dataset.from_list(records)).save_to_disk(str(tmp_path / "saved-dict"))
    with pytest.raises(DataError, match=r"holds the splits \['test'\], not 'train'"):
        load_records(str(tmp_path / "saved-dict"))


def test_a_parquet_chat_file_trains_with_no_extra_flag(model_dirs, tmp_path):
    from datasets import Dataset

    path = tmp_path / "chat.parquet"
    Dataset.from_list(messages_records()).to_parquet(str(path))
    recipe = tiny_recipe(model_dirs["qwen2"], path, tmp_path / "run", max_steps=3)
    assert Trainer(recipe).fit().metrics["steps"] == 3


@pytest.mark.slow
def test_accelerate_launch_trains_a_chat_file_with_no_other_flag(model_dirs, data_files, tmp_path):
    """The issue's 'done means': the recipe script on a tiny Qwen2 and a chat file, no other flag."""
    from helpers import accelerate_launch

    result = accelerate_launch(
        "--config_file", "accelerate_configs/cpu.yaml", "recipes/alpaca_lora.py",
        "--model_name_or_path", str(model_dirs["qwen2"]), "--dataset", str(data_files["messages"]),
        "--output_dir", str(tmp_path), "--max_steps", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_a_chat_run_computes_logits_only_at_assistant_tokens(
    model_dirs, data_files, tmp_path, monkeypatch
):
    """supervised_logits_only on a chat file: the head runs exactly at the positions whose target
    is an assistant token (byte tokenizer: one token per byte, plus <|im_end|>)."""
    recipe = tiny_recipe(
        model_dirs["qwen2"], data_files["messages"], tmp_path, num_samples=4,
        per_device_train_batch_size=4, padding_free="true",
    )  # fmt: skip
    trainer = Trainer(recipe)
    core = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
    seen = []
    forward = core.forward  # PEFT < 0.21 calls it directly, past any forward hook

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(core, "forward", recording)
    trainer.backward_window(next(trainer.windows()))
    (call,) = seen
    keep, row = call["logits_to_keep"], call["input_ids"][0]
    targets = row[keep + 1].tolist()
    spans = [[targets[0]]]  # runs of consecutive kept positions
    for before, at, target in zip(keep[:-1].tolist(), keep[1:].tolist(), targets[1:], strict=True):
        spans[-1].append(target) if at == before + 1 else spans.append([target])
    answers = [m["content"] for c in CONVERSATIONS for m in c if m["role"] == "assistant"]
    decoded = [trainer.tokenizer.decode(span) for span in spans]
    assert sorted(decoded) == sorted(a + "<|im_end|>" for a in answers)
    assert len(keep) == sum(len(a.encode()) + 1 for a in answers)
