"""sdpa_varlen (one causal SDPA per sequence of a flattened row) equals transformers' SDPA."""

import json

import pytest
import torch
from helpers import HostReads, tiny_recipe, write_records
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


def reference_varlen_attn(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
    enable_gqa=False,
):  # fmt: skip
    """torch.nn.attention.varlen.varlen_attn's contract, written out: (T, H, D) rows cut at
    ``cu_seq_q``/``cu_seq_k``, ``window_size`` = (left, right) keys a query sees (-1: unbounded),
    grouped kv heads with ``enable_gqa``. The CUDA kernel's stand-in on CPU."""
    assert query.dim() == key.dim() == value.dim() == 3 and cu_seq_q.dtype == torch.int32
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    assert query.is_contiguous() and key.is_contiguous() and value.is_contiguous()
    lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
    assert max(lengths) == max_q
    groups = query.shape[1] // key.shape[1]
    assert groups == 1 or enable_gqa
    left, right = window_size
    outs = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (H, L, D)
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        pos = torch.arange(end - start)
        distance = pos[:, None] - pos[None, :]  # query - key
        mask = torch.ones_like(distance, dtype=torch.bool)
        if left >= 0:
            mask &= distance <= left
        if right >= 0:
            mask &= -distance <= right
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def varlen_kernel_on_cpu(monkeypatch):
    """The CUDA varlen path taken on CPU in fp32, through the reference kernel."""
    monkeypatch.setattr(attention, "torch_varlen_attn", lambda: reference_varlen_attn)
    monkeypatch.setattr(attention, "varlen_kernel_applies", lambda query, dropout: True)


@pytest.mark.parametrize(
    ("model_type", "window"),
    [("llama", None), ("qwen2", None), ("gemma", None), ("mistral", None), ("mistral", 4)],
)
def test_the_varlen_kernel_call_equals_per_sequence_sdpa(model_type, window, varlen_kernel_on_cpu):
    """Layouts, offsets, the causal flag, grouped heads (qwen2, gemma, mistral) and the window
    as varlen_attn takes them: logits and every gradient equal the per-sequence path's (which
    equals plain SDPA, above)."""
    config = _tiny_config(model_type)
    if window:
        config.sliding_window = window  # shorter than the 7- and 11-token sequences
    row = batching.flattening_collator()(
        [{**f, "labels": f["input_ids"]} for f in _features((7, 11, 1, 6))]
    )
    attention.reset_kernels_used()
    kernel = _logits_and_grads(_model(config, "sdpa_varlen"), row)
    assert attention.kernels_used() == [attention.VARLEN_KERNEL]
    with pytest.MonkeyPatch.context() as undo:
        undo.setattr(attention, "varlen_kernel_applies", lambda query, dropout: False)
        attention.reset_kernels_used()
        per_sequence = _logits_and_grads(_model(config, "sdpa_varlen"), row)
        assert attention.kernels_used() == [attention.PER_SEQUENCE]
    assert (kernel[0] - per_sequence[0]).abs().max() <= TOL
    worst = max(float((kernel[1][n] - per_sequence[1][n]).abs().max()) for n in kernel[1])
    assert worst <= TOL


def test_under_autocast_the_varlen_kernel_gets_the_autocast_dtype(varlen_kernel_on_cpu):
    """An fp32 base under bf16 mixed precision: SDPA would run in bf16 (autocast casts it), and
    so does the kernel, whose inputs must share one half dtype; the result is within bf16
    rounding of the per-sequence path under the same autocast."""
    seen = []

    def recording(query, key, value, *args, **kwargs):
        seen.append({query.dtype, key.dtype, value.dtype})
        return reference_varlen_attn(query, key, value, *args, **kwargs)

    config = _tiny_config("mistral")
    row = batching.flattening_collator()(
        [{**f, "labels": f["input_ids"]} for f in _features((7, 11, 6))]
    )
    row = {k: v for k, v in row.items() if k != "labels"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "torch_varlen_attn", lambda: recording)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            kernel = _model(config, "sdpa_varlen")(**row, use_cache=False).logits.float()
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "varlen_kernel_applies", lambda query, dropout: False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            per_sequence = _model(config, "sdpa_varlen")(**row, use_cache=False).logits.float()
    assert (kernel - per_sequence).abs().max() <= 5e-2 * per_sequence.abs().max()


def test_the_varlen_kernel_runs_only_where_flash_attention_can():
    query = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    assert not attention.varlen_kernel_applies(query, 0.0)  # CPU
    if torch.cuda.is_available():  # pragma: no cover - the CPU suite
        assert attention.varlen_kernel_applies(query.cuda(), 0.0) == (
            attention.torch_varlen_attn() is not None
        )
        assert not attention.varlen_kernel_applies(query.cuda().float(), 0.0)  # fp32
        assert not attention.varlen_kernel_applies(query.cuda(), 0.1)  # dropout


def _host_reads(model, row) -> int:
    """What would be host syncs on a GPU in one forward and backward."""
    with HostReads() as reads:
        _logits_and_grads(model, row)
    return reads.count


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "checkpointed"])
def test_the_row_is_read_from_the_device_once_per_forward_not_per_layer(gc):
    """On a GPU each read is a host sync; the cut points are read once, whatever the depth."""
    reads = {}
    for layers in (2, 6):
        row = batching.flattening_collator()(  # a fresh row: nothing read by the last model
            [{**f, "labels": f["input_ids"]} for f in _features((7, 9, 6))]
        )
        config = _tiny_config("llama")
        config.num_hidden_layers = layers
        model = _model(config, "sdpa_varlen")
        if gc:
            model.gradient_checkpointing_enable({"use_reentrant": False})
            model.train()
        reads[layers] = _host_reads(model, row)
    assert reads[2] == reads[6], reads


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
    kernels = {"true": [attention.PER_SEQUENCE], "false": []}  # CPU: no varlen kernel
    for setting, expected in (("true", "sdpa_varlen"), ("false", "sdpa")):
        out = tmp_path / setting
        recipe = tiny_recipe(tiny_llama_dir, records, out, padding_free=setting, max_steps=1)
        Trainer(recipe).fit()
        techniques = json.loads((out / "metrics.json").read_text())["techniques"]
        assert techniques["attn_implementation"] == expected
        assert techniques["attn_kernels"] == kernels[setting]


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


def test_metrics_record_the_varlen_kernel_where_it_ran(
    tiny_llama_dir, records, tmp_path, varlen_kernel_on_cpu
):
    Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path, padding_free="true", max_steps=1)).fit()
    techniques = json.loads((tmp_path / "metrics.json").read_text())["techniques"]
    assert techniques["attn_kernels"] == [attention.VARLEN_KERNEL]
