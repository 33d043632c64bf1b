"""Any causal LM PEFT knows: default targets from PEFT's mapping, all-linear, Conv1D (GPT-2) LoRA.

Tiny Mistral, Qwen2, GPT-2, Phi and OPT built from configs, saved and loaded back through
``from_pretrained``; each trains 3 steps with no ``--lora_target`` and its adapter reloads in PEFT
with identical logits.
"""

import json

import pytest
import torch
from helpers import tiny_recipe, write_records
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from tiny_archs import embedded_tokenizer, save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from ftkit import adapters, lora
from ftkit.train import Trainer

ARCHS = ("mistral", "qwen2", "gpt2", "phi", "opt")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain_dirs(tmp_path_factory):
    """Every architecture with the embedded tokenizer (it has a pad token): targets only."""
    return {
        arch: save_tiny(arch, tmp_path_factory.mktemp(f"plain-{arch}"), embedded_tokenizer())
        for arch in ARCHS
    }


@pytest.fixture(scope="module")
def records(tmp_path_factory, alpaca_path):
    return write_records(tmp_path_factory.mktemp("data") / "alpaca8.json", 8, alpaca_path)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_are_peft_s_mapping(plain_dirs, arch):
    model = _load(plain_dirs[arch])
    assert lora.resolve_targets(model, None) == tuple(PEFT_TARGETS[model.config.model_type])


def test_llama_and_bloom_keep_ftkit_s_defaults(tiny_llama_dir, tiny_bloom_dir):
    assert lora.resolve_targets(_load(tiny_llama_dir), None) == ("q_proj", "v_proj")
    assert lora.resolve_targets(_load(tiny_bloom_dir), None) == ("query_key_value",)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_selects_what_peft_selects(plain_dirs, arch):
    ours = lora.resolve_targets(_load(plain_dirs[arch]), ["all-linear"])
    peft_model = get_peft_model(
        _load(plain_dirs[arch]), LoraConfig(r=2, target_modules="all-linear")
    )
    theirs = peft_model.peft_config["default"].target_modules
    assert sorted(ours) == sorted(theirs)
    assert not any(name.endswith(("lm_head", "embed_out")) for name in ours)


def test_a_target_matching_nothing_names_the_flag_and_the_linear_modules(plain_dirs):
    model = _load(plain_dirs["gpt2"])
    with pytest.raises(lora.LoraTargetError) as excinfo:
        lora.apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    message = str(excinfo.value)
    assert "--lora_target q_proj" in message and "target_modules" not in message
    assert "['c_attn', 'c_fc', 'c_proj', 'lm_head']" in message


def test_conv1d_lora_matches_peft_and_saves_fan_in_fan_out(plain_dirs, tmp_path):
    """GPT-2's Conv1D: same init, same training, PEFT's format, identical logits in PEFT."""
    ids = torch.randint(0, 600, (2, 9), generator=torch.Generator().manual_seed(0))
    ours, theirs = _load(plain_dirs["gpt2"]), _load(plain_dirs["gpt2"])
    torch.manual_seed(1)
    wrapped = lora.apply_lora(ours, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=wrapped, fan_in_fan_out=True)
    theirs = get_peft_model(theirs, config)
    assert all(isinstance(layer.base_layer, Conv1D) for _, layer in lora.lora_layers(ours))
    for model in (ours, theirs):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        expected = theirs(ids).logits
        assert torch.allclose(ours(ids).logits, expected, atol=1e-5)
    adapters.save_adapter(ours, tmp_path / "a", base_model_name_or_path=str(plain_dirs["gpt2"]))
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True
    reloaded = PeftModel.from_pretrained(_load(plain_dirs["gpt2"]), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ours(ids).logits)
        lora.merge_lora(ours)  # merge transposes the update into the (in, out) weight
        assert torch.allclose(ours(ids).logits, expected, atol=1e-5)
    again = _load(plain_dirs["gpt2"])
    adapters.load_adapter(again, tmp_path / "a")  # and ftkit reads PEFT's fan_in_fan_out adapter
    with torch.no_grad():
        assert torch.equal(again(ids).logits, reloaded(ids).logits)


def _train_and_reload(model_dir, dataset, out, impl, **overrides):
    recipe = tiny_recipe(model_dir, dataset, out, lora_impl=impl, max_steps=3, **overrides)
    trainer = Trainer(recipe)
    result = trainer.fit()
    assert result.metrics["steps"] == 3 and result.metrics["train_loss"] > 0
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    probe = tokenizer("Name a colour.", return_tensors="pt")
    base_dir = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    reloaded = PeftModel.from_pretrained(_load(base_dir), out).eval()
    if len(tokenizer) != reloaded.get_input_embeddings().num_embeddings:
        pytest.fail("tokenizer and reloaded model disagree on the vocabulary")
    with torch.no_grad():
        assert torch.equal(reloaded(**probe).logits, trained(**probe).logits)
    return result, trainer


@pytest.mark.parametrize("impl", ["peft", "ftkit"])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_trains_with_no_target_flag(plain_dirs, records, tmp_path, arch, impl):
    _train_and_reload(plain_dirs[arch], records, tmp_path, impl)
