"""Merge a trained adapter into its base: a standalone model that needs neither ftkit nor PEFT.

Merge policy (``ftkit.lora``'s): never merge into quantised weights. Requantising ``W + BA`` adds a
second rounding error, so the merged model would no longer compute what was trained. The base is
therefore always loaded in full precision (float32 unless ``dtype`` says otherwise, never with a
``quantization_config``), and a base checkpoint that itself stores quantised weights is refused:
point ``--base_model`` at its full-precision original.

The merge is checked, not trusted: the adapter model's logits on a probe prompt are compared with
the merged model's, and the largest difference is reported. In float32 it is rounding error
(2e-7 on the random tiny test models, 5e-6 on the embedded default, whose logits reach 11; the
tests require <= 1e-5); in bfloat16 the rounding of ``W + BA`` shows (7e-2 on the embedded default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from ftkit import lora
from ftkit.errors import ConfigError, ModelError
from ftkit.inference import Adapter, AdapterArgs, Prompt, attach_adapter, load_base
from ftkit.io import atomic_dir
from ftkit.modeling import resolve_model_path

PROBE = Prompt("Give three tips for staying healthy.")


@dataclass(frozen=True)
class MergeResult:
    output_dir: Path
    max_abs_logit_diff: float  # merged vs adapter model, on PROBE


def merge_adapter(args: AdapterArgs, output_dir: str | Path) -> MergeResult:
    """Load base + adapter in ``args.dtype``, merge, check, and write ``output_dir`` atomically."""
    output_dir = Path(output_dir)
    adapter = Adapter.read(args.adapter_dir)
    base = adapter.base_for(args.base_model)
    if output_dir.resolve() in (adapter.path.resolve(), Path(resolve_model_path(base)).resolve()):
        raise ConfigError(f"--output_dir {output_dir} would replace its own inputs; pick a new dir")
    refuse_quantised_checkpoint(base)
    loaded = load_base(args, device="cpu")
    model = attach_adapter(loaded)
    probe = loaded.tokenizer(PROBE.text(), return_tensors="pt")
    with torch.no_grad():
        expected = model(**probe).logits
        merged = _merge(model, adapter.format)
        diff = float((merged(**probe).logits - expected).abs().max())
    with atomic_dir(output_dir) as scratch:
        merged.save_pretrained(scratch, safe_serialization=True)
        loaded.tokenizer.save_pretrained(scratch)
    return MergeResult(output_dir, diff)


def _merge(model, adapter_format: str):
    """The plain transformers model with the update added in; non-finite results are refused."""
    if adapter_format == "ftkit":
        lora.merge_lora(model, safe_merge=True)
        return lora.unload_lora(model)
    try:
        return model.merge_and_unload(safe_merge=True)
    except ValueError as err:  # PEFT's safe_merge found NaN/inf
        raise lora.LoraMergeError(f"merging would break the base weights: {err}") from err


def refuse_quantised_checkpoint(base: str) -> None:
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
