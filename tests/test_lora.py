"""ftkit LoRA: exactness against the base model, merge algebra, PEFT parity and adapter I/O."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from ftkit import adapters, lora
from ftkit.config import ModelConfig
from ftkit.meter import parameter_counts, trainable_parameters_line
from ftkit.modeling import keep_4bit_weights_trainable, quantization_config

R, ALPHA, VOCAB, HIDDEN, LAYERS, HEADS = 4, 8, 64, 32, 2, 4
SRC_DIR = Path(lora.__file__).resolve().parents[1]


def _llama_config(hidden=HIDDEN):
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=64,
    )


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(_llama_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bloom")
    config = BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    BloomForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def llama(llama_dir):
    return LlamaForCausalLM.from_pretrained(llama_dir)


@pytest.fixture
def bloom(bloom_dir):
    return BloomForCausalLM.from_pretrained(bloom_dir)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _randomise_adapters(model, seed=0):
    """Non-zero A and B everywhere, so the adapter actually changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _trainable(model):
    return [param for param in model.parameters() if param.requires_grad]


def _train(model, ids, steps, lr=1e-2):
    optimizer = torch.optim.AdamW(_trainable(model), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _base_weights(model):
    return {
        name: layer.base_layer.weight.detach().clone() for name, layer in lora.lora_layers(model)
    }


def test_output_equals_base_at_init(llama, ids):
    expected = _logits(llama, ids)
    matched = lora.apply_lora(llama, r=R, alpha=ALPHA, dropout=0.1)
    assert matched == [
        f"model.layers.{i}.self_attn.{proj}" for i in range(LAYERS) for proj in ("q_proj", "v_proj")
    ]
    assert torch.equal(_logits(llama, ids), expected)
    for _, layer in lora.lora_layers(llama):
        assert layer.scaling == ALPHA / R
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        assert torch.count_nonzero(layer.lora_A.weight) == layer.lora_A.weight.numel()


def test_wrappers_follow_the_model_train_eval_mode(llama, ids):
    assert not llama.training  # from_pretrained returns an eval-mode model
    lora.apply_lora(llama, r=R, alpha=ALPHA, dropout=0.5)
    _randomise_adapters(llama)
    assert torch.equal(_logits(llama, ids), _logits(llama, ids))  # no adapter dropout
    llama.train()
    assert not torch.equal(_logits(llama, ids), _logits(llama, ids))


def test_gradients_reach_only_lora_parameters(llama, ids):
    lora.apply_lora(llama, r=R, alpha=ALPHA, dropout=0.0)
    lora_names = {key.removeprefix("base_model.model.") for key in lora.lora_state_dict(llama)}
    trainable_names = {name for name, param in llama.named_parameters() if param.requires_grad}
    assert trainable_names == lora_names and len(lora_names) == 2 * 2 * LAYERS
    llama(ids, labels=ids).loss.backward()
    for name, param in llama.named_parameters():
        if name in lora_names:
            assert param.grad is not None
        else:
            assert param.grad is None, name
    for _, layer in lora.lora_layers(llama):
        assert layer.lora_B.weight.grad.abs().sum() > 0


def test_trainable_count_is_closed_form_and_line_matches_peft(llama_dir, capsys):
    ftkit_model = LlamaForCausalLM.from_pretrained(llama_dir)
    lora.apply_lora(ftkit_model, r=R, alpha=ALPHA, dropout=0.0)
    trainable = sum(param.numel() for param in _trainable(ftkit_model))
    # r * (d_in + d_out) per adapted module, q_proj and v_proj in every layer
    assert trainable == LAYERS * 2 * R * (HIDDEN + HIDDEN)

    peft_model = peft.get_peft_model(
        LlamaForCausalLM.from_pretrained(llama_dir),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]),
    )
    capsys.readouterr()
    peft_model.print_trainable_parameters()
    line = trainable_parameters_line(*parameter_counts(ftkit_model))
    assert line == capsys.readouterr().out.strip()
    assert line.startswith(f"trainable params: {trainable:,d} || all params: ")


def test_bloom_qv_only_trainable_count_is_closed_form(bloom):
    lora.apply_lora(bloom, r=R, alpha=ALPHA, dropout=0.0)
    # A: r x hidden; B: only the q and v rows, 2 * hidden of the fused 3 * hidden.
    assert sum(param.numel() for param in _trainable(bloom)) == LAYERS * R * (HIDDEN + 2 * HIDDEN)
    for _, layer in lora.lora_layers(bloom):
        assert layer.lora_B.weight.shape == (2 * HIDDEN, R)


@pytest.mark.parametrize(
    "family, targets",
    [("llama", None), ("llama", ["embed_tokens", "down_proj"]), ("bloom", None)],
)
def test_merge_and_unmerge_preserve_the_function(family, targets, request, ids):
    model = request.getfixturevalue(family)
    plain = _logits(model, ids)
    lora.apply_lora(model, r=R, alpha=ALPHA, dropout=0.0, target_modules=targets)
    _randomise_adapters(model)
    base = _base_weights(model)
    adapted = _logits(model, ids)
    assert (adapted - plain).abs().max() > 1e-2  # the adapter matters

    lora.merge_lora(model)
    merged = _base_weights(model)
    assert all(layer.merged for _, layer in lora.lora_layers(model))
    assert all(not torch.equal(merged[name], base[name]) for name in base)
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=0)

    lora.merge_lora(model)  # idempotent: nothing is added twice
    assert all(torch.equal(weight, merged[name]) for name, weight in _base_weights(model).items())

    lora.unmerge_lora(model)
    restored = _base_weights(model)
    assert not any(layer.merged for _, layer in lora.lora_layers(model))
    for name in base:
        torch.testing.assert_close(restored[name], base[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=0)

    lora.unmerge_lora(model)  # idempotent
    assert all(torch.equal(weight, restored[name]) for name, weight in _base_weights(model).items())


def test_safe_merge_refuses_non_finite_weights_and_merges_nothing(llama):
    lora.apply_lora(llama, r=R, alpha=ALPHA, dropout=0.0)
    _randomise_adapters(llama)
    with torch.no_grad():
        llama.model.layers[1].self_attn.v_proj.lora_B.weight[0, 0] = float("nan")
    base = _base_weights(llama)
    with pytest.raises(lora.LoraMergeError, match=r"layers\.1\.self_attn\.v_proj.*NaN"):
        lora.merge_lora(llama, safe_merge=True)
    assert not any(layer.merged for _, layer in lora.lora_layers(llama))
    assert all(torch.equal(weight, base[name]) for name, weight in _base_weights(llama).items())


def test_unload_returns_plain_model_with_merged_weights(llama, ids):
    lora.apply_lora(llama, r=R, alpha=ALPHA, dropout=0.0)
    _randomise_adapters(llama)
    adapted = _logits(llama, ids)
    unloaded = lora.unload_lora(llama)
    assert unloaded is llama
    assert next(lora.lora_layers(llama), None) is None
    assert type(llama.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any("lora_" in name for name in llama.state_dict())
    torch.testing.assert_close(_logits(llama, ids), adapted, atol=1e-5, rtol=0)


def test_embedding_variant_follows_peft_convention_and_equals_base_at_init(llama, ids):
    expected = _logits(llama, ids)
    lora.apply_lora(llama, r=R, alpha=ALPHA, dropout=0.0, target_modules=["embed_tokens"])
    layer = llama.model.embed_tokens
    assert isinstance(layer, lora.LoraEmbedding)
    assert layer.lora_embedding_A.shape == (R, VOCAB)
    assert layer.lora_embedding_B.shape == (HIDDEN, R)
    assert torch.count_nonzero(layer.lora_embedding_A) == 0
    assert torch.count_nonzero(layer.lora_embedding_B) == HIDDEN * R
    assert torch.equal(_logits(llama, ids), expected)
    assert set(lora.lora_state_dict(llama)) == {
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
    }


def test_adapter_stays_fp32_on_a_half_precision_base():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = lora.LoraLinear(base, r=R, alpha=ALPHA)
    nn.init.normal_(layer.lora_B.weight)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    delta = x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T * layer.scaling
    torch.testing.assert_close(out, base(x) + delta.to(torch.bfloat16), atol=1e-2, rtol=1e-2)


def test_lora_state_dict_has_peft_keys_and_values(llama_dir):
    torch.manual_seed(3)
    ftkit_model = LlamaForCausalLM.from_pretrained(llama_dir)
    lora.apply_lora(ftkit_model, r=R, alpha=ALPHA, dropout=0.0)
    peft_model = peft.get_peft_model(
        LlamaForCausalLM.from_pretrained(llama_dir),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]),
    )
    ours, theirs = lora.lora_state_dict(ftkit_model), peft.get_peft_model_state_dict(peft_model)
    assert list(ours) == list(theirs)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours
    assert all(ours[key].shape == theirs[key].shape for key in ours)


@pytest.mark.parametrize(
    "targets, init, use_rslora",
    [
        (["q_proj", "v_proj"], "kaiming", False),
        (["embed_tokens", "q_proj", "v_proj", "down_proj"], "gaussian", True),
    ],
)
def test_training_parity_with_peft(llama_dir, ids, targets, init, use_rslora):
    ftkit_model = LlamaForCausalLM.from_pretrained(llama_dir)
    peft_model = LlamaForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(1234)
    lora.apply_lora(
        ftkit_model,
        r=R,
        alpha=ALPHA,
        dropout=0.0,
        target_modules=targets,
        use_rslora=use_rslora,
        init=init,
    )
    torch.manual_seed(1234)
    peft_config = peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=targets,
        lora_dropout=0.0,
        use_rslora=use_rslora,
        init_lora_weights=True if init == "kaiming" else init,
    )
    peft_model = peft.get_peft_model(peft_model, peft_config)

    def peft_tensors():
        return peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)

    initial = {key: tensor.clone() for key, tensor in lora.lora_state_dict(ftkit_model).items()}
    assert list(initial) == list(peft_tensors())
    for key, tensor in peft_tensors().items():
        assert torch.equal(initial[key], tensor), key  # bit-identical init from the same seed

    assert torch.equal(_logits(ftkit_model, ids), _logits(peft_model, ids))
    ftkit_model(ids, labels=ids).loss.backward()
    peft_model(ids, labels=ids).loss.backward()
    peft_grads = {
        name: param.grad for name, param in peft_model.named_parameters() if param.requires_grad
    }
    ftkit_grads = [param.grad for param in _trainable(ftkit_model)]
    assert len(ftkit_grads) == len(peft_grads)
    for ours, theirs in zip(ftkit_grads, peft_grads.values(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=0)
    ftkit_model.zero_grad()
    peft_model.zero_grad()

    ftkit_losses = _train(ftkit_model, ids, steps=20)
    peft_losses = _train(peft_model, ids, steps=20)
    assert ftkit_losses[-1] < ftkit_losses[0] - 0.1  # it did learn
    assert max(abs(a - b) for a, b in zip(ftkit_losses, peft_losses, strict=True)) <= 1e-5
    final = lora.lora_state_dict(ftkit_model)
    for key, tensor in peft_tensors().items():
        assert not torch.equal(final[key], initial[key]), key
        torch.testing.assert_close(final[key], tensor, atol=1e-6, rtol=0)


def test_bloom_whole_matrix_mode_matches_peft(bloom_dir, ids):
    ftkit_model = BloomForCausalLM.from_pretrained(bloom_dir)
    peft_model = BloomForCausalLM.from_pretrained(bloom_dir)
    torch.manual_seed(7)
    lora.apply_lora(
        ftkit_model,
        r=R,
        alpha=ALPHA,
        dropout=0.0,
        target_modules=["query_key_value"],
        bloom_qv_only=False,
    )
    torch.manual_seed(7)
    peft_config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query_key_value"])
    peft_model = peft.get_peft_model(peft_model, peft_config)
    theirs = peft.get_peft_model_state_dict(peft_model)
    ours = lora.lora_state_dict(ftkit_model)
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert _train(ftkit_model, ids, steps=3) == _train(peft_model, ids, steps=3)


def test_peft_loads_ftkit_adapter_with_identical_logits(llama, llama_dir, ids, tmp_path):
    lora.apply_lora(
        llama, r=R, alpha=ALPHA, dropout=0.05, target_modules=["embed_tokens", "q_proj", "v_proj"]
    )
    _randomise_adapters(llama)
    llama.eval()
    out_dir = adapters.save_adapter(
        llama, tmp_path / "adapter", base_model_name_or_path="tiny-llama"
    )
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checksums.sha256",
    ]
    config = peft.PeftConfig.from_pretrained(out_dir)
    assert (config.peft_type, config.task_type, config.r, config.lora_alpha) == (
        peft.PeftType.LORA,
        "CAUSAL_LM",
        R,
        ALPHA,
    )
    assert (config.lora_dropout, config.base_model_name_or_path) == (0.05, "tiny-llama")
    assert set(config.target_modules) == {"embed_tokens", "q_proj", "v_proj"}

    peft_model = peft.PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(llama_dir), out_dir
    )
    assert torch.equal(_logits(peft_model, ids), _logits(llama, ids))


@pytest.mark.slow
def test_ftkit_loads_peft_adapter_with_identical_logits(llama_dir, ids, tmp_path):
    peft_model = peft.get_peft_model(
        LlamaForCausalLM.from_pretrained(llama_dir),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["embed_tokens", "q_proj", "v_proj"]),
    )
    _randomise_adapters(peft_model, seed=5)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft-adapter")

    model = LlamaForCausalLM.from_pretrained(llama_dir)
    matched = adapters.load_adapter(model, tmp_path / "peft-adapter")
    assert matched[0] == "model.embed_tokens" and len(matched) == 1 + 2 * LAYERS
    model.eval()
    assert torch.equal(_logits(model, ids), _logits(peft_model, ids))
    theirs = peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    ours = lora.lora_state_dict(model)
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


_RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from ftkit import adapters, lora

    model_dir, adapter_dir, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    adapters.load_adapter(model, adapter_dir)
    model.eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    save_file({**lora.lora_state_dict(model), "logits": logits.contiguous()}, out_file)
    """
)


def _reload_in_fresh_process(model_dir, adapter_dir, out_file):
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-c",
        _RELOAD_SCRIPT,
        str(model_dir),
        str(adapter_dir),
        str(out_file),
    ]
    subprocess.run(command, check=True, env=env, timeout=60)
    return load_file(out_file)


@pytest.mark.slow
def test_round_trip_in_a_fresh_process_is_bit_identical(llama, llama_dir, ids, tmp_path):
    lora.apply_lora(llama, r=R, alpha=ALPHA, dropout=0.0, use_rslora=True)
    _train(llama, ids, steps=2)
    adapters.save_adapter(llama, tmp_path / "adapter", base_model_name_or_path=str(llama_dir))
    reloaded = _reload_in_fresh_process(llama_dir, tmp_path / "adapter", tmp_path / "out.st")
    assert torch.equal(reloaded.pop("logits"), _logits(llama, ids))
    saved = lora.lora_state_dict(llama)
    assert set(reloaded) == set(saved)
    assert all(torch.equal(reloaded[key], saved[key]) for key in saved)


def test_bloom_qv_only_leaves_k_untouched_and_round_trips(bloom, bloom_dir, ids, tmp_path):
    lora.apply_lora(bloom, r=R, alpha=ALPHA, dropout=0.0)  # q/v-only is BLOOM's default
    losses = _train(bloom, ids, steps=3)
    assert all(math.isfinite(loss) for loss in losses)
    head_dim = HIDDEN // HEADS
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    for name, layer in lora.lora_layers(bloom):
        with torch.no_grad():
            delta = (layer(x) - layer.base_layer(x)).view(5, HEADS, 3, head_dim)
        assert torch.count_nonzero(delta[:, :, 1]) == 0, name  # k: exactly zero
        for part in (0, 2):  # q and v: changed in every head
            assert (delta[:, :, part].abs().amax(dim=(0, 2)) > 0).all(), name

    out_dir = adapters.save_adapter(bloom, tmp_path / "qv", base_model_name_or_path=str(bloom_dir))
    assert not (out_dir / "adapter_config.json").exists()  # no PEFT loader takes it for its own
    config = json.loads((out_dir / "ftkit_adapter_config.json").read_text())
    assert (config["format"], config["bloom_qv_only"], config["r"]) == ("ftkit-lora", True, R)
    reloaded = _reload_in_fresh_process(bloom_dir, out_dir, tmp_path / "out.st")
    assert torch.equal(reloaded.pop("logits"), _logits(bloom, ids))
    saved = lora.lora_state_dict(bloom)
    assert set(reloaded) == set(saved)
    assert all(torch.equal(reloaded[key], saved[key]) for key in saved)

    base = _base_weights(bloom)
    lora.merge_lora(bloom)
    for name, weight in _base_weights(bloom).items():
        rows = weight.view(HEADS, 3, head_dim, HIDDEN)
        base_rows = base[name].view(HEADS, 3, head_dim, HIDDEN)
        assert torch.equal(rows[:, 1], base_rows[:, 1])
        assert not torch.equal(rows[:, 0], base_rows[:, 0])
        assert not torch.equal(rows[:, 2], base_rows[:, 2])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_base_trains_and_refuses_to_merge(llama_dir, ids, bits):
    pytest.importorskip("bitsandbytes")
    # ftkit's own quantisation settings (NF4 + double quant for 4-bit): what a run loads
    quantization = quantization_config(ModelConfig(**{f"load_in_{bits}bit": True}))
    model = LlamaForCausalLM.from_pretrained(
        llama_dir, quantization_config=quantization, device_map="cpu"
    )
    keep_4bit_weights_trainable(model)  # as ftkit's loader does: eval first, then train
    assert (
        type(model.model.layers[0].self_attn.q_proj).__name__
        == {
            8: "Linear8bitLt",
            4: "Linear4bit",
        }[bits]
    )
    expected = _logits(model, ids)
    lora.apply_lora(model, r=R, alpha=ALPHA, dropout=0.0)
    assert torch.equal(_logits(model, ids), expected)
    before = {key: tensor.clone() for key, tensor in lora.lora_state_dict(model).items()}
    losses = _train(model, ids, steps=3)
    assert all(math.isfinite(loss) for loss in losses)
    after = lora.lora_state_dict(model)
    assert [key for key in before if torch.equal(after[key], before[key])] == []
    with pytest.raises(lora.LoraMergeError, match="full precision"):
        lora.merge_lora(model)
    assert not any(layer.merged for _, layer in lora.lora_layers(model))


def test_unknown_target_lists_candidates_and_leaves_model_untouched(llama):
    with pytest.raises(lora.LoraTargetError) as excinfo:
        lora.apply_lora(llama, r=R, alpha=ALPHA, dropout=0.0, target_modules=["q_proj", "qkv"])
    message = str(excinfo.value)
    assert "--lora_target qkv matches no" in message and "target_modules" not in message
    for candidate in ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"):
        assert candidate in message
    assert next(lora.lora_layers(llama), None) is None
    assert all(param.requires_grad for param in llama.parameters())


def test_unknown_architecture_needs_explicit_targets(llama):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    gpt2.config.model_type = "no-such-architecture"  # known to neither ftkit nor PEFT
    with pytest.raises(
        lora.LoraTargetError,
        match=r"'no-such-architecture'.*--lora_target all-linear.*\['c_attn', 'c_fc', 'c_proj'",
    ):
        lora.apply_lora(gpt2, r=R, alpha=ALPHA, dropout=0.0)
    with pytest.raises(ValueError, match="bloom_qv_only=True needs a BLOOM model"):
        lora.apply_lora(llama, r=R, alpha=ALPHA, dropout=0.0, bloom_qv_only=True)


def test_invalid_setting_injects_nothing(llama):
    with pytest.raises(ValueError, match="unknown LoRA init 'xavier'"):
        # embed_tokens is wrapped first; the error comes from q_proj, after it
        lora.apply_lora(
            llama,
            r=R,
            alpha=ALPHA,
            dropout=0.0,
            target_modules=["embed_tokens", "q_proj"],
            init="xavier",
        )
    assert next(lora.lora_layers(llama), None) is None
    assert type(llama.model.embed_tokens) is nn.Embedding


def test_adapter_write_is_atomic(llama, tmp_path, monkeypatch):
    lora.apply_lora(llama, r=R, alpha=ALPHA, dropout=0.0)
    out_dir = adapters.save_adapter(llama, tmp_path / "adapter", base_model_name_or_path="x")
    original = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    real_save_file = adapters.save_file

    def save_then_crash(*args, **kwargs):
        real_save_file(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", save_then_crash)
    _randomise_adapters(llama)
    for target in (tmp_path / "adapter", tmp_path / "fresh"):
        with pytest.raises(OSError, match="disk full"):
            adapters.save_adapter(llama, target, base_model_name_or_path="x")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == original


def test_load_adapter_errors_name_the_path_and_the_fix(llama, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(adapters.AdapterError, match=f"{re.escape(str(missing))}.*does not exist"):
        adapters.load_adapter(llama, missing)

    (tmp_path / "empty").mkdir()
    with pytest.raises(adapters.AdapterError, match=r"neither adapter_config\.json nor"):
        adapters.load_adapter(llama, tmp_path / "empty")

    other_base = LlamaForCausalLM(_llama_config(hidden=48))
    lora.apply_lora(other_base, r=R, alpha=ALPHA, dropout=0.0)
    good = adapters.save_adapter(
        other_base, tmp_path / "wide", base_model_name_or_path="wide-llama"
    )
    with pytest.raises(
        adapters.AdapterError,
        match=r"has shape \(.*48.*\) but this model needs \(.*32.*\).*another base",
    ):
        adapters.load_adapter(llama, good)
    assert next(lora.lora_layers(llama), None) is None

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    with pytest.raises(adapters.AdapterError, match=r"adapter_model\.safetensors is missing"):
        adapters.load_adapter(llama, no_weights)

    config = json.loads((good / "adapter_config.json").read_text())
    (no_weights / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(adapters.AdapterError, match=r"\['use_dora'\].*PeftModel.from_pretrained"):
        adapters.load_adapter(llama, no_weights)


@pytest.mark.slow
def test_importing_ftkit_lora_does_not_need_bitsandbytes():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None  # any import of it now fails
        from torch import nn
        from ftkit import adapters, lora
        model = nn.Sequential(nn.Linear(4, 4))
        assert lora.apply_lora(model, r=2, alpha=2, dropout=0.0, target_modules=["0"]) == ["0"]
        lora.merge_lora(model)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=60)
