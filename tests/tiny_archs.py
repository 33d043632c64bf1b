"""Tiny causal LMs of other architectures and offline tokenizers shaped like theirs.

Every model is built from its config with a vocabulary that exactly fits its tokenizer, saved with
``save_pretrained`` (tokenizer alongside) and meant to be loaded back through ``from_pretrained``.
Tokenizers are byte-level BPE without merges (any text tokenises, no ``<unk>`` needed) plus the
special tokens of the family they imitate:

* ``qwen``: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (EOS), a ChatML chat template that
  adds a default system turn, no pad and no unk (Qwen2-Instruct's shape);
* ``llama3``: ``<|begin_of_text|>``, ``<|end_of_text|>`` (EOS), ``<|finetune_right_pad_id|>``, no
  pad and no unk, no chat template;
* ``gpt2``: ``<|endoftext|>`` as BOS, EOS and unk, no pad, no chat template (a pad must be added).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

EMBEDDED_TOKENIZER = Path(__file__).resolve().parents[1] / "src" / "ftkit" / "assets" / "tiny-llama"

QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = {
    "qwen": dict(
        tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        kwargs=dict(eos_token="<|im_end|>"),
        chat_template=QWEN_TEMPLATE,
    ),
    "llama3": dict(
        tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"],
        kwargs=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
        chat_template=None,
    ),
    "gpt2": dict(
        tokens=["<|endoftext|>"],
        kwargs=dict(
            bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
        ),
        chat_template=None,
    ),
}


def byte_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with ``family``'s special tokens (see the module docstring)."""
    spec = SPECIALS[family]
    vocab = {char: index for index, char in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(spec["tokens"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **spec["kwargs"])
    if spec["chat_template"]:
        tokenizer.chat_template = spec["chat_template"]
    return tokenizer


def embedded_tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_TOKENIZER)


def _ids(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build(arch: str, tokenizer):
    """A tiny ``arch`` model whose vocabulary is exactly ``len(tokenizer)``."""
    ids = _ids(tokenizer)
    if arch == "mistral":
        config = MistralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            sliding_window=None,
            tie_word_embeddings=False,
            **ids,
        )
        return MistralForCausalLM(config)
    if arch == "qwen2":
        config = Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **ids,
        )
        return Qwen2ForCausalLM(config)
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids)
        return GPT2LMHeadModel(config)
    if arch == "phi":
        config = PhiConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            **ids,
        )
        return PhiForCausalLM(config)
    if arch == "opt":
        config = OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=32,
            **ids,
        )
        return OPTForCausalLM(config)
    raise ValueError(arch)


# Which tokenizer each tiny architecture gets by default (see the module docstring).
TOKENIZERS = {
    "mistral": embedded_tokenizer,
    "qwen2": lambda: byte_tokenizer("qwen"),
    "gpt2": lambda: byte_tokenizer("gpt2"),
    "phi": lambda: byte_tokenizer("llama3"),
    "opt": embedded_tokenizer,
}


def save_tiny(arch: str, path: Path, tokenizer=None) -> Path:
    """Build, save (model + tokenizer) and return ``path``; seeded, so every call is the same."""
    tokenizer = tokenizer if tokenizer is not None else TOKENIZERS[arch]()
    torch.manual_seed(0)
    build(arch, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
