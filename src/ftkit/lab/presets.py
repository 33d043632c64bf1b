"""Built-in model shapes stored as config values, so planning never touches the Hub.

The values are copied from each model's ``config.json`` on the Hub and cross-checked with the
papers; only the fields that change memory are kept.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, BloomConfig, LlamaConfig, PretrainedConfig

from ftkit.errors import ConfigError

# meta-llama/Llama-2-{7b,13b}-hf config.json; Touvron et al. 2023 (arXiv:2307.09288), Table 1.
# bigscience/bloom-{1b7,7b1} config.json; BigScience 2022 (arXiv:2211.05100), Table 1
# (1.7B: 2048 hidden, 24 layers, 16 heads; 7.1B: 4096, 30, 32; vocabulary 250,880).
PRESETS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "llama2-7b": (
        LlamaConfig,
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
    ),
    "llama2-13b": (
        LlamaConfig,
        dict(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
    ),
    "bloom-1b7": (
        BloomConfig,
        dict(hidden_size=2048, n_layer=24, n_head=16, vocab_size=250880, tie_word_embeddings=True),
    ),
    "bloom-7b1": (
        BloomConfig,
        dict(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880, tie_word_embeddings=True),
    ),
}


def preset_config(name: str) -> PretrainedConfig:
    """A fresh config object for a built-in preset; raises ``ValueError`` naming the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    cls, values = PRESETS[name]
    config = cls(**values)
    config.name_or_path = name
    return config


def resolve_config(name_or_dir: str) -> PretrainedConfig:
    """A preset name, or a local directory holding ``config.json`` (read offline)."""
    if name_or_dir in PRESETS:
        return preset_config(name_or_dir)
    path = Path(name_or_dir)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    raise ConfigError(
        f"unknown model {name_or_dir!r}: not a preset ({', '.join(PRESETS)}) "
        "and not a local directory with a config.json"
    )


# The Hub repository each preset's config.json was copied from: what a written recipe loads.
HUB_IDS = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "bloom-1b7": "bigscience/bloom-1b7",
    "bloom-7b1": "bigscience/bloom-7b1",
}
