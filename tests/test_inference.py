"""Using a trained adapter: load either format, generate, compare with the base, merge, evaluate."""

import json
import math
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_bloom_config, tiny_llama_config
from helpers import run_python, tiny_recipe
from torch import nn
from transformers import AutoModelForCausalLM, BloomForCausalLM, LlamaForCausalLM

from ftkit.adapters import AdapterArgs, AdapterError, attach_adapter, load_base
from ftkit.cli import main as ftkit_main
from ftkit.data import IGNORE_INDEX, tokenize_record
from ftkit.errors import ConfigError, DataError
from ftkit.evaluate import EvalArgs, evaluate_before_after, evaluate_loss, tokenize_examples
from ftkit.generate import (
    GenerationOptions,
    Prompt,
    PromptArgs,
    generate,
    generate_before_after,
    load_prompts,
    read_prompts_file,
)
from ftkit.integrity import write_manifest
from ftkit.lora import LoraMergeError
from ftkit.merge import merge_and_export as merge_adapter
from ftkit.modeling import load_tokenizer
from ftkit.train import Trainer

PROBE = Prompt("Name a colour.").text()
# Lengths differ, so a batch of them is padded and left padding has to be right.
PROMPTS = [
    Prompt("Hi."),
    Prompt("Name three primary colours and say which two mix to green."),
    Prompt("Translate into French.", "The cat sleeps on the warm windowsill all afternoon."),
    Prompt("Add the numbers.", "2, 3"),
]
MERGE_TOLERANCE = 1e-5  # max |logit difference| merged vs adapter, fp32


pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass
class Run:
    """A finished tiny training run: its output dir, base, and the trained model's probe logits."""

    out: Path
    base: Path
    logits: torch.Tensor


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tiny_bloom_dir, records, tmp_path_factory) -> dict[str, Run]:
    """PEFT- and ftkit-trained LLaMA (PEFT format), ftkit-trained BLOOM (ftkit q/v-only format).

    Only llama-peft holds records out, so its metrics.json has eval losses to check against.
    """
    found = {}
    for name, base, impl, validation_size in [
        ("llama-peft", tiny_llama_dir, "peft", 4),
        ("llama-ftkit", tiny_llama_dir, "ftkit", 0),
        ("bloom-ftkit", tiny_bloom_dir, "ftkit", 0),
    ]:
        out = tmp_path_factory.mktemp(name)
        recipe = tiny_recipe(
            base, records, out, lora_impl=impl, max_steps=2, validation_size=validation_size
        )
        trainer = Trainer(recipe)
        trainer.fit()
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        found[name] = Run(out, base, logits(model, trainer.tokenizer, PROBE))
    return found


def logits(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def texts(prompts) -> list[str]:
    return [prompt.text() for prompt in prompts]


@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory) -> dict[str, Path]:
    """Same architectures with hidden size 64: adapters trained on the tiny ones do not fit."""
    dirs = {}
    for name, cls, config in [
        ("llama", LlamaForCausalLM, tiny_llama_config(hidden_size=64)),
        ("bloom", BloomForCausalLM, tiny_bloom_config(hidden_size=64)),
    ]:
        dirs[name] = tmp_path_factory.mktemp(f"wide-{name}")
        cls(config).save_pretrained(dirs[name])
    return dirs


# -- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, adapter_format",
    [("llama-peft", "peft"), ("llama-ftkit", "peft"), ("bloom-ftkit", "ftkit")],
)
def test_both_adapter_formats_load_with_the_trained_logits(runs, name, adapter_format):
    run = runs[name]
    loaded = load_base(AdapterArgs(str(run.out)))
    assert (loaded.adapter.format, loaded.base) == (adapter_format, str(run.base))
    base_logits = logits(loaded.model, loaded.tokenizer, PROBE)
    tuned_logits = logits(attach_adapter(loaded), loaded.tokenizer, PROBE)
    assert (tuned_logits - base_logits).abs().max() > 1e-3  # the adapter is really on
    torch.testing.assert_close(tuned_logits, run.logits, rtol=0, atol=1e-6)


# -- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-peft", "bloom-ftkit"])
def test_batched_greedy_equals_one_by_one(runs, name):
    loaded = load_base(AdapterArgs(str(runs[name].out)))
    model, tokenizer = attach_adapter(loaded), loaded.tokenizer
    lengths = [len(ids) for ids in tokenizer(texts(PROMPTS))["input_ids"]]
    assert len(set(lengths)) == len(PROMPTS)  # every row of the batch is padded differently

    batched = generate(model, tokenizer, texts(PROMPTS), GenerationOptions(12, batch_size=4))
    single = generate(model, tokenizer, texts(PROMPTS), GenerationOptions(12, batch_size=1))
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    for completion in batched:  # only new tokens: never the prompt echoed back
        assert 0 < len(completion.token_ids) <= 12
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert "### Response" not in completion.text


def test_generation_stops_at_the_first_eos(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    eos_at = {0: 1, 1: 3}  # row -> decoding step whose logits force EOS
    steps = []

    def force_eos(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        steps.append(output.shape)
        for row, step in eos_at.items():
            if len(steps) == step:
                output[row, -1, tokenizer.eos_token_id] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(force_eos)
    try:
        first, second = generate(model, tokenizer, texts(PROMPTS[:2]), GenerationOptions(20))
    finally:
        handle.remove()
    assert len(steps) == 3  # generation ended when the last row hit EOS, not at max_new_tokens
    assert first.stopped_at_eos and first.token_ids == () and first.text == ""
    assert first.shown() == "(empty: EOS came first)"  # reports mark it; the text stays empty
    assert second.stopped_at_eos and len(second.token_ids) == 2
    assert tokenizer.eos_token_id not in second.token_ids


def test_sampling_follows_the_seed(runs):
    loaded = load_base(AdapterArgs(str(runs["llama-peft"].out)))
    model, tokenizer = attach_adapter(loaded), loaded.tokenizer

    def sample(seed):
        options = GenerationOptions(10, do_sample=True, temperature=1.5, top_p=0.95, seed=seed)
        return [c.token_ids for c in generate(model, tokenizer, texts(PROMPTS), options)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_before_after_report_has_a_column_per_model(runs, records):
    args = AdapterArgs(str(runs["llama-peft"].out))
    prompts = load_prompts(PromptArgs(dataset=str(records), num_samples=3))
    options = GenerationOptions(8)
    result = generate_before_after(args, prompts, options, compare_base=True)

    plain = load_base(args)
    assert result.columns["base"] == generate(plain.model, plain.tokenizer, texts(prompts), options)
    tuned = generate(attach_adapter(plain), plain.tokenizer, texts(prompts), options)
    assert result.columns["fine-tuned"] == tuned
    assert result.columns["base"] != result.columns["fine-tuned"]

    lines = result.markdown().splitlines()
    header = lines.index("| # | prompt | base | fine-tuned | reference |")
    rows = lines[header + 2 :]
    assert lines[header + 1] == "| --- | --- | --- | --- | --- |"
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 2", "| 3"]
    for row, prompt in zip(rows, prompts, strict=True):
        assert row.endswith(f" | {prompt.reference} |")
    assert f"base `{runs['llama-peft'].base}`; greedy, max_new_tokens 8" in result.markdown()


def test_prompt_sources(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("Name a colour.\n\n  Count to three. \n")
    assert read_prompts_file(lines) == [Prompt("Name a colour."), Prompt("Count to three.")]
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps(["Hi.", {"instruction": "Sum.", "input": "1, 2"}]))
    assert read_prompts_file(listed) == [Prompt("Hi."), Prompt("Sum.", "1, 2")]
    assert load_prompts(PromptArgs(instruction="Sum.", input="1, 2")) == [Prompt("Sum.", "1, 2")]
    listed.write_text(json.dumps(["Hi.", {"input": "no instruction"}]))
    with pytest.raises(DataError, match=r"item 1 of .*prompts\.json"):
        read_prompts_file(listed)


# -- merge -----------------------------------------------------------------------------------------

PLAIN_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["peft"] = sys.modules["ftkit"] = None  # any import of them now fails
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    *merged_dirs, probe, out = sys.argv[1:]
    found = {}
    for path in merged_dirs:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.no_grad():
            found[path] = model(**tokenizer(probe, return_tensors="pt")).logits
    assert sys.modules["peft"] is None and sys.modules["ftkit"] is None
    torch.save(found, out)
    """
)


@pytest.mark.slow
def test_merged_model_equals_the_adapter_and_loads_without_ftkit_or_peft(runs, tmp_path):
    merged = {}
    for name in ("llama-peft", "bloom-ftkit"):
        result = merge_adapter(AdapterArgs(str(runs[name].out)), tmp_path / name)
        assert result.max_abs_logit_diff <= MERGE_TOLERANCE
        merged[name] = result.output_dir
        files = {p.name for p in result.output_dir.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
        assert not files & {"adapter_config.json", "ftkit_adapter_config.json"}

    done = run_python(PLAIN_LOAD, *map(str, merged.values()), PROBE, str(tmp_path / "l.pt"))
    assert done.returncode == 0, done.stderr
    found = torch.load(tmp_path / "l.pt")
    for name, path in merged.items():
        diff = (found[str(path)] - runs[name].logits).abs().max()
        assert diff <= MERGE_TOLERANCE, (name, float(diff))


def test_merge_refuses_a_quantised_base_and_its_own_inputs(runs, tiny_llama_dir, tmp_path):
    quantised = tmp_path / "quantised-base"
    shutil.copytree(tiny_llama_dir, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    adapter_dir = str(runs["llama-peft"].out)
    with pytest.raises(LoraMergeError, match=r"stores quantised weights.*full-precision"):
        merge_adapter(AdapterArgs(adapter_dir, base_model=str(quantised)), tmp_path / "m")
    with pytest.raises(ConfigError, match="would replace its own inputs"):
        merge_adapter(AdapterArgs(adapter_dir), adapter_dir)
    assert not (tmp_path / "m").exists()


# -- evaluation ------------------------------------------------------------------------------------


def reference_loss(model, tokenizer, records, max_length) -> tuple[float, int]:
    """Record by record, no padding: summed cross-entropy of the supervised next tokens."""
    total, count = 0.0, 0
    for record in records:
        example = tokenize_record(record, tokenizer, max_length)
        labels = torch.tensor(example["labels"][1:])
        if (labels != IGNORE_INDEX).sum() == 0:
            continue
        with torch.no_grad():
            out = model(torch.tensor([example["input_ids"]])).logits[0, :-1]
        kept = labels != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(out[kept], labels[kept], reduction="sum"))
        count += int(kept.sum())
    return total / count, count


def test_eval_loss_is_per_supervised_token_for_base_and_adapter(runs, records):
    args = AdapterArgs(str(runs["llama-peft"].out))
    report = evaluate_before_after(args, EvalArgs(str(records), max_length=96, batch_size=3))
    loaded = load_base(args)
    all_records = json.loads(records.read_text())
    expected = {"base": reference_loss(loaded.model, loaded.tokenizer, all_records, 96)}
    tuned = attach_adapter(loaded)
    expected["fine-tuned"] = reference_loss(tuned, loaded.tokenizer, all_records, 96)
    for label, (loss, tokens) in expected.items():
        row = report.results[label]
        assert row["tokens"] == tokens
        assert row["loss"] == pytest.approx(loss, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert report.results["base"]["loss"] != report.results["fine-tuned"]["loss"]
    assert "| fine-tuned |" in report.table()


def test_eval_runs_the_head_only_at_supervised_positions_with_the_same_loss(runs, records):
    """``ftkit evaluate`` takes training's supervised-logits path by default."""
    loaded = load_base(AdapterArgs(str(runs["llama-peft"].out)))
    examples = tokenize_examples(json.loads(records.read_text()), loaded.tokenizer, 96)
    rows = []
    head = loaded.model.get_output_embeddings()
    head.register_forward_hook(lambda m, args, out: rows.append(out.shape[:-1].numel()))
    figures = {}
    for only in (True, False):
        rows.clear()
        figures[only] = (
            evaluate_loss(loaded.model, loaded.tokenizer, examples, 3, only),
            sum(rows),
        )
    (kept, kept_rows), (full, full_rows) = figures[True], figures[False]
    assert kept["tokens"] == full["tokens"] <= kept_rows < full_rows
    assert kept["loss"] == pytest.approx(full["loss"], rel=1e-6)


def test_eval_defaults_to_the_runs_held_out_split(runs):
    run = runs["llama-peft"]
    report = evaluate_before_after(AdapterArgs(str(run.out)), EvalArgs())
    metrics = json.loads((run.out / "metrics.json").read_text())
    assert report.results["base"]["records"] == metrics["eval_records"] == 4
    assert report.results["base"]["loss"] == pytest.approx(metrics["eval_loss_before"], rel=1e-5)
    assert report.results["fine-tuned"]["loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert report.dataset == f"the held-out split of {run.out}"
    with pytest.raises(ConfigError, match=r"held out no records .*; pass --dataset"):
        evaluate_before_after(AdapterArgs(str(runs["llama-ftkit"].out)), EvalArgs())


# -- bad input -------------------------------------------------------------------------------------


def test_each_bad_input_is_one_clear_error(runs, wide_dirs, tmp_path):
    with pytest.raises(AdapterError, match=r"adapter directory not found: .*no-such-dir"):
        load_base(AdapterArgs(str(tmp_path / "no-such-dir")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"neither adapter_config\.json nor"):
        load_base(AdapterArgs(str(tmp_path / "empty")))
    for name, wide in [("llama-peft", wide_dirs["llama"]), ("bloom-ftkit", wide_dirs["bloom"])]:
        run = runs[name]
        loaded = load_base(AdapterArgs(str(run.out), base_model=str(wide)))
        message = rf"trained on '{run.base}', onto the model given, '{wide}': .*shape"
        with pytest.raises(AdapterError, match=message):
            attach_adapter(loaded)
    moved = shutil.copytree(runs["llama-peft"].out, tmp_path / "moved")  # base gone on this machine
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    write_manifest(moved)  # as written on that other machine: intact, its base not here
    with pytest.raises(
        AdapterError, match=r"trained on .*gone, which does not exist.*--base_model"
    ):
        load_base(AdapterArgs(str(moved)))
    with pytest.raises(DataError, match=r"prompts file not found: .*nope\.txt"):
        load_prompts(PromptArgs(prompts_file=str(tmp_path / "nope.txt")))
    with pytest.raises(ConfigError, match="exactly one of --instruction, --prompts_file"):
        PromptArgs()
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        GenerationOptions(do_sample=True, temperature=0)


# -- the scripts -----------------------------------------------------------------------------------


def script_main(name: str):
    """The ``ftkit NAME`` subcommand, called in-process with an argv."""
    return lambda argv: ftkit_main([name, *argv])


def test_scripts_run_on_a_training_output_dir(runs, records, tmp_path, capsys):
    out = str(runs["llama-peft"].out)
    report = tmp_path / "report.md"
    generate_argv = ["--adapter_dir", out, "--dataset", str(records), "--num_samples", "2"]
    generate_argv += ["--max_new_tokens", "5", "--report", str(report)]
    assert script_main("generate")(generate_argv) == 0
    printed = capsys.readouterr().out
    assert "--- base:" in printed and "--- fine-tuned:" in printed  # --report implies the base
    assert "| # | prompt | base | fine-tuned | reference |" in report.read_text()

    assert script_main("generate")(["--adapter_dir", out, "--instruction", "Hi."]) == 0
    single = capsys.readouterr().out  # one prompt: only the answer, for scripting
    assert not single.startswith("===")

    merged = tmp_path / "m"
    assert script_main("merge")(["--adapter_dir", out, "--output_dir", str(merged)]) == 0
    assert "merged model written to" in capsys.readouterr().out
    assert (merged / "model.safetensors").is_file()

    eval_json = tmp_path / "e.json"
    assert script_main("evaluate")(["--adapter_dir", out, "--output_json", str(eval_json)]) == 0
    assert "| base |" in capsys.readouterr().out
    results = json.loads(eval_json.read_text())["results"]
    assert results["base"]["loss"] > results["fine-tuned"]["loss"] > 0


def test_a_script_reports_bad_input_in_one_line(tmp_path, capsys):
    argv = ["--adapter_dir", str(tmp_path / "nope"), "--instruction", "Hi."]
    assert script_main("generate")(argv) == 2
    assert capsys.readouterr().err == (
        f"ftkit error: adapter directory not found: {tmp_path / 'nope'} (pass --adapter_dir the "
        "output_dir of a training run)\n"
    )
