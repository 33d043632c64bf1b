"""supervised_logits_only: the LM head runs only where the loss looks, with the same loss and grads."""

import json
import logging

import pytest
import torch
from helpers import tiny_recipe
from test_batching import TOL, assert_same, window_results

from ftkit import cli, metrics
from ftkit.data import IGNORE_INDEX
from ftkit.errors import ConfigError
from ftkit.metrics import supervised_positions
from ftkit.train import Trainer


@pytest.mark.parametrize("padding_free", ["false", "true"], ids=["padded", "padding-free"])
@pytest.mark.parametrize("impl", ["peft", "ftkit"])
def test_supervised_logits_equal_full_logits_with_a_partial_window(
    tiny_llama_dir, records, tmp_path, impl, padding_free
):
    """6 records, batch 2, GA 2: windows [2, 2] and a partial [2], at the same weights."""
    results = {}
    for only in (True, False):
        recipe = tiny_recipe(
            tiny_llama_dir,
            records,
            tmp_path,
            lora_impl=impl,
            num_samples=6,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            padding_free=padding_free,
            supervised_logits_only=only,
        )
        results[only] = window_results(recipe, n_windows=2)
    assert len(results[True]) == 2
    for a, b in zip(results[True], results[False], strict=True):
        assert_same(a, b)


def lm_head_rows(trainer):
    """Rows the LM head computes per forward (a forward hook on the output embeddings)."""
    rows = []
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    head.register_forward_hook(lambda m, args, out: rows.append(out.shape[:-1].numel()))
    return rows


@pytest.mark.parametrize("padding_free", ["false", "true"], ids=["padded", "padding-free"])
def test_the_head_runs_only_at_supervised_positions(
    tiny_llama_dir, records, tmp_path, padding_free
):
    recipe = tiny_recipe(
        tiny_llama_dir, records, tmp_path, num_samples=8, padding_free=padding_free
    )
    trainer = Trainer(recipe)
    rows = lm_head_rows(trainer)
    window = next(trainer.windows())
    trainer.backward_window(window)
    batch = window[0]
    supervised = int(metrics.supervised_tokens(batch))
    if padding_free == "true":
        assert rows == [supervised]  # exact and complete in a flattened row
    else:  # the union of the rows' supervised columns, for every row
        width = int(supervised_positions(batch["labels"]).numel())
        assert rows == [batch["labels"].shape[0] * width]
        assert supervised <= rows[0] < batch["input_ids"].numel()


def test_eval_loss_is_the_same_with_and_without(tiny_llama_dir, records, tmp_path):
    figures = {}
    for only in (True, False):
        recipe = tiny_recipe(
            tiny_llama_dir,
            records,
            tmp_path,
            num_samples=16,
            validation_size=6,
            per_device_eval_batch_size=4,
            supervised_logits_only=only,
        )
        trainer = Trainer(recipe)
        rows = lm_head_rows(trainer)
        figures[only] = (trainer.evaluate()["eval_loss"], sum(rows))
    (loss_kept, rows_kept), (loss_full, rows_full) = figures[True], figures[False]
    print(f"eval |Δloss| = {abs(loss_kept - loss_full):.2e}; head rows {rows_kept} vs {rows_full}")
    assert abs(loss_kept - loss_full) <= TOL
    assert rows_kept < rows_full


def test_metrics_record_the_logits_mode_and_fraction(tiny_llama_dir, records, tmp_path):
    fractions = {}
    for only in (True, False):
        out = tmp_path / str(only)
        recipe = tiny_recipe(
            tiny_llama_dir, records, out, padding_free="true", supervised_logits_only=only
        )
        Trainer(recipe).fit()
        figures = json.loads((out / "metrics.json").read_text())["throughput"]
        assert figures["logits_mode"] == ("supervised" if only else "full")
        fractions[only] = figures["logits_fraction"]
    print(fractions)
    assert fractions[False] == 1.0
    # padding-free: exactly the supervised share of the real tokens (minus each sequence start)
    assert 0 < fractions[True] < 1


class NoLogitsToKeep(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, labels=None):
        raise NotImplementedError


def test_a_model_without_logits_to_keep_warns_once_and_uses_full_logits(caplog):
    model = NoLogitsToKeep()
    with caplog.at_level(logging.WARNING, logger="ftkit.metrics"):
        assert metrics.use_supervised_logits(True, model) is False
        assert metrics.use_supervised_logits(True, model) is False
    assert len([r for r in caplog.records if "logits_to_keep" in r.getMessage()]) == 1
    assert metrics.use_supervised_logits(False, model) is False


def test_loss_kernel_liger_is_refused_on_cpu_with_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["train", "--loss_kernel", "liger", "--max_steps", "1", "--output_dir", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftkit error: loss_kernel liger needs CUDA")
    with pytest.raises(ConfigError, match=r"pip install 'ftkit\[liger\]'"):
        monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
        metrics.check_loss_kernel("liger", cuda_available=True)
    with pytest.raises(ConfigError, match="loss_kernel='fused'"):
        tiny_recipe("m", "d", "o", loss_kernel="fused")


# -- loss_kernel liger: the fused path, proven on CPU with a torch stand-in for liger's kernel ------


class LigerLikeFusedLinearCrossEntropy(torch.autograd.Function):
    """liger's fused linear cross-entropy as it behaves on a GPU, in torch.

    Like liger's Triton kernel it is an autograd function that computes the loss and every
    gradient in its forward (no logits kept for backward), multiplies in the dtypes it is given
    with autocast off, and refuses a hidden state and a head of different dtypes, as liger's
    matmul does ("expected mat1 and mat2 to have the same dtype"); the softmax runs in fp32.
    """

    @staticmethod
    def forward(ctx, weight, hidden, targets, bias):
        if hidden.dtype != weight.dtype:
            raise RuntimeError(
                "expected mat1 and mat2 to have the same dtype, but got: "
                f"{hidden.dtype} != {weight.dtype}"
            )
        with torch.autocast(hidden.device.type, enabled=False), torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (weight, hidden, bias) if t is not None]
            logits = torch.nn.functional.linear(inputs[1], inputs[0], *inputs[2:]).float()
            loss = torch.nn.functional.cross_entropy(
                logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            grads = torch.autograd.grad(loss, inputs)
        ctx.save_for_backward(*grads)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        weight, hidden, *bias = (g * grad_loss for g in ctx.saved_tensors)
        return weight, hidden, None, bias[0] if bias else None


def torch_fused_cross_entropy(weight, hidden, targets, bias):
    """The kernel's call signature: (weight, hidden, targets, bias) -> summed loss."""
    return LigerLikeFusedLinearCrossEntropy.apply(weight, hidden, targets, bias)


def _prompt_masked_row(lengths, prompt=3, vocab=300):
    from ftkit.batching import flattening_collator

    generator = torch.Generator().manual_seed(1)
    features = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return flattening_collator()(features)


def _config(model_type):
    from test_batching import _tiny_config
    from transformers import Gemma2Config

    if model_type != "gemma2":
        return _tiny_config(model_type)
    # Gemma-2 soft-caps its logits after the head: lm_head(hidden) is not its logits
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8)
    values.update(num_attention_heads=4, num_key_value_heads=2, final_logit_softcapping=3.0)
    return Gemma2Config(vocab_size=300, **values)


@pytest.mark.parametrize("model_type", [*metrics.FUSED_HEAD_EXACT, "gemma2"])
def test_the_fused_head_loss_is_the_supervised_logits_loss(model_type):
    """Loss and every weight's gradient (head included), per architecture it is allowed for."""
    from transformers import AutoModelForCausalLM

    config = _config(model_type)
    config.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()  # no dropout draws
    batch = _prompt_masked_row((7, 9, 6))
    n = metrics.supervised_tokens(batch)
    results = []
    for loss_of in (
        lambda: metrics.supervised_logits_loss(model, batch, n),
        lambda: metrics.fused_head_loss(model, batch, n, torch_fused_cross_entropy),
    ):
        model.zero_grad(set_to_none=True)
        loss = loss_of().loss
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    worst = max(float((grads_a[k] - grads_b[k]).abs().max()) for k in grads_a)
    exact = abs(loss_a - loss_b) <= 1e-6 and grads_a.keys() == grads_b.keys() and worst <= 1e-6
    assert exact == (model_type in metrics.FUSED_HEAD_EXACT), (loss_a, loss_b, worst)


def test_trainer_with_the_fused_kernel_equals_supervised_logits(
    tiny_llama_dir, records, tmp_path, monkeypatch
):
    """The Trainer's liger path with the torch stand-in (CUDA and liger are what CPU lacks)."""
    common = dict(num_samples=6, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    common.update(max_steps=2, padding_free="true")
    reference = window_results(tiny_recipe(tiny_llama_dir, records, tmp_path, **common), 2)
    monkeypatch.setattr("ftkit.train.check_loss_kernel", lambda kernel: None)
    monkeypatch.setattr("ftkit.train.liger_cross_entropy", lambda: torch_fused_cross_entropy)
    recipe = tiny_recipe(tiny_llama_dir, records, tmp_path / "fused", loss_kernel="liger", **common)
    fused = window_results(recipe, 2)
    for a, b in zip(reference, fused, strict=True):
        assert_same(a, b, tol=1e-6)
    Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path / "run", loss_kernel="liger")).fit()
    throughput = json.loads((tmp_path / "run" / "metrics.json").read_text())["throughput"]
    assert throughput["logits_mode"] == "liger"
    assert 0 < throughput["logits_fraction"] < 1


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one mixed precision per process: start and leave this test with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_under_bf16_mixed_precision_the_fused_kernel_gets_one_dtype(
    tiny_llama_dir, records, tmp_path, monkeypatch, fresh_accelerate_state
):
    """`accelerate launch --mixed_precision bf16 --cpu` with a bf16 base: Accelerate returns the
    hidden states in fp32 beside the bf16 head, which the kernel (like liger on the GPU) refuses;
    the fused path hands it one dtype and equals supervised logits within bf16 rounding."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    common = dict(num_samples=4, per_device_train_batch_size=2, max_steps=2, padding_free="true")
    common.update(model_dtype="bf16")
    reference = window_results(tiny_recipe(tiny_llama_dir, records, tmp_path / "ref", **common))
    monkeypatch.setattr("ftkit.train.check_loss_kernel", lambda kernel: None)
    monkeypatch.setattr("ftkit.train.liger_cross_entropy", lambda: torch_fused_cross_entropy)
    recipe = tiny_recipe(tiny_llama_dir, records, tmp_path / "fused", loss_kernel="liger", **common)
    ((loss_a, grads_a),), ((loss_b, grads_b),) = reference, window_results(recipe)
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "bf16"
    assert abs(loss_a - loss_b) <= 1e-2 * abs(loss_a)  # bf16: 8 bits of mantissa
    for name, grad in grads_a.items():
        scale = float(grad.abs().max())
        assert float((grads_b[name] - grad).abs().max()) <= 5e-2 * scale, name


def test_under_fp16_autocast_the_fused_kernel_gets_one_dtype():
    """fp16 as Accelerate runs it (autocast around the forward, outputs upcast to fp32), where
    the CPU allows it: the function, not a launch (Accelerate takes fp16 on CUDA only)."""
    from accelerate.utils import convert_outputs_to_fp32
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("llama")).to(torch.float16).eval()
    model.forward = convert_outputs_to_fp32(
        torch.autocast("cpu", dtype=torch.float16)(model.forward)
    )
    batch = _prompt_masked_row((7, 9, 6))
    n = metrics.supervised_tokens(batch)
    reference = float(metrics.supervised_logits_loss(model, batch, n).loss)
    fused = float(metrics.fused_head_loss(model, batch, n, torch_fused_cross_entropy).loss)
    assert abs(fused - reference) <= 1e-2 * abs(reference)


@pytest.mark.parametrize(
    ("model_type", "targets", "sharded", "message"),
    [
        ("gemma2", ["q_proj"], False, "not proven exact for gemma2 models"),
        ("llama", ["q_proj", "lm_head"], False, "LoRA on lm_head would be skipped"),
        ("llama", ["q_proj", "v_proj"], True, "hold only a shard of it"),
    ],
)
def test_the_fused_kernel_refuses_what_it_would_get_wrong(model_type, targets, sharded, message):
    with pytest.raises(ConfigError, match=message):
        metrics.check_fused_head("liger", model_type, targets, sharded)
    metrics.check_fused_head("none", model_type, targets, sharded)  # nothing asked, nothing refused
