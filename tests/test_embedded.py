"""The embedded default: deterministic pretrained weights, a LLaMA-like tokenizer, a sane toy dataset."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftkit import embedded
from ftkit.config import parse_recipe
from ftkit.errors import ConfigError
from ftkit.modeling import resolve_model_path
from ftkit.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build_embedded_assets.py"
DEFAULT_RECIPE = "tiny"  # the shipped default recipe


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_embedded_assets", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_script():
    return _load_build_script()


@pytest.fixture(scope="module")
def records():
    return json.loads(embedded.embedded_dataset_path().read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded.ASSETS_DIR / "tiny-llama")


def _materialise_into(home: Path, monkeypatch) -> Path:
    monkeypatch.setenv("FTKIT_HOME", str(home))
    return Path(embedded.embedded_model_path("ftkit:tiny-llama"))


def test_materialisation_is_deterministic_and_loadable(tmp_path, monkeypatch):
    first = _materialise_into(tmp_path / "a", monkeypatch)
    second = _materialise_into(tmp_path / "b", monkeypatch)
    assert first == (tmp_path / "a" / "tiny-llama").resolve() and first.is_absolute()
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model = AutoModelForCausalLM.from_pretrained(first)
    assert type(model).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(first)
    assert model.config.vocab_size == len(tok)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert model.config.pad_token_id == tok.pad_token_id
    # Pretrained on the toy language: plain sentences are far likelier than uniform (ln 640 = 6.46).
    batch = tok(
        ["The opposite of hot is cold.", "Add the two numbers."], return_tensors="pt", padding=True
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss
    assert loss < 3.0


def test_materialisation_is_reused_and_rebuilt_when_stale(tmp_path, monkeypatch):
    path = _materialise_into(tmp_path, monkeypatch)
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert _materialise_into(tmp_path, monkeypatch) == path
    assert weights.stat().st_mtime_ns == mtime  # reused, not rebuilt

    (path / embedded.STAMP_FILE).write_text(json.dumps({"assets_sha256": "stale"}))
    assert _materialise_into(tmp_path, monkeypatch) == path
    assert json.loads((path / embedded.STAMP_FILE).read_text())["assets_sha256"] != "stale"


def test_resolve_passes_through_and_rejects_unknown_names(tmp_path):
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(ConfigError, match="ftkit:tiny-llama"):
        resolve_model_path("ftkit:nope")


def test_tokenizer_behaves_like_llama_with_a_real_pad(tokenizer):
    ids = tokenizer("Add the two numbers.").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
    assert tokenizer.bos_token_id not in ids[1:]
    assert [tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token] == [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    ]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tokenizer_round_trips_records_and_templates(tokenizer, records, build_script):
    texts = [build_script.PROMPT_INPUT, build_script.PROMPT_NO_INPUT]
    for record in records:
        texts += [record["instruction"], record["input"], record["output"]]
        texts.append(build_script.format_prompt(record) + record["output"])
    for text in texts:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_dataset_records(records, tokenizer, build_script):
    assert 300 <= len(records) <= 600
    for record in records:
        assert set(record) == {"instruction", "input", "output"}
        assert all(isinstance(value, str) for value in record.values())
        assert record["instruction"] and record["output"]
        text = build_script.format_prompt(record) + record["output"]
        assert len(tokenizer(text).input_ids) < 128
    with_input = sum(bool(r["input"]) for r in records)
    assert 0 < with_input < len(records)  # both Alpaca templates occur


@pytest.mark.slow
def test_build_script_reproduces_shipped_assets(tmp_path):
    subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out", str(tmp_path)], check=True)
    shipped = sorted(
        p.relative_to(embedded.ASSETS_DIR) for p in embedded.ASSETS_DIR.rglob("*.json")
    )
    rebuilt = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json"))
    assert rebuilt == shipped
    for rel in shipped:
        assert (tmp_path / rel).read_bytes() == (embedded.ASSETS_DIR / rel).read_bytes(), rel


def test_default_recipe_cuts_eval_loss_by_a_fifth(tmp_path):
    """`make demo`'s promise: the shipped default recipe cuts the held-out loss by >= 20 %."""
    recipe = parse_recipe(["--output_dir", str(tmp_path)], default_config=DEFAULT_RECIPE)
    assert recipe.model.model_name_or_path == "ftkit:tiny-llama"
    metrics = Trainer(recipe).fit().metrics
    assert metrics["eval_loss"] <= 0.8 * metrics["eval_loss_before"]


def test_materialised_weights_do_not_depend_on_the_rank(tmp_path, monkeypatch):
    """A non-zero rank (or node) building the cache still writes the weights.

    transformers' save_pretrained skips the weights on any rank but 0 once a process group
    exists; the builder must not depend on that.
    """
    from transformers import PreTrainedModel

    monkeypatch.setattr(embedded, "PRETRAIN_STEPS", 2)  # part of the digest: a distinct cache
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # As if a process group existed and this were rank 1 (transformers before 5.15 has no such
    # gate: save_pretrained writes on every rank, and the patched name is never called).
    monkeypatch.setattr(
        PreTrainedModel, "should_save_on_this_rank", lambda self, main: False, raising=False
    )
    path = _materialise_into(tmp_path, monkeypatch)
    assert (path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    weights = load_file(path / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(weights[k], state[k]) for k in weights)


LAUNCHES = {
    "ddp": (["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"], "true"),
    # ZeRO-3 init used to deadlock here: one rank building under zero.Init, one on the lock.
    "zero3": (
        ["--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero3_cpu.yaml")],
        "false",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(LAUNCHES))
def test_two_processes_on_a_fresh_home_cache_a_complete_base(tmp_path, engine):
    """accelerate launch, 2 CPU processes, fresh FTKIT_HOME, rank 1 reaches the cache first."""
    from helpers import accelerate_launch

    if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed")
    launch_args, use_cpu = LAUNCHES[engine]
    home, markers = tmp_path / "home", tmp_path / "markers"
    markers.mkdir()
    done = accelerate_launch(
        *launch_args,
        str(ROOT / "tests" / "embedded_worker.py"),
        str(markers),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "1",
        "--validation_size",
        "0",
        timeout=300,
        ACCELERATE_USE_CPU=use_cpu,
        FTKIT_HOME=str(home),
        OMP_NUM_THREADS="1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in markers.iterdir()) == ["built-by-rank1"]  # built once
    cache = home / "tiny-llama"
    assert (cache / "model.safetensors").is_file() and (cache / embedded.STAMP_FILE).is_file()
    assert AutoModelForCausalLM.from_pretrained(cache) is not None
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
