"""Generation and evaluation follow the run's data format; the merged model is ready to deploy.

A tiny Qwen2 (ChatML template, no pad/unk) trained on chat records, a tiny Mistral (no template:
ftkit's default one) trained on chat records, a tiny Mistral trained on Alpaca and a GPT-2
trained on plain text.
"""

import json

import pytest
import transformers
from helpers import tiny_recipe
from packaging.version import Version
from test_formats import alpaca_records, messages_records, text_records
from tiny_archs import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from ftkit.adapters import AdapterArgs
from ftkit.data import DEFAULT_CHAT_TEMPLATE, run_data_format
from ftkit.evaluate import EvalArgs, evaluate_before_after
from ftkit.generate import (
    GenerationOptions,
    Prompt,
    PromptArgs,
    generate_before_after,
    load_prompts,
    render_prompts,
)
from ftkit.merge import merge_and_export
from ftkit.train import Trainer

OPTIONS = GenerationOptions(max_new_tokens=8)
CHAT = [{"role": "user", "content": "Name a colour."}]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    found = {}
    for name, arch, records in [
        ("qwen2-chat", "qwen2", messages_records()),
        ("mistral-chat", "mistral", messages_records()),
        ("mistral-alpaca", "mistral", alpaca_records()),
        ("gpt2-text", "gpt2", text_records()),
    ]:
        data = root / f"{name}.json"
        data.write_text(json.dumps(records))
        base = save_tiny(arch, root / f"base-{name}")
        out = root / name
        Trainer(tiny_recipe(base, data, out, max_steps=3, validation_size=2)).fit()
        found[name] = out
    return found


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    return {
        name: merge_and_export(AdapterArgs(str(out)), root / name).output_dir
        for name, out in runs.items()
    }


def test_runs_record_their_format(runs):
    formats = {name: run_data_format(out) for name, out in runs.items()}
    assert formats == {
        "qwen2-chat": "messages",
        "mistral-chat": "messages",
        "mistral-alpaca": "alpaca",
        "gpt2-text": "text",
    }


def test_prompts_are_rendered_the_way_the_run_trained(runs):
    prompt = Prompt("Name a colour.")
    qwen = AutoTokenizer.from_pretrained(runs["qwen2-chat"])
    assert render_prompts([prompt], qwen, "messages") == [
        qwen.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ]
    mistral = AutoTokenizer.from_pretrained(runs["mistral-chat"])
    assert mistral.chat_template == DEFAULT_CHAT_TEMPLATE  # saved with the run
    assert render_prompts([prompt], mistral, "messages") == [
        "<s><|user|>\nName a colour.</s>\n<|assistant|>\n"
    ]
    assert render_prompts([prompt], mistral, "text") == ["Name a colour."]
    assert render_prompts([prompt], mistral, "alpaca") == [prompt.text()]


@pytest.mark.parametrize("name", ["qwen2-chat", "mistral-chat", "gpt2-text", "mistral-alpaca"])
def test_generation_and_evaluation_run_in_the_run_s_format(runs, name, tmp_path):
    result = generate_before_after(
        AdapterArgs(str(runs[name])), [Prompt("Name a colour.")], OPTIONS, True
    )
    assert len(result.columns["fine-tuned"]) == 1
    report = evaluate_before_after(AdapterArgs(str(runs[name])), EvalArgs())  # the held-out split
    assert report.results["fine-tuned"]["records"] == 2


def test_prompts_from_a_chat_file_keep_the_conversation(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(messages_records(4)))
    prompts = load_prompts(PromptArgs(dataset=str(path), num_samples=0))
    multi = prompts[1]
    assert multi.reference == "That makes 6, of course."
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant", "user"]
    assert prompts[2].messages == () and prompts[2].reference == "Hello, I am here to help!"


def test_chat_evaluation_file_uses_the_run_s_template(runs, tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(messages_records(4)))
    report = evaluate_before_after(
        AdapterArgs(str(runs["qwen2-chat"])), EvalArgs(dataset=str(path))
    )
    assert report.results["base"]["records"] == 4


# Before transformers 5.16 the text-generation pipeline's own defaults (do_sample, temperature
# 0.7) win over a model's greedy generation_config, whose do_sample=false equals the global
# default and counted as unset; there the caller asks for greedy (docs/after-training.md).
PIPELINE_GREEDY = (
    {} if Version(transformers.__version__) >= Version("5.16") else {"do_sample": False}
)


@pytest.mark.parametrize("name", ["qwen2-chat", "mistral-chat", "mistral-alpaca"])
def test_merged_chat_model_answers_through_pipeline_like_ftkit_generate(runs, merged, name):
    directory = merged[name]
    config = json.loads((directory / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert (
        config["do_sample"] is False
        and config["max_new_tokens"] == GenerationOptions().max_new_tokens
    )
    assert config["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token_id in (
        [config["eos_token_id"]]
        if isinstance(config["eos_token_id"], int)
        else config["eos_token_id"]
    )
    assert json.loads((directory / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert tokenizer.padding_side == "left" and tokenizer.chat_template
    generator = pipeline("text-generation", model=str(directory))
    (answer,) = generator([CHAT], max_new_tokens=8, **PIPELINE_GREEDY)
    reply = answer[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    ours = generate_before_after(AdapterArgs(str(runs[name])), [Prompt("Name a colour.")], OPTIONS)
    assert reply["content"] == ours.columns["fine-tuned"][0].text


def test_merged_alpaca_model_s_chat_template_is_the_alpaca_prompt(merged):
    tokenizer = AutoTokenizer.from_pretrained(merged["mistral-alpaca"])
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]  # transformers 5: a BatchEncoding
    assert list(ids) == tokenizer(Prompt("Name a colour.").text())["input_ids"]


def test_merged_text_model_loads_with_left_padding_and_greedy_defaults(merged):
    directory = merged["gpt2-text"]
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.generation_config.do_sample is False
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|pad|>"
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
