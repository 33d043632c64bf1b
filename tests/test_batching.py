"""Batching modes (padding-free rows, length-grouped batches) are exact: same loss, same gradients."""

import itertools
import json

import pytest
import torch
from helpers import tiny_recipe

from ftkit import batching, cli
from ftkit.config import Recipe
from ftkit.data import IGNORE_INDEX, collator
from ftkit.errors import ConfigError
from ftkit.metrics import supervised_tokens
from ftkit.train import Trainer

VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
TOL = 1e-5  # fp32: max |difference| allowed on losses and LoRA gradients


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def make_b_nonzero(trainer) -> None:
    """LoRA B starts at 0 (so A gets no gradient); give it seeded values so every grad is tested."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def window_results(recipe, n_windows=1) -> list[tuple[float, dict]]:
    """(loss, LoRA grads) of the first ``n_windows`` windows, all at the same (initial) weights."""
    trainer = Trainer(recipe)
    make_b_nonzero(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    results = []
    for window in trainer.windows():
        loss = float(trainer.backward_window(window))
        results.append((loss, lora_grads(model)))
        trainer.optimizer.zero_grad(set_to_none=True)
        if len(results) == n_windows:
            break
    return results


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def assert_same(result_a, result_b, tol=TOL):
    (loss_a, grads_a), (loss_b, grads_b) = result_a, result_b
    grad_diff = max_abs_diff(grads_a, grads_b)
    print(f"|Δloss| = {abs(loss_a - loss_b):.2e}  max |Δgrad| = {grad_diff:.2e}")
    assert abs(loss_a - loss_b) <= tol
    assert grad_diff <= tol
    assert all(g.abs().max() > 0 for g in grads_a.values())  # every LoRA tensor learns


# -- padding-free rows --------------------------------------------------------------------------


def test_flattened_row_masks_sequence_starts_and_keeps_the_supervised_count(
    tiny_llama_dir, records, tmp_path
):
    trainer = Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path, num_samples=4))
    features = [trainer.data.train[i] for i in range(3)]
    flat = batching.flattening_collator()(features)
    padded = collator(trainer.tokenizer)(features)
    # no attention mask (packed path); the boundaries are what sdpa_varlen cuts the row at
    assert set(flat) == {"input_ids", "labels", "position_ids", *VARLEN_KEYS}
    lengths = [len(f["input_ids"]) for f in features]
    assert flat["cu_seq_lens_q"].tolist() == [0, *itertools.accumulate(lengths)]
    assert flat["max_length_q"] == max(lengths)
    assert flat["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    expected_labels, expected_positions = [], []
    for f in features:
        # the first label of every sequence is masked: the shifted target at a boundary would
        # otherwise ask the previous sequence's last token to predict the next one's BOS
        expected_labels += [IGNORE_INDEX, *f["labels"][1:]]
        expected_positions += list(range(len(f["input_ids"])))
    assert flat["labels"][0].tolist() == expected_labels
    assert flat["position_ids"][0].tolist() == expected_positions
    assert features[0]["labels"][0] == IGNORE_INDEX  # the prompt mask already covers BOS
    assert int(supervised_tokens(flat)) == int(supervised_tokens(padded)) > 0
    assert int(batching.real_tokens(flat)) == int(batching.real_tokens(padded))
    assert batching.computed_tokens(flat) < batching.computed_tokens(padded)


@pytest.mark.parametrize("impl", ["peft", "ftkit"])
def test_padding_free_loss_and_grads_equal_the_padded_batch(
    tiny_llama_dir, records, tmp_path, impl
):
    common = dict(lora_impl=impl, num_samples=8, per_device_train_batch_size=8)
    padded = window_results(
        tiny_recipe(tiny_llama_dir, records, tmp_path, padding_free="false", **common)
    )
    flat_recipe = tiny_recipe(tiny_llama_dir, records, tmp_path, padding_free="true", **common)
    trainer = Trainer(flat_recipe)
    batch = next(trainer.windows())[0]
    assert batching.is_flattened(batch) and batch["input_ids"].shape[0] == 1
    assert_same(padded[0], window_results(flat_recipe)[0])


def test_padding_free_with_accumulation_and_a_partial_window(tiny_llama_dir, records, tmp_path):
    """6 records: padded 4x1 (windows of 4 and 2) == padding-free 2x2 (windows [2, 2] and [2])."""
    padded = window_results(
        tiny_recipe(
            tiny_llama_dir, records, tmp_path, num_samples=6, per_device_train_batch_size=4
        ),
        n_windows=2,
    )
    flat = window_results(
        tiny_recipe(
            tiny_llama_dir,
            records,
            tmp_path,
            num_samples=6,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            padding_free="true",
            max_steps=2,
        ),
        n_windows=2,
    )
    assert len(padded) == len(flat) == 2
    for a, b in zip(padded, flat, strict=True):
        assert_same(a, b)


def _row_logits(model, features, use_cache):
    batch = batching.flattening_collator()(features)
    with torch.no_grad():
        return model(**batch, use_cache=use_cache).logits[0]


@pytest.mark.parametrize("attn", ["sdpa", "auto"])
def test_changing_one_sequence_leaves_the_others_alone(tiny_llama_dir, records, tmp_path, attn):
    """Exact without a KV cache on both paths; with one, only sdpa_varlen (auto) stays exact."""
    recipe = tiny_recipe(tiny_llama_dir, records, tmp_path, num_samples=4, attn_implementation=attn)
    trainer = Trainer(recipe)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    features = [dict(trainer.data.train[i]) for i in range(3)]
    changed = [dict(f) for f in features]
    ids = list(changed[1]["input_ids"])
    changed[1]["input_ids"] = ids[:1] + [(t + 7) % 100 + 3 for t in ids[1:]]  # same length
    a, b = len(features[0]["input_ids"]), len(features[1]["input_ids"])
    others = torch.cat(
        [torch.arange(a), torch.arange(a + b, a + b + len(features[2]["input_ids"]))]
    )
    second = torch.arange(a, a + b)

    exact = _row_logits(model, features, use_cache=False)
    exact_changed = _row_logits(model, changed, use_cache=False)
    assert (exact_changed[second] - exact[second]).abs().max() > 1e-3  # the change is visible
    assert (exact_changed[others] - exact[others]).abs().max() <= 1e-6

    # With a KV cache transformers skips packed-sequence detection and under sdpa the third
    # sequence attends to the first two; sdpa_varlen cuts the row at cu_seq_lens regardless.
    cached = _row_logits(model, features, use_cache=True)
    cached_changed = _row_logits(model, changed, use_cache=True)
    exact_diff = float((exact_changed[others] - exact[others]).abs().max())
    cached_diff = float((cached_changed[others] - cached[others]).abs().max())
    print(f"other sequences' logits move by {exact_diff:.2e} (no cache), {cached_diff:.2e} (cache)")
    if attn == "sdpa":
        assert cached_diff > 1e-3
    else:
        assert cached_diff <= 1e-6


def _tiny_config(model_type: str):
    import transformers as tf

    small = dict(vocab_size=300, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "llama": (tf.LlamaConfig, dict(hidden_size=32, intermediate_size=64)),
        "mistral": (
            tf.MistralConfig,
            dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2),
        ),
        "qwen2": (
            tf.Qwen2Config,
            dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2),
        ),
        "gemma": (
            tf.GemmaConfig,
            dict(hidden_size=32, intermediate_size=64, head_dim=8, num_key_value_heads=1),
        ),
        "phi": (tf.PhiConfig, dict(hidden_size=32, intermediate_size=64)),
        "phi3": (tf.Phi3Config, dict(hidden_size=32, intermediate_size=64, pad_token_id=0)),
        "gpt2": (tf.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=300)),
        "opt": (tf.OPTConfig, dict(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32)),
        "bloom": (tf.BloomConfig, dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=300)),
    }
    cls, values = configs[model_type]
    if model_type in ("gpt2", "bloom"):
        return cls(**values)
    return cls(**small, **values)


@pytest.mark.parametrize("model_type", [*batching.PADDING_FREE_EXACT, "opt", "bloom"])
def test_padding_free_exactness_per_architecture(model_type):
    """The allow-list is measured: flattened rows isolate sequences exactly for the listed
    types; for OPT and BLOOM they do not, and padding_free true is refused there."""
    from transformers import AutoModelForCausalLM

    config = _tiny_config(model_type)
    config.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    features = [
        {
            "input_ids": torch.randint(3, 300, (n,), generator=generator).tolist(),
            "labels": [-100] * n,
        }
        for n in (7, 9, 6)
    ]
    changed = [
        features[0],
        {**features[1], "input_ids": [(t + 5) % 297 + 3 for t in features[1]["input_ids"]]},
        features[2],
    ]
    rows = [_row_logits(model, f, use_cache=False) for f in (features, changed)]
    moved = float((rows[0][16:] - rows[1][16:]).abs().max())  # the third sequence
    if model_type in batching.PADDING_FREE_EXACT:
        assert moved == 0.0
        assert batching.resolve_padding_free("auto", config) is True
    else:
        assert moved > 1e-4
        assert batching.resolve_padding_free("auto", config) is False
        with pytest.raises(ConfigError, match=f"not exact for {model_type}"):
            batching.resolve_padding_free("true", config)


def test_padding_free_is_refused_for_alibi_models(tiny_bloom_dir, records, tmp_path, capsys):
    with pytest.raises(ConfigError, match="ALiBi"):
        Trainer(tiny_recipe(tiny_bloom_dir, records, tmp_path, padding_free="true"))
    auto = Trainer(tiny_recipe(tiny_bloom_dir, records, tmp_path, padding_free="auto"))
    assert auto.padding_free is False
    capsys.readouterr()
    args = ["--model_name_or_path", str(tiny_bloom_dir), "--dataset", str(records)]
    code = cli.main(["train", *args, "--output_dir", str(tmp_path / "o"), "--padding_free", "true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ftkit error: padding_free")


def test_padding_free_field_values(tiny_llama_dir, records, tmp_path):
    assert Recipe().data.padding_free == "auto"  # the default: on where exact (LLaMA here)
    assert Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path, num_samples=4)).padding_free
    for value, expected in [(True, "true"), ("False", "false"), ("auto", "auto")]:
        recipe = tiny_recipe(tiny_llama_dir, records, tmp_path, padding_free=value)
        assert recipe.data.padding_free == expected
    with pytest.raises(ConfigError, match="padding_free='sometimes'"):
        tiny_recipe(tiny_llama_dir, records, tmp_path, padding_free="sometimes")


# -- length-grouped batches ---------------------------------------------------------------------


def epoch_batches(trainer, epoch) -> list[list[tuple[int, ...]]]:
    """The training batches of one epoch as lists of records (token tuples), via the prepared loader."""
    trainer.train_loader.set_epoch(epoch)
    return [
        [
            tuple(int(t) for t in row[row != trainer.tokenizer.pad_token_id])
            for row in b["input_ids"]
        ]
        for b in trainer.train_loader
    ]


def test_grouped_sampler_batches_by_length_and_shards_whole_batches():
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    lengths = [(7 * i) % 23 + 1 for i in range(37)]
    sampler = batching.LengthGroupedSampler(lengths, batch_size=4, seed=1, megabatch_batches=3)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(37))
    assert [len(b) for b in batches[:-1]] == [4] * 9 and len(batches[-1]) == 1  # short one last
    assert list(BatchSampler(sampler, 4, drop_last=False)) == batches
    for start in range(0, 36, 12):  # inside a mega-batch, batches do not overlap in length
        mega = batches[start // 4 : start // 4 + 3]
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in mega)
        assert all(hi1 <= lo2 for (_, hi1), (lo2, _) in itertools.pairwise(spans))
    sampler.set_epoch(1)
    assert sampler.batches() != batches
    # DDP: Accelerate deals whole grouped batches round robin to the processes
    shards = [
        list(BatchSamplerShard(BatchSampler(sampler, 4, False), 2, rank, even_batches=False))
        for rank in range(2)
    ]
    assert shards[0] == sampler.batches()[0::2] and shards[1] == sampler.batches()[1::2]


def test_grouped_epochs_are_permutations_reproducible_and_less_padded(
    tiny_llama_dir, records, tmp_path
):
    def trainer(seed, group=True):
        return Trainer(
            tiny_recipe(
                tiny_llama_dir,
                records,
                tmp_path,
                num_samples=16,
                group_by_length=group,
                seed=seed,
                padding_free="false",
            )
        )

    a, again, other, random = trainer(1), trainer(1), trainer(2), trainer(1, group=False)
    every = sorted(r for b in epoch_batches(random, 0) for r in b)
    seen = {}
    for epoch in (0, 1):
        batches = epoch_batches(a, epoch)
        assert sorted(r for b in batches for r in b) == every  # each record once per epoch
        assert batches == epoch_batches(again, epoch)  # reproducible from the seed
        seen[epoch] = batches
    assert seen[0] != seen[1] and seen[0] != epoch_batches(other, 0)

    def padded_tokens(t):
        t.train_loader.set_epoch(0)
        return sum(batching.computed_tokens(b) for b in t.train_loader)

    print(f"computed tokens: grouped {padded_tokens(a)}, random {padded_tokens(random)}")
    assert padded_tokens(a) < padded_tokens(random)


@pytest.mark.parametrize("n_records", [8, 7], ids=["full-window", "final-partial-window"])
def test_grouped_accumulation_equals_big_batch(tiny_llama_dir, records, tmp_path, n_records):
    results = {}
    for batch, ga in [(8, 1), (4, 2)]:
        recipe = tiny_recipe(
            tiny_llama_dir,
            records,
            tmp_path,
            num_samples=n_records,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga,
            group_by_length=True,
            padding_free="false",
        )
        results[batch] = window_results(recipe)[0]
    assert_same(results[8], results[4])


def lora_state(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["group_by_length", "padding_free"])
def test_resume_equals_straight_run_across_an_epoch(tiny_llama_dir, records, tmp_path, mode):
    """12 records x batch 4 = 3 batches an epoch: checkpoint at step 2, resume, run to step 5."""
    common = dict(
        num_samples=12,
        per_device_train_batch_size=4,
        max_steps=5,
        save_steps=2,
        save_total_limit=5,
        learning_rate=5e-3,
        group_by_length=True,
        padding_free="true" if mode == "padding_free" else "false",
    )
    straight = Trainer(tiny_recipe(tiny_llama_dir, records, tmp_path / "a", **common))
    straight.fit()
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    resumed = Trainer(
        tiny_recipe(
            tiny_llama_dir, records, tmp_path / "b", **common, resume_from_checkpoint=str(ckpt)
        )
    )
    resumed.fit()
    assert resumed.progress.step == 5
    a, b = lora_state(straight), lora_state(resumed)
    print(f"max |ΔW| = {max_abs_diff(a, b):.2e}")
    assert max_abs_diff(a, b) <= 1e-6


def test_metrics_record_padding_waste_per_mode(tiny_llama_dir, records, tmp_path):
    waste = {}
    for mode, fields in {
        "padded": {"padding_free": "false"},
        "group_by_length": {"group_by_length": True, "padding_free": "false"},
        "padding_free": {"padding_free": "true"},
    }.items():
        out = tmp_path / mode
        recipe = tiny_recipe(tiny_llama_dir, records, out, num_samples=16, max_steps=4, **fields)
        Trainer(recipe).fit()
        figures = json.loads((out / "metrics.json").read_text())["throughput"]
        assert figures["batching"] == mode
        assert figures["real_tokens"] * figures["padding_waste"] == pytest.approx(
            figures["computed_tokens"]
        )
        assert figures["tokens_per_s"] > figures["supervised_tokens_per_s"] > 0
        waste[mode] = figures["padding_waste"]
    print(waste)
    assert waste["padding_free"] == 1.0
    assert waste["padded"] > waste["group_by_length"] >= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["padding_free", "group_by_length"])
def test_ddp_two_processes_equal_one_process_with_the_same_batches(
    tiny_llama_dir, records, tmp_path, mode
):
    """2 CPU processes (gloo) x batch 2 x GA 2 == 1 process x batch 2 x GA 4, each step.

    The same per-device batch size gives the same global sequence of batches (Accelerate deals
    them round robin); 12 records = 6 batches: step 1 is a full window, step 2 a partial one
    (one micro-batch per rank). The loss is normalised by the window's supervised tokens summed
    over both processes, so the gradients match the single process's exactly.
    """
    from helpers import REPO, accelerate_launch

    fields = (
        {"padding_free": "true"}
        if mode == "padding_free"
        else {"group_by_length": True, "padding_free": "false"}
    )
    common = dict(
        num_samples=12, max_steps=2, per_device_train_batch_size=2, lora_dropout=0.0, **fields
    )
    args = []
    for key, value in {
        "model_name_or_path": tiny_llama_dir,
        "dataset": records,
        "validation_size": 0,
        "max_length": 320,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0,
        "gradient_accumulation_steps": 2,
        "output_dir": tmp_path / "ddp",
        **common,
    }.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
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
        ACCELERATE_USE_CPU="true",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single = Trainer(
        tiny_recipe(
            tiny_llama_dir, records, tmp_path / "one", gradient_accumulation_steps=4, **common
        )
    )
    model = single.accelerator.unwrap_model(single.model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for step, window in enumerate(single.windows(), start=1):
        rank0 = torch.load(dump / f"rank0_step{step}.pt")
        rank1 = torch.load(dump / f"rank1_step{step}.pt")
        for name in params:
            assert torch.equal(rank0["grads"][name], rank1["grads"][name]), name
        single.backward_window(window)
        diff = max_abs_diff(rank0["grads"], lora_grads(model))
        print(f"step {step}: max |Δgrad| DDP vs one process = {diff:.2e}")
        assert diff <= TOL
        single.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(rank0["weights"][name])
        if step == 2:
            break
    assert any(g.abs().max() > 0 for n, g in rank0["grads"].items() if "lora_A" in n)
