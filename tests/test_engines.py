"""Distributed engines, executed: DeepSpeed ZeRO-2/3 on CPU (gloo) through `accelerate launch`
equal one process on the same global batch; what runs is what was asked for.

Every launch compares 2 processes x micro-batch 2 (or 4) under DeepSpeed with a plain
1-process x micro-batch 8 ftkit run: 12 records give a full window (8) and a partial one (4,
one micro-batch per rank under GA 2). fp32, dropout 0, clipping active (max_grad_norm 0.05,
raw norms are larger), cosine schedule.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, accelerate_launch, run_python, tiny_recipe
from safetensors.torch import load_file

from ftkit import engines
from ftkit.config import Recipe
from ftkit.errors import ConfigError
from ftkit.modeling import check_precision_combination
from ftkit.train import Trainer, make_accelerator

CONFIGS = REPO / "accelerate_configs"
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (ftkit[deepspeed])"
)
COMMON = {
    "validation_size": 0,
    "max_length": 320,
    "lora_dropout": 0.0,
    "learning_rate": 1e-2,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.0,
    "max_steps": 2,
    "max_grad_norm": 0.05,
}
LAUNCH_TIMEOUT = 300  # one 2-process launch takes 10-20 s here (the first one ~40 s: shm op build)


def recipe_args(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


def launch_worker(config: str, dump: Path, values: dict, *extra: str):
    done = accelerate_launch(
        "--config_file",
        str(CONFIGS / config),
        str(REPO / "tests" / "engine_worker.py"),
        str(dump),
        *extra,
        *recipe_args(values),
        timeout=LAUNCH_TIMEOUT,
        OMP_NUM_THREADS="1",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(dump)


def adapter_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "adapter_model.safetensors")


def max_diff(a: dict, b: dict, label: str) -> float:
    assert a.keys() == b.keys() and a
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"{label}: max |diff| = {diff:.3e}")
    return diff


def one_process_reference(tiny_llama_dir, records, out, values: dict) -> Trainer:
    """The same run in this process: no engine, micro-batch 8, GA 1 (the same global batches)."""
    flat = {**values, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    trainer = Trainer(tiny_recipe(tiny_llama_dir, records, out, **flat))
    trainer.fit()
    return trainer


PEFT_LOGITS = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
dump = torch.load(sys.argv[3])
probe = dump["probe"]
with torch.no_grad():
    logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
print("MAXDIFF", float((logits - dump["logits"]).abs().max()))
"""


def peft_logit_diff(base_dir, adapter_dir, dump_file) -> float:
    """PeftModel.from_pretrained in a fresh process vs the trained engine model's own logits."""
    done = run_python(PEFT_LOGITS, str(base_dir), str(adapter_dir), str(dump_file), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("MAXDIFF")][-1]
    diff = float(line.split()[1])
    print(f"PEFT reload vs engine logits: max |diff| = {diff:.3e}")
    return diff


CASES = {
    # config, GA, per-device micro-batch, records, lora_impl
    "zero2-ga2-peft": ("deepspeed_zero2_cpu.yaml", 2, 2, 12, "peft"),
    "zero3-ga2-ftkit": ("deepspeed_zero3_cpu.yaml", 2, 2, 12, "ftkit"),
    "zero3-ga1-peft": ("deepspeed_zero3_cpu.yaml", 1, 4, 16, "peft"),
}


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("case", sorted(CASES))
def test_deepspeed_two_processes_equal_one(tiny_llama_dir, records, tmp_path, case):
    config, ga, micro, n_records, impl = CASES[case]
    values = {**COMMON, "num_samples": n_records, "lora_impl": impl}
    run_values = {
        **values,
        "model_name_or_path": tiny_llama_dir,
        "dataset": records,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": ga,
        "output_dir": tmp_path / "engine",
    }
    extra = ["--zero3_persistence_0"] if "zero3" in config else []
    dump = launch_worker(config, tmp_path / "dump.pt", run_values, *extra)
    info = dump["info"]
    reference = one_process_reference(tiny_llama_dir, records, tmp_path / "single", values)

    # The engine asked for is the one that ran, and metrics.json says so.
    assert info["techniques"]["engine"] == "deepspeed"
    assert info["techniques"]["zero_stage"] == (3 if "zero3" in config else 2)
    assert info["techniques"]["world_size"] == 2
    # One optimizer step per window, the recipe's clipping.
    assert info["global_steps"] == 2 == reference.progress.step
    assert [row["step"] for row in info["history"]] == [1, 2]
    assert info["gradient_clipping"] == 0.05
    if "zero3" in config:  # really partitioned, so the save below had to gather
        assert all(n == 0 for n in info["local_numel"])

    # Parameter counts from ds_numel: no division by a ZeRO-3 total of 0.
    memory = json.loads((tmp_path / "engine" / "metrics.json").read_text())["memory"]
    single_memory = reference.memory_figures()
    assert (memory["trainable_params"], memory["total_params"]) == (
        single_memory["trainable_params"],
        single_memory["total_params"],
    )
    ours = adapter_tensors(tmp_path / "engine")
    theirs = adapter_tensors(tmp_path / "single")
    assert all(t.numel() > 0 for t in ours.values())
    assert max_diff(ours, theirs, f"{case} 2 proc vs 1 proc adapter") <= 1e-5
    # grad_norm is the real pre-clip norm (clipping active: both windows above 0.05).
    engine_norms = [row["grad_norm"] for row in info["history"]]
    single_norms = [
        json.loads(line)["grad_norm"] for line in (tmp_path / "single" / "metrics.jsonl").open()
    ]
    print(f"{case} grad norms: engine {engine_norms} single {single_norms}")
    assert all(n > 0.05 for n in single_norms)
    torch.testing.assert_close(engine_norms, single_norms, rtol=1e-5, atol=0)
    assert peft_logit_diff(tiny_llama_dir, tmp_path / "engine", tmp_path / "dump.pt") <= 1e-5


@pytest.mark.slow
@needs_deepspeed
def test_zero2_checkpoint_resume_equals_straight(tiny_llama_dir, records, tmp_path):
    """ZeRO-2: save_steps 1 in a 2-step run; a fresh launch resumed from checkpoint-1 ends equal."""
    values = {
        **COMMON,
        "model_name_or_path": tiny_llama_dir,
        "dataset": records,
        "num_samples": 12,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "save_steps": 1,
        "save_total_limit": 5,
    }
    launch_worker(
        "deepspeed_zero2_cpu.yaml", tmp_path / "a.pt", {**values, "output_dir": tmp_path / "a"}
    )
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-1"
    assert ckpt.is_dir() and not list((tmp_path / "a" / "checkpoints").glob(".*"))
    # Its checksums cover the engine's per-rank files in their subdirectory (verified on resume).
    listed = {
        line.split("  ", 1)[1] for line in (ckpt / "checksums.sha256").read_text().splitlines()
    }
    written = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert listed == written - {"checksums.sha256"} and any("/" in name for name in listed)
    module_files = list(ckpt.rglob("*model_states.pt"))
    assert module_files
    frozen_free = torch.load(module_files[0], weights_only=False)["module"]
    assert frozen_free and all("lora_" in k for k in frozen_free)  # no frozen base copied
    resumed = launch_worker(
        "deepspeed_zero2_cpu.yaml",
        tmp_path / "b.pt",
        {**values, "output_dir": tmp_path / "b", "resume_from_checkpoint": ckpt},
    )
    assert [row["step"] for row in resumed["info"]["history"]] == [2]
    assert resumed["info"]["global_steps"] == 2
    diff = max_diff(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"), "resume")
    assert diff <= 1e-6


# -- what was asked for is what runs (no launch needed) ------------------------------------------


def test_ddp_timeout_goes_to_one_process_group_handler(monkeypatch):
    """One InitProcessGroupKwargs carries the recipe's timeout (and gloo for DeepSpeed on CPU)."""
    from datetime import timedelta

    monkeypatch.setenv("WORLD_SIZE", "2")
    plain = engines.accelerator_kwargs(None, cuda=False, ddp_timeout=42)
    deepspeed = engines.accelerator_kwargs("deepspeed", cuda=False, ddp_timeout=42)
    assert plain["cpu"] is True and deepspeed["cpu"] is False
    assert [h.to_kwargs() for h in plain["kwargs_handlers"]] == [{"timeout": timedelta(seconds=42)}]
    assert [h.to_kwargs() for h in deepspeed["kwargs_handlers"]] == [
        {"backend": "gloo", "timeout": timedelta(seconds=42)}
    ]
    # Accelerate drops a timeout equal to its NCCL default (600 s): gloo would wait 1800 s.
    with pytest.raises(ConfigError, match="ddp_timeout 600 cannot reach the gloo process group"):
        engines.accelerator_kwargs(None, cuda=False, ddp_timeout=600)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no process group, nothing to refuse
    assert engines.accelerator_kwargs(None, cuda=False, ddp_timeout=600)["cpu"] is True


def test_fsdp_without_cuda_is_refused_before_anything_loads(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("FSDP runs through Accelerate on GPUs")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(engines.EngineError, match=r"FSDP.*no CUDA"):
        make_accelerator()


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_config_with_use_cpu_is_refused(tiny_llama_dir, records, tmp_path):
    """ACCELERATE_USE_CPU=true turns a DeepSpeed config into plain DDP: refused, not silent."""
    done = accelerate_launch(
        "--config_file",
        str(CONFIGS / "deepspeed_zero2_cpu.yaml"),
        str(REPO / "tests" / "engine_worker.py"),
        str(tmp_path / "dump.pt"),
        *recipe_args(
            {
                "model_name_or_path": tiny_llama_dir,
                "dataset": records,
                "output_dir": tmp_path / "out",
                "max_steps": 1,
            }
        ),
        timeout=LAUNCH_TIMEOUT,
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
    )
    assert done.returncode != 0
    assert "asks for deepspeed but Accelerate set up" in done.stderr
    assert not (tmp_path / "dump.pt").exists()


def test_deepspeed_clipping_is_the_recipes_or_refused():
    assert engines.deepspeed_clipping("auto", 0.3) == 0.3
    assert engines.deepspeed_clipping(None, 0.0) == 0.0  # 0 means no clipping, not DS's 1.0
    assert engines.deepspeed_clipping(1.0, 1.0) == 1.0
    with pytest.raises(ConfigError, match=r"gradient_clipping=0\.0 .*max_grad_norm=1\.0"):
        engines.deepspeed_clipping(0.0, 1.0)
    with pytest.raises(ConfigError, match=r"gradient_clipping=1\.0 .*max_grad_norm=0\.3"):
        engines.deepspeed_clipping(1.0, 0.3)


def test_full_fp16_finetune_under_fp16_amp_is_refused():
    recipe = Recipe.from_dict({**Recipe().to_dict(), "lora_impl": "none", "model_dtype": "fp16"})
    with pytest.raises(ConfigError, match="lora_impl none \\+ model_dtype fp16"):
        check_precision_combination(recipe, "fp16")
    check_precision_combination(recipe, "bf16")  # other combinations pass
    lora = Recipe.from_dict({**Recipe().to_dict(), "model_dtype": "fp16"})
    check_precision_combination(lora, "fp16")


# -- FSDP2, torch level (Accelerate runs FSDP only on GPUs) --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["peft", "ftkit"])
def test_fsdp2_two_processes_equal_one(tiny_llama_dir, records, tmp_path, impl):
    """torchrun, 2 processes, fully_shard per decoder layer + root, GA 2 with a partial window.

    ftkit's loop, clipping over the parameters read after prepare (fully_shard replaced them:
    before, clipping saw parameters without gradients) and the gather-on-all-ranks save.
    """
    values = {**COMMON, "num_samples": 12, "lora_impl": impl}
    run_values = {
        **values,
        "model_name_or_path": tiny_llama_dir,
        "dataset": records,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "output_dir": tmp_path / "fsdp2",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "fsdp2_worker.py"),
            str(tmp_path / "dump.pt"),
            *recipe_args(run_values),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"},
        timeout=LAUNCH_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    dump = torch.load(tmp_path / "dump.pt")
    assert dump["world"] == 2
    assert dump["techniques"]["engine"] == "fsdp"
    one_process_reference(tiny_llama_dir, records, tmp_path / "single", values)
    ours = adapter_tensors(tmp_path / "fsdp2")
    theirs = adapter_tensors(tmp_path / "single")
    assert max_diff(ours, theirs, f"FSDP2 {impl} 2 proc vs 1 proc adapter") <= 1e-5
    norms = [row["grad_norm"] for row in dump["history"]]
    single = [json.loads(x)["grad_norm"] for x in (tmp_path / "single" / "metrics.jsonl").open()]
    print(f"FSDP2 {impl} grad norms: {norms} single {single}")
    assert all(n > 0.05 for n in single)  # clipping active
    torch.testing.assert_close(norms, single, rtol=1e-5, atol=0)


def test_trainer_refuses_full_fp16_finetune_before_loading(tiny_llama_dir, records, tmp_path):
    """The Trainer checks the combination before the model loads (fp16 AMP needs CUDA: stubbed)."""
    import contextlib
    from types import SimpleNamespace
    from unittest import mock

    fake = SimpleNamespace(
        mixed_precision="fp16",
        local_main_process_first=contextlib.nullcontext,
        distributed_type=None,
        device=torch.device("cpu"),
        num_processes=1,
    )
    recipe = tiny_recipe(
        tiny_llama_dir, records, tmp_path, lora_impl="none", model_dtype="fp16", num_samples=4
    )
    never = mock.patch("ftkit.train.build_model", side_effect=AssertionError("model loaded"))
    with never, pytest.raises(ConfigError, match="lora_impl none"):
        Trainer(recipe, accelerator=fake)
