"""Each memory/speed technique, driven through Accelerate or the model API, proven equivalent."""

import importlib.util
import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import REPO, accelerate_launch, tiny_recipe

from ftkit import checkpoint
from ftkit.config import AdapterConfig, ModelConfig
from ftkit.errors import ModelError
from ftkit.modeling import apply_adapter, enable_gradient_checkpointing, load_base_model
from ftkit.train import Trainer, TrainingDivergedError


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def first_window_grads(recipe) -> dict[str, torch.Tensor]:
    trainer = Trainer(recipe)
    trainer.backward_window(next(trainer.windows()))
    return lora_grads(trainer.accelerator.unwrap_model(trainer.model))


def max_diff(a: dict, b: dict) -> float:
    """Largest elementwise |a - b| over matching tensors; printed so `pytest -s` shows the margin."""
    diff = max(float((a[n].float() - b[n].float()).abs().max()) for n in a)
    print(f"max |diff| = {diff:.3e}")
    return diff


def assert_grads_close(a, b, rtol=1e-4, atol=1e-7):
    assert a.keys() == b.keys() and a
    max_diff(a, b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("n_records", [8, 7], ids=["full-window", "final-partial-window"])
def test_gradient_accumulation_equals_big_batch(tiny_llama_dir, records, tmp_path, n_records):
    """8x1, 2x4 and 1x8 give the same LoRA gradients on variable-length, prompt-masked data."""
    grads = {}
    for batch, ga in [(8, 1), (2, 4), (1, 8)]:
        recipe = tiny_recipe(
            tiny_llama_dir,
            records,
            tmp_path,
            num_samples=n_records,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga,
        )
        grads[(batch, ga)] = first_window_grads(recipe)
    assert_grads_close(grads[(8, 1)], grads[(2, 4)])
    assert_grads_close(grads[(8, 1)], grads[(1, 8)])


def test_mean_of_micro_batch_means_would_differ(tiny_llama_dir, records, tmp_path):
    """Guard the test above: per-micro-batch mean normalisation gives measurably other grads."""
    recipe = tiny_recipe(
        tiny_llama_dir,
        records,
        tmp_path,
        num_samples=8,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
    )
    trainer = Trainer(recipe)
    window = next(trainer.windows())
    for batch in window:
        (trainer.model(**batch).loss / 4).backward()
    naive = lora_grads(trainer.model)
    exact = first_window_grads(recipe)
    learning = [n for n in exact if exact[n].abs().max() > 0]  # lora_A has no grad while B == 0
    assert learning
    biggest = max((naive[n] - exact[n]).abs().max() / exact[n].abs().max() for n in learning)
    assert biggest > 1e-3


def activation_checkpointing(model) -> bool:
    """Whether GC is on in the transformers model under either LoRA (PEFT's forwards attributes).

    transformers 5 renamed ``is_gradient_checkpointing`` (the old name warns); 4.x has only it.
    """
    inner = model.base_model
    if hasattr(inner, "is_activation_checkpointing"):
        return inner.is_activation_checkpointing
    return inner.is_gradient_checkpointing


@pytest.mark.parametrize("impl", ["peft", "ftkit"])
@pytest.mark.parametrize("when", ["before-lora", "after-lora"])
def test_gradient_checkpointing_same_loss_and_grads(tiny_llama_dir, records, tmp_path, impl, when):
    recipe = tiny_recipe(
        tiny_llama_dir,
        records,
        tmp_path,
        lora_impl=impl,
        num_samples=8,
        per_device_train_batch_size=8,
    )
    batch = next(Trainer(recipe).windows())[0]
    results = []
    for checkpointing in (False, True):
        model = load_base_model(ModelConfig(model_name_or_path=str(tiny_llama_dir)))
        if checkpointing and when == "before-lora":
            enable_gradient_checkpointing(model)
        model = apply_adapter(model, AdapterConfig(lora_impl=impl, lora_dropout=0.0), seed=0)
        if checkpointing and when == "after-lora":
            enable_gradient_checkpointing(model)
        assert activation_checkpointing(model) == checkpointing
        model.train()
        # Proof that GC is really on, for either impl: a checkpointed block runs its forward
        # again during backward (the recompute), so the first block's MLP starts twice per step
        # (a pre-hook: the recompute stops early, before post-hooks, once it has what it needs).
        layer = next(m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer")
        calls = []
        hook = layer.mlp.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        # B is zero at init, so A gets no gradient; one step makes B non-zero first.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        calls.clear()
        loss = model(**batch).loss
        loss.backward()
        hook.remove()
        assert len(calls) == (2 if checkpointing else 1), (impl, checkpointing, len(calls))
        results.append((loss.detach(), lora_grads(model)))
    (loss_plain, grads_plain), (loss_gc, grads_gc) = results
    torch.testing.assert_close(loss_gc, loss_plain, rtol=1e-6, atol=1e-6)
    assert_grads_close(grads_plain, grads_gc, rtol=1e-5, atol=1e-8)
    assert all(g.abs().max() > 0 for g in grads_gc.values())  # A and B both learn under GC


def test_gradient_checkpointing_run_changes_lora_weights(tiny_llama_dir, records, tmp_path):
    for impl in ("peft", "ftkit"):
        recipe = tiny_recipe(
            tiny_llama_dir,
            records,
            tmp_path / impl,
            lora_impl=impl,
            gradient_checkpointing=True,
            max_steps=2,
        )
        trainer = Trainer(recipe)
        trainer.fit()
        model = trainer.accelerator.unwrap_model(trainer.model)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B left zero: classic GC bug


def test_bf16_autocast_on_cpu_close_to_fp32(tiny_llama_dir, records, tmp_path):
    """bf16 autocast on CPU: loss within 2 % and LoRA grads within 5 % (max-norm) of fp32."""
    recipe = tiny_recipe(
        tiny_llama_dir, records, tmp_path, num_samples=8, per_device_train_batch_size=8
    )
    fp32 = Trainer(recipe)
    window = next(fp32.windows())
    loss32 = fp32.backward_window(window)
    grads32 = lora_grads(fp32.model)
    AcceleratorState._reset_state(reset_partial_state=True)  # a new mixed_precision per process
    try:
        bf16 = Trainer(recipe, accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
        loss16 = bf16.backward_window(window)
        grads16 = lora_grads(bf16.accelerator.unwrap_model(bf16.model))
        assert bf16.accelerator.mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert abs(float(loss16) - float(loss32)) / float(loss32) < 0.02
    max_diff(grads32, grads16)
    for name, g in grads32.items():
        assert (grads16[name] - g).abs().max() <= 0.05 * g.abs().max(), name
        assert grads16[name].dtype == torch.float32


@pytest.mark.parametrize("impl", ["peft", "ftkit"])
def test_lora_params_stay_fp32_on_half_base(tiny_llama_dir, impl):
    model = load_base_model(ModelConfig(model_name_or_path=str(tiny_llama_dir), model_dtype="bf16"))
    model = apply_adapter(model, AdapterConfig(lora_impl=impl), seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.dtype == torch.bfloat16 for p in frozen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 grad scaling needs CUDA")
def test_fp16_uses_accelerate_grad_scaler(tiny_llama_dir, records, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, records, tmp_path, max_steps=3)
    trainer = Trainer(recipe, accelerator=Accelerator(mixed_precision="fp16"))
    result = trainer.fit()
    assert trainer.accelerator.scaler is not None
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_resume_equals_uninterrupted(tiny_llama_dir, records, tmp_path):
    """4 straight steps == 2 steps, checkpoint, fresh process state, resume, 2 steps."""
    common = dict(
        num_samples=12,
        per_device_train_batch_size=4,
        lora_dropout=0.1,
        max_steps=4,
        save_steps=2,
        save_total_limit=5,
        learning_rate=5e-3,
    )
    straight = Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path / "a", **common))
    straight.fit()
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == ".safetensors") == [
        "model.safetensors"
    ]
    from safetensors.torch import load_file

    saved = load_file(ckpt / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # adapter only, no frozen base
    resumed = Trainer(
        tiny_recipe(
            tiny_llama_dir, records, tmp_path / "b", **common, resume_from_checkpoint=str(ckpt)
        )
    )
    resumed.fit()
    assert resumed.progress.step == 4
    a = lora_state(straight)
    b = lora_state(resumed)
    max_diff(a, b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    steps_b = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").open()]
    assert steps_b == [3, 4]


def lora_state(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoints_keep_last_k_and_crash_leaves_no_checkpoint(
    tiny_llama_dir, records, tmp_path, monkeypatch
):
    recipe = tiny_recipe(
        tiny_llama_dir, records, tmp_path, max_steps=3, save_steps=1, save_total_limit=2
    )
    trainer = Trainer(recipe)
    trainer.fit()
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trainer.accelerator, "save_state", crash)
    with pytest.raises(OSError):
        checkpoint.save(trainer.accelerator, tmp_path, 4, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny_llama_dir, records, tmp_path):
    recipe = tiny_recipe(
        tiny_llama_dir, records, tmp_path, max_steps=5, save_steps=1, save_total_limit=3
    )
    trainer = Trainer(recipe)
    model = trainer.accelerator.unwrap_model(trainer.model)

    def poison(module, args, output):
        return output * float("nan") if trainer.progress.step == 2 else output

    model.get_output_embeddings().register_forward_hook(poison)
    with pytest.raises(TrainingDivergedError, match="non-finite loss \\(nan\\) at step 3"):
        trainer.fit()
    good = checkpoint.checkpoints(tmp_path)[-1]
    assert good.name == "checkpoint-2"
    from safetensors.torch import load_file

    saved = load_file(good / "model.safetensors")
    current = lora_state(trainer)
    for name, tensor in saved.items():
        assert torch.isfinite(tensor).all()
        torch.testing.assert_close(current[name], tensor)  # the bad step never touched weights


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
@pytest.mark.parametrize("impl", ["peft", "ftkit"])
def test_quantised_base_trains(tiny_llama_dir, records, tmp_path, bits, impl):
    # A validation split: evaluation (eval mode, no grad) runs before training, which on
    # AVX512-BF16 CPUs used to repack 4-bit weights and cut every LoRA gradient off.
    recipe = tiny_recipe(
        tiny_llama_dir,
        records,
        tmp_path,
        lora_impl=impl,
        max_steps=2,
        validation_size=4,
        **{f"load_in_{bits}": True},
    )
    trainer = Trainer(recipe)
    before = lora_state(trainer)
    result = trainer.fit()
    after = lora_state(trainer)
    assert result.metrics["techniques"]["quantization"] == bits
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    assert all((after[n] - before[n]).abs().max() > 0 for n in before)


def test_quantisation_without_bitsandbytes_is_clear(tiny_llama_dir, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError, match="need bitsandbytes"):
        load_base_model(ModelConfig(model_name_or_path=str(tiny_llama_dir), load_in_4bit=True))
    assert load_base_model(ModelConfig(model_name_or_path=str(tiny_llama_dir))) is not None


@pytest.mark.slow
def test_ddp_two_processes_equal_one_big_batch(tiny_llama_dir, records, tmp_path):
    """2 CPU processes (gloo) x batch 2 x GA 2 == 1 process x batch 8, ranks identical each step.

    12 records: step 1 is a full window, step 2 a partial one (one micro-batch per rank, which
    must still sync). 12 splits evenly, so Accelerate's even_batches repeats no record.
    """
    args = [
        "--model_name_or_path",
        str(tiny_llama_dir),
        "--dataset",
        str(records),
        "--validation_size",
        "0",
        "--max_length",
        "320",
        "--lora_dropout",
        "0",
        "--learning_rate",
        "1e-2",
        "--lr_scheduler_type",
        "constant",
        "--warmup_ratio",
        "0",
        "--num_samples",
        "12",
        "--max_steps",
        "2",
    ]
    dump = tmp_path / "dump"
    dump.mkdir()
    done = accelerate_launch(
        "--multi_gpu",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(REPO / "tests" / "ddp_worker.py"),
        str(dump),
        *args,
        "--output_dir",
        str(tmp_path / "ddp"),
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        ACCELERATE_USE_CPU="true",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single = Trainer(
        tiny_recipe(
            tiny_llama_dir,
            records,
            tmp_path / "single",
            num_samples=12,
            per_device_train_batch_size=8,
            max_steps=2,
        )
    )
    assert len(single.data.train) == 12
    # Compare gradients at the same weights: Adam turns fp-noise-sized gradients into lr-sized
    # steps of either sign, so weights after a step are not a stable thing to compare.
    model = single.accelerator.unwrap_model(single.model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for step, window in enumerate(single.windows(), start=1):
        rank0 = torch.load(dump / f"rank0_step{step}.pt")
        rank1 = torch.load(dump / f"rank1_step{step}.pt")
        for kind in ("grads", "weights"):
            for name in params:
                assert torch.equal(rank0[kind][name], rank1[kind][name]), (kind, name)
        single.backward_window(window)
        assert_grads_close(rank0["grads"], lora_grads(model))
        single.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(rank0["weights"][name])
        if step == 2:
            break
    assert any(g.abs().max() > 0 for n, g in rank0["grads"].items() if "lora_A" in n)
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()
