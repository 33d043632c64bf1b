"""Shared fixtures: tiny LLaMA / BLOOM saved to disk and loaded back through from_pretrained.

Nothing here touches the Hub: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ALPACA_5000 = SHARED / "data" / "alpaca_5000.json"
LLAMA2_TOKENIZER = SHARED / "fixtures" / "llama2-tokenizer"
EMBEDDED_TOKENIZER = REPO / "src" / "ftkit" / "assets" / "tiny-llama"

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _ftkit_home(tmp_path_factory):
    """Materialise the embedded model into a session temp dir, never into the user's cache."""
    home = tmp_path_factory.mktemp("ftkit_home")
    os.environ["FTKIT_HOME"] = str(home)
    yield home


def _save_tiny(model_cls, config, path: Path) -> Path:
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(EMBEDDED_TOKENIZER).save_pretrained(path)
    return path


def tiny_llama_config(**overrides) -> LlamaConfig:
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_TOKENIZER)
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,  # tests train with max_length 320
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_bloom_config(**overrides) -> BloomConfig:
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_TOKENIZER)
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    values.update(overrides)
    return BloomConfig(**values)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA (+ the embedded tokenizer) saved with save_pretrained."""
    return _save_tiny(LlamaForCausalLM, tiny_llama_config(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bloom_dir(tmp_path_factory) -> Path:
    return _save_tiny(BloomForCausalLM, tiny_bloom_config(), tmp_path_factory.mktemp("tiny-bloom"))


@pytest.fixture(scope="session")
def alpaca_path() -> Path:
    if not ALPACA_5000.is_file():
        pytest.fail(f"shared data missing: {ALPACA_5000} (CI provides ../shared beside the repo)")
    return ALPACA_5000


@pytest.fixture(scope="session")
def records(tmp_path_factory, alpaca_path) -> Path:
    """16 real Alpaca records with short outputs (files may override it with their own set)."""
    from helpers import write_records

    return write_records(tmp_path_factory.mktemp("data") / "alpaca16.json", 16, alpaca_path)


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    if not (LLAMA2_TOKENIZER / "tokenizer.model").is_file():
        pytest.fail(f"shared fixture missing: {LLAMA2_TOKENIZER} (CI provides ../shared)")
    return LLAMA2_TOKENIZER


@pytest.fixture(scope="session")
def llama2_tokenizer(llama2_tokenizer_dir):
    from ftkit.data import ensure_pad_token

    return ensure_pad_token(AutoTokenizer.from_pretrained(llama2_tokenizer_dir))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from threads, and spinning threads stall on a shared CPU.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
