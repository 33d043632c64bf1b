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
from tiny_archs import byte_tokenizer, embedded_tokenizer, save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from ftkit import adapters, lora
from ftkit.adapters import AdapterArgs, attach_adapter, load_base
from ftkit.data import ADDED_PAD_TOKEN, ensure_pad_token
from ftkit.merge import merge_and_export
from ftkit.modeling import fit_embeddings, load_tokenizer
from ftkit.train import Trainer

ARCHS = ("mistral", "qwen2", "gpt2", "phi", "opt")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def plain_dirs(tmp_path_factory):
    """Every architecture with the embedded tokenizer (it has a pad token): targets only."""
    return {
        arch: save_tiny(arch, tmp_path_factory.mktemp(f"plain-{arch}"), embedded_tokenizer())
        for arch in ARCHS
    }


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Every architecture with its family's tokenizer (Qwen2: chat template, no pad, no unk)."""
    return {arch: save_tiny(arch, tmp_path_factory.mktemp(arch)) for arch in ARCHS}


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
    base = _load(base_dir)
    fit_embeddings(base, tokenizer)  # a no-op unless the run added a pad token
    reloaded = PeftModel.from_pretrained(base, out).eval()
    assert len(tokenizer) == reloaded.get_input_embeddings().num_embeddings
    with torch.no_grad():
        assert torch.equal(reloaded(**probe).logits, trained(**probe).logits)
    return result, trainer


@pytest.mark.parametrize("impl", ["peft", "ftkit"])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_trains_with_no_target_flag(dirs, records, tmp_path, arch, impl):
    _train_and_reload(dirs[arch], records, tmp_path, impl)


# -- pad policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, pad, grows",
    [
        ("qwen", "<|endoftext|>", False),  # reserved, not EOS (<|im_end|> is)
        ("llama3", "<|finetune_right_pad_id|>", False),
        ("gpt2", ADDED_PAD_TOKEN, True),  # <|endoftext|> is EOS and unk: nothing to reuse
    ],
)
def test_pad_policy_never_pads_with_eos(family, pad, grows):
    tokenizer = byte_tokenizer(family)
    n = len(tokenizer)
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == pad and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == n + grows


def test_a_pad_named_like_eos_is_replaced():
    tokenizer = byte_tokenizer("qwen")
    tokenizer.pad_token = tokenizer.eos_token  # how many Hub tokenizers ship
    assert ensure_pad_token(tokenizer).pad_token == "<|endoftext|>"


@pytest.mark.parametrize("arch, grows", [("gpt2", True), ("qwen2", False), ("phi", False)])
def test_pad_policy_round_trips_through_save_load_and_merge(dirs, records, tmp_path, arch, grows):
    """Added pad (GPT-2: embeddings resized, new row the mean) or reserved pad (Qwen2, Phi)."""
    out = tmp_path / "run"
    _, trainer = _train_and_reload(dirs[arch], records, out, "ftkit")
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    tokenizer = trainer.tokenizer
    base_rows = _load(dirs[arch]).get_input_embeddings().num_embeddings
    assert (len(tokenizer) == base_rows + 1) is grows
    embeddings = trained.get_input_embeddings().weight
    if grows:
        assert torch.equal(embeddings[-1], embeddings[:-1].mean(dim=0))
    probe = tokenizer(["Name a colour.", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = trained(**probe).logits
    loaded = load_base(AdapterArgs(str(out)), device="cpu")
    assert loaded.tokenizer.pad_token == tokenizer.pad_token
    with torch.no_grad():
        assert torch.equal(attach_adapter(loaded)(**probe).logits, expected)
    merged_dir = merge_and_export(AdapterArgs(str(out)), tmp_path / "merged").output_dir
    merged = _load(merged_dir)
    merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert merged_tokenizer.pad_token == tokenizer.pad_token
    assert merged.get_input_embeddings().num_embeddings == len(merged_tokenizer)
    assert merged.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        assert torch.allclose(merged(**probe).logits, expected, atol=1e-5)
    assert load_tokenizer(str(merged_dir)).pad_token == tokenizer.pad_token
