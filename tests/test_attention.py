"""sdpa_varlen (one causal SDPA per sequence of a flattened row) equals transformers' SDPA."""

import json

import pytest
import torch
from helpers import tiny_recipe, write_records
from test_batching import _tiny_config

from ftkit import attention, batching, cli
from ftkit.data import collator
from ftkit.errors import ConfigError
from ftkit.train import Trainer

TOL = 1e-6  # fp32: max |difference| of logits and gradients


def _model(config, attn: str | None):
    from transformers import AutoModelForCausalLM

    name = attention.resolve(attn, padding_free=True) if attn else None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    model.config.use_cache = False
    return model.eval()  # no dropout (GPT-2's defaults have it): the two paths draw differently


def _features(lengths, vocab=300):
    generator = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(3, vocab, (n,), generator=generator).tolist(), "labels": []}
        for n in lengths
    ]


def _logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    batch = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**batch, use_cache=False).logits
    (logits.float() ** 2).mean().backward()  # every position's logits reach the gradient
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("model_type", batching.PADDING_FREE_EXACT)
def test_varlen_equals_sdpa_on_a_flattened_row_per_architecture(model_type):
    """Logits and every weight's gradient, GQA included (mistral, qwen2, gemma)."""
    config = _tiny_config(model_type)
    features = [{**f, "labels": f["input_ids"]} for f in _features((7, 9, 1, 6))]
    row = batching.flattening_collator()(features)
    reference = _logits_and_grads(_model(config, None), row)
    varlen = _logits_and_grads(_model(config, "sdpa_varlen"), row)
    assert (varlen[0] - reference[0]).abs().max() <= TOL
    assert reference[1].keys() == varlen[1].keys()
    worst = max(float((varlen[1][n] - reference[1][n]).abs().max()) for n in reference[1])
    assert worst <= TOL


def test_varlen_keeps_the_sliding_window():
    """A sequence longer than the window is windowed exactly as transformers' mask does."""
    config = _tiny_config("mistral")
    config.sliding_window = 4
    features = [{**f, "labels": f["input_ids"]} for f in _features((11, 3, 9))]
    row = batching.flattening_collator()(features)
    reference = _logits_and_grads(_model(config, None), row)
    varlen = _logits_and_grads(_model(config, "sdpa_varlen"), row)
    assert (varlen[0] - reference[0]).abs().max() <= TOL
    unwindowed = _tiny_config("mistral")
    unwindowed.sliding_window = None
    full = _logits_and_grads(_model(unwindowed, None), row)
    assert (full[0] - reference[0]).abs().max() > 1e-4  # the window is visible at all


def test_a_padded_batch_through_the_varlen_model_is_plain_sdpa(tiny_llama_dir):
    """Evaluation batches (right-padded, with a mask) take transformers' own SDPA path."""
    from ftkit.modeling import load_tokenizer

    config = _tiny_config("llama")
    features = [{**f, "labels": f["input_ids"]} for f in _features((5, 9, 2))]
    batch = collator(load_tokenizer(str(tiny_llama_dir)))(features)
    assert not batch["attention_mask"].all()  # padding is there to be masked
    reference = _logits_and_grads(_model(config, None), batch)
    varlen = _logits_and_grads(_model(config, "sdpa_varlen"), batch)
    assert torch.equal(varlen[0], reference[0])
    assert all(torch.equal(varlen[1][n], g) for n, g in reference[1].items())


@pytest.fixture(scope="module")
def records(tmp_path_factory, alpaca_path):
    return write_records(tmp_path_factory.mktemp("data") / "alpaca8.json", 8, alpaca_path)


def test_auto_picks_varlen_for_padding_free_and_metrics_say_so(tiny_llama_dir, records, tmp_path):
    for setting, expected in (("true", "sdpa_varlen"), ("false", "sdpa")):
        out = tmp_path / setting
        recipe = tiny_recipe(tiny_llama_dir, records, out, padding_free=setting, max_steps=1)
        Trainer(recipe).fit()
        techniques = json.loads((out / "metrics.json").read_text())["techniques"]
        assert techniques["attn_implementation"] == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--attn_implementation", "sdpa_varlen", "--padding_free", "false"],
            "ftkit error: attn_implementation sdpa_varlen attends per sequence",
        ),
        (
            ["--attn_implementation", "flash_attention_2"],
            "ftkit error: attn_implementation flash_attention_2 needs a CUDA GPU",
        ),
        (["--attn_implementation", "flash"], "ftkit error: attn_implementation='flash'"),
    ],
)
def test_impossible_attention_is_one_line_before_loading(
    capsys, monkeypatch, tmp_path, argv, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["train", *argv, "--max_steps", "1", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "ftkit_run.json").exists()


def test_resolve():
    assert attention.resolve("auto", padding_free=False) is None
    assert attention.resolve("sdpa", padding_free=True) == "sdpa"
    assert attention.resolve("auto", padding_free=True) == attention.REGISTERED_NAME
    with pytest.raises(ConfigError, match="needs padding-free batches"):
        attention.resolve("sdpa_varlen", padding_free=False)
