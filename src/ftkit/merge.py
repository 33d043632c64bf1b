"""Merge an adapter into its base: a standalone model, checked and deployable.

``ftkit merge`` loads the base an adapter names (``ftkit.adapters``), attaches the adapter, adds
its update into the base weights and writes a plain transformers model directory that needs
neither PEFT nor ftkit: its tokenizer pads on the left and carries the run's chat template, its
generation config is ``ftkit generate``'s, and its tokenizer config loads in transformers 4.56+.
It lists its files' checksums in ``checksums.sha256`` (``sha256sum -c`` checks a copy).

Merge policy: never merge into quantised weights.  Requantising ``W + BA`` adds a second rounding
error, so the merged model would no longer compute what was trained; the base is therefore always
loaded in full precision, and a base checkpoint that itself stores quantised weights is refused.
The merge is checked, not trusted: the adapter model's logits on a probe prompt are compared with
the merged model's (fp32: rounding error, ~5e-6 on the embedded default; the tests require
<= 1e-5; bf16 shows the rounding of ``W + BA``, ~7e-2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from ftkit import integrity, lora, rundir
from ftkit.adapters import Adapter, AdapterArgs, attach_adapter, load_base
from ftkit.data import (
    CHAT_FORMATS,
    alpaca_chat_template,
    ensure_chat_template,
    load_template,
    run_data_format,
)
from ftkit.errors import ModelError
from ftkit.generate import GenerationOptions, stop_token_ids
from ftkit.io import atomic_dir
from ftkit.modeling import resolve_model_path

PROBE_INSTRUCTION = "Give three tips for staying healthy."


@dataclass(frozen=True)
class MergeResult:
    output_dir: Path
    max_abs_logit_diff: float  # merged vs adapter model, on the probe prompt


def merge_and_export(
    args: AdapterArgs, output_dir: str | Path, overwrite: bool = False
) -> MergeResult:
    """Load base + adapter in ``args.dtype``, merge, check, and write ``output_dir`` atomically.

    ``output_dir`` must be new or empty, or (with ``overwrite``) a merged model ftkit wrote:
    see ``rundir.check_merge_target``.
    """
    output_dir = Path(output_dir)
    adapter = Adapter.read(args.adapter_dir)
    base = adapter.base_for(args.base_model)
    rundir.check_merge_target(
        output_dir,
        adapter_dir=adapter.path,
        base_dir=resolve_model_path(base),
        overwrite=overwrite,
    )
    _refuse_quantised_checkpoint(base)
    loaded = load_base(args, device="cpu", adapter=adapter)
    model = attach_adapter(loaded)
    probe = loaded.tokenizer(load_template().format(PROBE_INSTRUCTION), return_tensors="pt")
    with torch.no_grad():
        expected = model(**probe).logits
        merged = _merge(model, adapter.format)
        diff = float((merged(**probe).logits - expected).abs().max())
    data_format = run_data_format(adapter.path)
    tokenizer = deployable_tokenizer(loaded.tokenizer, data_format)
    merged.generation_config = deploy_generation_config(tokenizer, data_format)
    merged.config.use_cache = True
    with atomic_dir(output_dir) as scratch:
        merged.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        portable_tokenizer_config(scratch / "tokenizer_config.json")
        rundir.write_merge_marker(scratch)
        integrity.write_manifest(scratch)  # last: it covers every file, the marker too
    return MergeResult(output_dir, diff)


# transformers 5 names its fast tokenizer class TokenizersBackend; 4.x knows the same class as
# PreTrainedTokenizerFast, a name 5.x still loads.
_V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_tokenizer_config(path: Path) -> None:
    """Make a transformers-5 tokenizer_config.json load the same in transformers 4.56+.

    The class name 4.x lacks is replaced by its 4.x name, and ``padding_side: left`` is written
    out (5.x leaves it out, and 4.x then pads on the right, which breaks batched generation).
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    name = config.get("tokenizer_class")
    config["tokenizer_class"] = _V5_ONLY_TOKENIZER_CLASSES.get(name, name)
    config["padding_side"] = "left"
    for key in ("is_local", "local_files_only"):  # facts about this machine's load, not the model
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def deployable_tokenizer(tokenizer: PreTrainedTokenizerBase, data_format: str):
    """The run's tokenizer as the merged model ships it: left padding, the run's chat template.

    Chat runs keep the template they trained with (the tokenizer's own or ftkit's default, saved
    with the run); an alpaca run without one gets ``alpaca_chat_template`` (the Alpaca prompt as
    a chat template); text and prompt_completion runs keep whatever the tokenizer had.
    """
    if data_format in CHAT_FORMATS:
        ensure_chat_template(tokenizer)
    elif data_format == "alpaca" and not tokenizer.chat_template:
        tokenizer.chat_template = alpaca_chat_template()
    tokenizer.padding_side = "left"  # batched generate() pads on the left (see generate.py)
    return tokenizer


def deploy_generation_config(tokenizer: PreTrainedTokenizerBase, data_format: str):
    """generate.py's defaults (greedy, its max_new_tokens, EOS / end-of-turn, pad) for the merged dir.

    A fresh config, not the base's: a base that samples (do_sample, temperature...) would make
    ``pipeline(prompt)`` answer differently from ``ftkit generate``.
    """
    config = GenerationOptions().generation_config(
        tokenizer, stop_token_ids(tokenizer, data_format)
    )
    config.bos_token_id = tokenizer.bos_token_id
    return config


def _merge(model, adapter_format: str):
    """The plain transformers model with the update added in; non-finite results are refused."""
    if adapter_format == "ftkit":
        lora.merge_lora(model, safe_merge=True)
        return lora.unload_lora(model)
    try:
        return model.merge_and_unload(safe_merge=True)
    except ValueError as err:  # PEFT's safe_merge found NaN/inf
        raise lora.LoraMergeError(f"merging would break the base weights: {err}") from err


def _refuse_quantised_checkpoint(base: str) -> None:
    """Raise if ``base`` stores quantised weights (a ``quantization_config`` in its config)."""
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(base))
    except OSError as err:
        raise ModelError(f"could not read the config of {base!r}: {err}") from err
    if getattr(config, "quantization_config", None) is not None:
        raise lora.LoraMergeError(
            f"{base} stores quantised weights; merging into them would requantise and change "
            "what was trained. Pass --base_model the full-precision original of this base"
        )
