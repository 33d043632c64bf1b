"""supervised_logits_only: the LM head runs only where the loss looks, with the same loss and grads."""

import json
import logging

import pytest
import torch
from helpers import tiny_recipe, write_records
from test_batching import TOL, assert_same, window_results

from ftkit import cli, metrics
from ftkit.errors import ConfigError
from ftkit.metrics import supervised_positions
from ftkit.train import Trainer


@pytest.fixture(scope="module")
def records(tmp_path_factory, alpaca_path):
    return write_records(tmp_path_factory.mktemp("data") / "alpaca16.json", 16, alpaca_path)


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
