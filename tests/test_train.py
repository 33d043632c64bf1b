"""The training loop end to end: artefacts, reload parity, learning, and clear failures."""

import json

import pytest
import torch
import yaml
from helpers import REPO, accelerate_launch, run_python, tiny_recipe

from ftkit.config import ConfigError
from ftkit.errors import ModelError
from ftkit.lora import LoraTargetError
from ftkit.modeling import resolve_mixed_precision
from ftkit.train import Trainer

PROBE = "Below is an instruction that describes a task.\n\n### Instruction:\nName a colour.\n\n"


def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


RELOAD = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(out)
config = __import__("json").load(open(out + "/adapter_config.json"))
base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
model = PeftModel.from_pretrained(base, out).eval()
with torch.no_grad():
    torch.save(model(**tok(sys.argv[2], return_tensors="pt")).logits, out + "/probe.pt")
"""


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["peft", "ftkit"])
def test_adapter_reloads_in_fresh_process_with_same_logits(tiny_llama_dir, records, tmp_path, impl):
    recipe = tiny_recipe(tiny_llama_dir, records, tmp_path / "out", lora_impl=impl, max_steps=3)
    trainer = Trainer(recipe)
    trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    expected = probe_logits(model, trainer.tokenizer)
    done = run_python(RELOAD, str(tmp_path / "out"), PROBE)
    assert done.returncode == 0, done.stderr
    reloaded = torch.load(tmp_path / "out" / "probe.pt")
    base = probe_logits(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        trainer.tokenizer,
    )
    assert (expected - base).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["peft", "ftkit"])
def test_overfitting_a_handful_of_records(tiny_llama_dir, records, tmp_path, impl):
    """A random tiny base has a frozen near-uniform head, so LoRA also adapts lm_head here."""
    recipe = tiny_recipe(
        tiny_llama_dir,
        records,
        tmp_path,
        lora_impl=impl,
        num_samples=4,
        max_steps=40,
        lora_r=16,
        lora_alpha=32,
        lora_target=["q_proj", "v_proj", "lm_head"],
    )
    history = Trainer(recipe).fit().history
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < 0.2 * first, (first, last)


@pytest.mark.slow
def test_recipe_end_to_end_writes_every_artefact(tiny_llama_dir, records, tmp_path):
    out = tmp_path / "run"
    done = accelerate_launch(
        "--config_file",
        "accelerate_configs/cpu.yaml",
        "recipes/alpaca_lora.py",
        "--model_name_or_path",
        str(tiny_llama_dir),
        "--dataset",
        str(records),
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--validation_size",
        "4",
        "--max_length",
        "96",
        "--lora_r",
        "8",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "resolved_config.yaml",
        "metrics.jsonl",
        "metrics.json",
        "loss_curve.png",
    }
    assert expected <= {p.name for p in out.iterdir()}
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_llama_dir)
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert all({"loss", "lr", "tokens_per_s"} <= row.keys() for row in steps)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_loss_before", "eval_perplexity", "wall_time_s"):
        assert metrics[key] > 0
    assert metrics["memory"]["peak_bytes"] > 0
    assert metrics["techniques"]["lora_impl"] == "peft"
    assert metrics["memory"]["trainable_params"] == 2 * 2 * 8 * (32 + 32)  # 2 layers x q,v
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["max_steps"] == 3 and resolved["dataset"] == str(records)
    assert "trainable params: 2,048 || all params:" in done.stderr + done.stdout


@pytest.mark.slow
def test_unknown_flag_is_one_clear_line(tmp_path):
    done = accelerate_launch("recipes/alpaca_lora.py", "--lerning_rate", "1")
    assert done.returncode != 0
    assert "ftkit error: unknown field 'lerning_rate'" in done.stderr
    assert "src/ftkit" not in done.stderr  # no frame of ours: accelerate only reports the exit
    direct = run_python(
        "import runpy, sys; sys.argv = ['alpaca_lora.py', '--lerning_rate', '1'];"
        f"runpy.run_path({str(REPO / 'recipes' / 'alpaca_lora.py')!r}, run_name='__main__')"
    )
    assert direct.returncode == 2
    assert direct.stderr.strip().splitlines() == [
        direct.stderr.strip().splitlines()[-1]
    ] and direct.stderr.startswith("ftkit error: unknown field 'lerning_rate'")


def test_unknown_lora_target_lists_module_names(tiny_llama_dir, records, tmp_path):
    for impl in ("peft", "ftkit"):
        recipe = tiny_recipe(tiny_llama_dir, records, tmp_path, lora_impl=impl, lora_target=["qq"])
        with pytest.raises(LoraTargetError, match=r"q_proj.*v_proj|v_proj.*q_proj"):
            Trainer(recipe)


def test_missing_model_path(records, tmp_path):
    recipe = tiny_recipe(tmp_path / "no-such-model", records, tmp_path)
    with pytest.raises(ModelError, match="model path not found"):
        Trainer(recipe)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a CUDA GPU"):
        resolve_mixed_precision("fp16", cuda_available=False)


@pytest.mark.parametrize(
    "requested, capability, expected",
    [
        ("bf16", (7, 5), "fp16"),
        ("bf16", (8, 0), "bf16"),
        ("fp16", (8, 0), "fp16"),
        ("no", None, "no"),
    ],
)
def test_precision_resolver_on_gpus(requested, capability, expected):
    assert resolve_mixed_precision(requested, True, capability) == expected


@pytest.mark.parametrize(
    ("impl", "config_file", "targets"),
    [
        ("peft", "adapter_config.json", ["query_key_value"]),  # PEFT: the whole fused matrix
        ("ftkit", "ftkit_adapter_config.json", ["query_key_value"]),  # ftkit: q/v rows only
    ],
)
def test_bloom_trains_with_either_lora(
    tiny_bloom_dir, records, tmp_path, impl, config_file, targets
):
    recipe = tiny_recipe(tiny_bloom_dir, records, tmp_path, lora_impl=impl, max_steps=3)
    result = Trainer(recipe).fit()
    saved = json.loads((tmp_path / config_file).read_text())
    assert sorted(saved["target_modules"]) == targets
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert result.metrics["train_loss"] > 0 and result.metrics["steps"] == 3


@pytest.mark.slow
def test_ddp_recipe_writes_and_logs_on_rank_zero_only(tiny_llama_dir, records, tmp_path):
    """The `make train-ddp` path on CPU: 2 gloo processes, one log, one summary, one adapter.

    5 held-out records over 2 ranks: Accelerate repeats one to even the batches, and the eval
    loss must still equal a single process's (no record counted twice).
    """
    out = tmp_path / "ddp"
    done = accelerate_launch(
        "--config_file",
        "accelerate_configs/ddp_2gpu_fp16.yaml",
        "--mixed_precision",
        "no",
        "recipes/alpaca_lora.py",
        "--model_name_or_path",
        str(tiny_llama_dir),
        "--dataset",
        str(records),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--validation_size",
        "5",
        "--max_length",
        "320",
        "--per_device_train_batch_size",  # 11 records fill one batch per rank (issue 10)
        "4",
        ACCELERATE_USE_CPU="true",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("== ftkit run summary ==") == 1
    logs = done.stdout + done.stderr
    assert logs.count("ftkit.train: trainable params:") == 1
    assert logs.count("ftkit.modeling: PEFT LoRA targets") == 1  # rank 1 logs errors only
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps if "loss" in row] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["techniques"]["world_size"] == 2
    single = Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path / "one", validation_size=5))
    assert len(single.data.eval) == 5
    assert metrics["eval_loss_before"] == pytest.approx(single.evaluate()["eval_loss"], rel=1e-6)
    assert (out / "adapter_model.safetensors").is_file()


def test_steps_the_grad_scaler_skips_are_counted_and_hold_the_schedule(
    tiny_llama_dir, records, tmp_path, monkeypatch
):
    """fp16 needs CUDA, so the scaler's verdict is stood in for: steps 2 and 3 overflow."""
    from accelerate import Accelerator

    verdicts = iter([False, True, True, False])
    monkeypatch.setattr(
        Accelerator, "optimizer_step_was_skipped", property(lambda self: next(verdicts))
    )
    recipe = tiny_recipe(tiny_llama_dir, records, tmp_path, max_steps=4, lr_scheduler_type="linear")
    trainer = Trainer(recipe)
    metrics = trainer.fit().metrics
    assert metrics["optimizer_steps_skipped"] == 2
    assert trainer.scheduler.last_epoch == 2  # the schedule advanced on the 2 real updates only
    assert trainer.progress.state_dict()["skipped_steps"] == 2  # saved with every checkpoint


def _step_reads(model_dir, records, out, **overrides) -> int:
    """Host reads (each a sync on a GPU) in one optimizer step, after a first one."""
    from helpers import HostReads

    trainer = Trainer(tiny_recipe(model_dir, records, out, max_steps=3, **overrides))
    windows = trainer.windows()
    trainer.train_step(next(windows))  # AdamW's state exists from here on
    counters = [state["step"] for state in trainer.optimizer.state.values()]
    window = next(windows)  # batches are made on the host; what the step reads back counts
    with HostReads(ignore=counters) as reads:  # torch keeps these on the host on a GPU too
        trainer.train_step(window)
    return reads.count


@pytest.mark.parametrize("padding_free", ["true", "false"])
def test_a_step_reads_the_device_a_fixed_number_of_times(
    tiny_llama_dir, records, tmp_path, padding_free
):
    """Not per layer, not per sequence: per step the loss, grad norm and token count in one read,
    and per micro-batch the supervised positions and transformers' own mask preparation."""
    from conftest import _save_tiny, tiny_llama_config
    from transformers import LlamaForCausalLM

    deep = _save_tiny(LlamaForCausalLM, tiny_llama_config(num_hidden_layers=6), tmp_path / "deep")
    common = dict(padding_free=padding_free, per_device_train_batch_size=2)
    shallow_2 = _step_reads(tiny_llama_dir, records, tmp_path / "a", **common)
    deep_2 = _step_reads(deep, records, tmp_path / "b", **common)
    common["per_device_train_batch_size"] = 4  # twice the sequences in each micro-batch
    shallow_4 = _step_reads(tiny_llama_dir, records, tmp_path / "c", **common)
    ga_2 = _step_reads(tiny_llama_dir, records, tmp_path / "d", **common,
                       gradient_accumulation_steps=2)  # fmt: skip
    assert shallow_2 == deep_2 == shallow_4
    assert ga_2 - shallow_4 == shallow_4 - 1  # one more micro-batch: its reads, not the step's
