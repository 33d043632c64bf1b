"""Build the base model and tokenizer, then put a LoRA adapter (PEFT's or ftkit's) on it."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from ftkit.config import AdapterConfig, DataConfig, ModelConfig, torch_dtype
from ftkit.data import ensure_pad_token
from ftkit.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """Embedded names → their materialised dir; local paths are checked; Hub ids pass through."""
    from ftkit.embedded import EMBEDDED_PREFIX, embedded_model_path

    if name_or_path.startswith(EMBEDDED_PREFIX):
        return embedded_model_path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser().resolve())
    if looks_local:
        raise ModelError(
            f"model path not found: {name_or_path} (give an existing directory with config.json, "
            "a Hub id such as meta-llama/Llama-2-7b-hf, or ftkit:tiny-llama)"
        )
    return name_or_path


def require_model_dir(path: str) -> None:
    """A local model path must hold config.json: one line, not a tokenizer/sentencepiece hint."""
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        what = "a directory without config.json" if local.is_dir() else "a file"
        raise ModelError(
            f"model path {path} is {what}, not a model: give the directory save_pretrained "
            "wrote (config.json + weights), a Hub id, or ftkit:tiny-llama"
        )


# RoPE types that stretch the positions a model was pretrained on by their ``factor``
# (transformers' rope_parameters; yarn, llama3 and longrope keep the pretrained length in
# original_max_position_embeddings). Others (default, ...) reach max_position_embeddings.
_SCALED_ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")


def context_length(config) -> tuple[int, str] | None:
    """The positions ``config``'s model handles, and how that follows from its config; None when
    it states no limit (ALiBi: BLOOM, MPT).

    ``max_position_embeddings``, stretched by a RoPE scaling ``factor``: the pretrained length
    (``original_max_position_embeddings``, else ``max_position_embeddings``) times the factor,
    never below ``max_position_embeddings`` (LLaMA-3.1 states the stretched length there).
    Per-layer-type RoPE (Gemma-3: full and sliding attention) gives its longest reach.
    """
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return None
    rope = getattr(config, "rope_parameters", None) or {}
    per_type = [v for v in rope.values() if isinstance(v, dict)] or [rope]
    best, how = positions, f"max_position_embeddings {positions}"
    for params in per_type:
        kind, factor = params.get("rope_type", "default"), params.get("factor")
        if kind not in _SCALED_ROPE_TYPES or not isinstance(factor, (int, float)):
            continue
        pretrained = params.get("original_max_position_embeddings") or positions
        if int(pretrained * factor) > best:
            best = int(pretrained * factor)
            how = f"{pretrained} positions x {kind} RoPE scaling factor {factor:g}"
    return best, how


def check_context_length(data_cfg: DataConfig, model_path: str) -> None:
    """Refuse (or, with ``allow_beyond_context``, warn about) a ``max_length`` beyond the context
    of the model at ``model_path``; read from its config alone, before any weight loads.

    Beyond it a RoPE model meets positions it never saw (quality falls, silently); a model
    without RoPE has position embeddings for that many positions only (GPT-2's and OPT's learned
    tables have no row past them), so there it is refused even when allowed.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    context = context_length(config)
    if context is None or data_cfg.max_length <= context[0]:
        return
    positions, how = context
    rope = bool(getattr(config, "rope_parameters", None))
    problem = (
        f"max_length {data_cfg.max_length} is beyond the context of {model_path}: {positions} "
        f"positions ({how})"
    )
    if not rope:
        raise ConfigError(
            f"{problem}; its position embeddings (not RoPE) stop there, so "
            f"allow_beyond_context cannot help: use --max_length {positions} or less"
        )
    if not data_cfg.allow_beyond_context:
        raise ConfigError(
            f"{problem}: use --max_length {positions} or less, or pass --allow_beyond_context "
            "true to train on longer sequences anyway"
        )
    logger.warning(
        "%s: training anyway (allow_beyond_context); positions past %d were never seen in "
        "pretraining",
        problem,
        positions,
    )


def load_tokenizer(path: str):
    """Tokenizer with a pad id distinct from EOS, right-padded for training."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(f"could not load a tokenizer from {path!r}: {exc}") from exc
    tokenizer.padding_side = "right"
    return ensure_pad_token(tokenizer)


def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig | None:
    if not (cfg.load_in_8bit or cfg.load_in_4bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            "load_in_8bit/load_in_4bit need bitsandbytes: pip install 'ftkit[quant]' "
            "(or drop the flag to train an unquantised base)"
        )
    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(cfg.model_dtype),
    )


def fit_embeddings(model, tokenizer) -> bool:
    """Grow the embeddings (and an untied head) to ``len(tokenizer)`` if a pad token was added.

    The new rows are the mean of the existing ones (and the head's bias likewise), not random:
    that is deterministic, so every later load of the same base + tokenizer rebuilds exactly the
    matrices training used (they stay frozen), and the adapter needs no copy of them. Returns
    whether the model was resized. The model's ``pad_token_id`` follows the tokenizer's.
    """
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:
        return False
    head = model.get_output_embeddings()
    old_head_rows = None if head is None else head.weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[rows:] = weight[:rows].mean(dim=0, keepdim=True)
        head = model.get_output_embeddings()
        if head is not None and head.weight is not weight:
            head.weight[old_head_rows:] = head.weight[:old_head_rows].mean(dim=0, keepdim=True)
        if head is not None and getattr(head, "bias", None) is not None:
            head.bias[old_head_rows:] = head.bias[:old_head_rows].mean()
    logger.info("resized the embeddings from %d to %d rows (added pad token)", rows, len(tokenizer))
    return True


def load_base_model(
    cfg: ModelConfig, device: torch.device | str = "cpu", tokenizer=None, padding_free=False
):
    """``AutoModelForCausalLM.from_pretrained`` with the requested dtype / quantisation / GC.

    With ``tokenizer``, the embeddings are fitted to it (``fit_embeddings``: an added pad token).
    ``padding_free`` (training on flattened rows) is what ``attn_implementation: auto`` reads.
    """
    from ftkit import attention

    path = resolve_model_path(cfg.model_name_or_path)
    require_model_dir(path)
    quant = quantization_config(cfg)
    kwargs = {"dtype": torch_dtype(cfg.model_dtype)}
    attn_implementation = attention.resolve(cfg.attn_implementation, padding_free)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": str(device)})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"could not load model {path!r}: {exc}") from exc
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        # Only for quantised bases: it upcasts norms and enables input grads for k-bit training.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_weights_trainable(model)
    model.config.use_cache = False  # the KV cache is useless in training and breaks with GC
    return model


def keep_4bit_weights_trainable(model) -> None:
    """Turn off bitsandbytes' inference-only CPU repacking of 4-bit weights.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight in place on the first eval-mode
    forward without grad (bitsandbytes 0.50); after that, backward no longer reaches anything
    upstream of it (every LoRA gradient is None), and the repack asserts on dimensions that are
    not multiples of 32 x 64.  ftkit evaluates before and during training, so it keeps the
    training layout.  This sets the per-instance flag the layer reads each forward; no code is
    patched.  A no-op on GPUs and other CPUs.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant GC through the transformers API; works before or after LoRA is applied.

    With ``use_reentrant=False`` the checkpointed blocks propagate gradients to LoRA parameters
    even though the block inputs (frozen embeddings) do not require grad, so no input-grad hook
    is needed.
    """
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed the API (the old name warns); 4.x has only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_adapter(model, cfg: AdapterConfig, seed: int):
    """Put LoRA on ``model`` with PEFT or ftkit; ``none`` keeps every weight trainable.

    The RNG is seeded right before injection so both implementations draw identical A matrices.
    """
    from ftkit import lora

    if cfg.lora_impl == "none":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    torch.manual_seed(seed)
    targets = cfg.lora_target
    if cfg.lora_impl == "ftkit":
        lora.apply_lora(
            model,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=targets,
            use_rslora=cfg.use_rslora,
        )
        return model
    from peft import LoraConfig, get_peft_model

    targets = lora.resolve_targets(model, targets)
    matched = lora.match_targets(model, targets)
    logger.info("PEFT LoRA targets %s match: %s", list(targets), matched)
    modules = dict(model.named_modules())
    peft_config = LoraConfig(
        # Conv1D (GPT-2) stores its weight (in, out); PEFT would otherwise warn and flip it per layer.
        fan_in_fan_out=any(isinstance(modules[name], Conv1D) for name in matched),
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(targets),
        use_rslora=cfg.use_rslora,
    )
    from ftkit.quiet import peft_calls

    with peft_calls():
        return get_peft_model(model, peft_config)


def build_model(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    seed: int,
    device="cpu",
    tokenizer=None,
    padding_free=False,
):
    """Base model (fitted to ``tokenizer``) + adapter, with gradient checkpointing if asked."""
    model = load_base_model(model_cfg, device, tokenizer=tokenizer, padding_free=padding_free)
    model = apply_adapter(model, adapter_cfg, seed)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def resolve_mixed_precision(requested: str, cuda_available: bool, capability=None) -> str:
    """Accelerate's mixed_precision, corrected for the hardware it will run on.

    bf16 needs Ampere (compute capability >= 8.0); a T4 (7.5) gets fp16 with a grad scaler instead.
    fp16 autocast needs CUDA; bf16 autocast works on CPU.
    """
    requested = (requested or "no").lower()
    if requested not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision={requested!r} is not supported; use no, fp16 or bf16")
    if not cuda_available:
        if requested == "fp16":
            raise ConfigError(
                "fp16 mixed precision needs a CUDA GPU and none is available: use "
                "accelerate_configs/cpu.yaml (fp32) or --mixed_precision bf16 on CPU"
            )
        return requested
    if requested == "bf16" and capability is not None and capability < (8, 0):
        logger.warning(
            "bf16 needs compute capability >= 8.0, this GPU is %s: using fp16", capability
        )
        return "fp16"
    return requested


def requested_mixed_precision() -> str:
    """What ``accelerate launch`` asked for (it passes the config through this variable)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def cuda_capability():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def check_precision_combination(recipe, mixed_precision: str) -> None:
    """Refuse, before anything loads, a precision combination that fails on its first step.

    A full fine-tune (``lora_impl none``) of an fp16 base under fp16 AMP has fp16 trainable
    parameters, whose gradients the grad scaler refuses to unscale.
    """
    if (
        recipe.adapter.lora_impl == "none"
        and recipe.model.model_dtype == "fp16"
        and str(mixed_precision) == "fp16"
    ):
        raise ConfigError(
            "lora_impl none + model_dtype fp16 + fp16 mixed precision cannot train (the grad "
            "scaler cannot unscale fp16 gradients): use model_dtype fp32 with fp16 AMP, or bf16"
        )
