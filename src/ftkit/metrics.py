"""Loss per supervised token, the one number training, evaluation and reports all quote.

With ``supervised_logits_only`` (the default) the LM head runs only where the loss looks: the
model gets transformers' own ``logits_to_keep`` = the positions whose shifted label is supervised
(each architecture keeps its head logic: final norm, tied weights, soft-capping), and the loss is
computed here from those logits, summed and divided by the window's supervised-token count, the
same normalisation as the full-logits path (``num_items_in_batch``), so accumulation and
multi-process equivalences stay exact. A flattened (padding-free) row keeps exactly its
supervised positions; a right-padded batch keeps the union of its rows' supervised columns.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ftkit.data import IGNORE_INDEX

logger = logging.getLogger(__name__)


def supervised_tokens(batch) -> torch.Tensor:
    """Tokens that contribute to the causal-LM loss (labels are shifted by one)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """1-D positions ``t`` whose shifted target ``labels[:, t + 1]`` is supervised in any row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


def logits_positions(batch) -> torch.Tensor:
    """How many logit rows the supervised-logits path computes for ``batch`` (a tensor where the
    batch is: counted without reading it back)."""
    labels = batch["labels"]
    return labels.shape[0] * (labels[:, 1:] != IGNORE_INDEX).any(dim=0).sum()


def _core_model(model):
    model = getattr(model, "module", model)  # DDP
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(_core_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


_warned: set[str] = set()


def use_supervised_logits(requested: bool, model) -> bool:
    """``requested`` unless the model's forward lacks ``logits_to_keep`` (then one warning)."""
    if not requested:
        return False
    if accepts_logits_to_keep(model):
        return True
    name = type(_core_model(model)).__name__
    if name not in _warned:
        _warned.add(name)
        logger.warning(
            "%s.forward takes no logits_to_keep: computing full logits "
            "(supervised_logits_only has no effect; results are the same, only slower)",
            name,
        )
    return False


@dataclass
class LossOutput:
    """What ``Trainer.backward_window`` reads from a micro-batch forward (as a ModelOutput)."""

    loss: torch.Tensor


def _split_at_supervised(batch) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The model's inputs, the supervised positions ``keep`` and their targets (B, K)."""
    labels = batch["labels"]
    keep = supervised_positions(labels)
    return {k: v for k, v in batch.items() if k != "labels"}, keep, labels[:, keep + 1]


def _kept_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the supervised positions (B, K, V) and their targets (B, K)."""
    inputs, keep, targets = _split_at_supervised(batch)
    return model(**inputs, use_cache=False, logits_to_keep=keep).logits, targets


def supervised_logits_loss(model, batch, num_items: torch.Tensor) -> LossOutput:
    """Sum of token losses at the supervised positions ÷ ``num_items`` (the window's count)."""
    logits, targets = _kept_logits(model, batch)
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return LossOutput(loss_sum / num_items)


def example_losses(
    model, batch, supervised_logits_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and supervised-token count per example.

    Per example, not per batch, so a distributed eval can drop the samples Accelerate repeats to
    even out the last batch (``gather_for_metrics``) and still weight every token equally.
    """
    if supervised_logits_only:
        eval_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        logits, labels = _kept_logits(model, eval_batch)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    losses = F.cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view(labels.shape).sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


# -- loss kernels ------------------------------------------------------------------------------------

LOSS_KERNELS = ("none", "liger")
# Model types whose logits are exactly ``lm_head(last hidden state)`` (the final norm inside the
# decoder, no scaling or soft-capping after the head), so a fused linear cross-entropy over the
# head's weight is the model's own loss. Each is proven in tests/test_logits.py against
# supervised_logits_loss with a torch stand-in for the kernel.
FUSED_HEAD_EXACT = ("llama", "mistral", "qwen2", "gemma", "phi", "phi3", "gpt2", "bloom", "opt")


def check_loss_kernel(kernel: str, cuda_available: bool | None = None) -> None:
    """Refuse what cannot run here, before any model loads."""
    from ftkit.errors import ConfigError

    if kernel == "none":
        return
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise ConfigError(
            f"loss_kernel {kernel} needs CUDA (liger-kernel's fused linear cross-entropy is a "
            "Triton GPU kernel); on CPU use loss_kernel none with supervised_logits_only true"
        )
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(
            "loss_kernel liger needs the liger-kernel package: pip install 'ftkit[liger]'"
        )


def check_fused_head(kernel: str, model_type: str, lora_targets, sharded: bool) -> None:
    """Refuse, before the model loads, a fused head loss that would not be the model's loss."""
    from ftkit.errors import ConfigError

    if kernel == "none":
        return
    if model_type not in FUSED_HEAD_EXACT:
        raise ConfigError(
            f"loss_kernel {kernel} is not proven exact for {model_type} models (their logits "
            f"are not just lm_head(hidden); proven: {', '.join(FUSED_HEAD_EXACT)}): use "
            "loss_kernel none"
        )
    if any("lm_head" in str(t) for t in (lora_targets or ())):
        raise ConfigError(
            f"loss_kernel {kernel} reads lm_head's weight directly, so LoRA on lm_head would be "
            "skipped: drop lm_head from lora_target or use loss_kernel none"
        )
    if sharded:
        raise ConfigError(
            f"loss_kernel {kernel} reads lm_head's weight outside the forward, where FSDP and "
            "DeepSpeed ZeRO-3 hold only a shard of it: use ZeRO-2/DDP or loss_kernel none"
        )


def liger_cross_entropy():
    """liger-kernel's fused linear cross-entropy: (weight, hidden, targets, bias) -> summed loss."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def fused_head_loss(model, batch, num_items: torch.Tensor, kernel) -> LossOutput:
    """The supervised-logits loss with the head fused into the loss: no logits materialised.

    The model runs through its own forward (so DDP/DeepSpeed hooks, GC and the final norm are
    its own) with an empty ``logits_to_keep``; transformers returns the last hidden state, after
    the final norm, as ``hidden_states[-1]``. ``kernel(weight, hidden, targets, bias)`` then
    computes the summed cross-entropy of ``lm_head`` at the supervised positions.
    """
    inputs, keep, targets = _split_at_supervised(batch)
    out = model(**inputs, use_cache=False, logits_to_keep=keep[:0], output_hidden_states=True)
    head = _core_model(model).get_output_embeddings()
    # Under mixed precision Accelerate hands the outputs back in fp32, and the kernel runs here,
    # outside the forward's autocast region: it multiplies in the dtype it is given and refuses
    # two (fp32 hidden states x a bf16 head). The head's own dtype is what lm_head computes in;
    # a hidden state that was half precision before the upcast comes back unchanged.
    hidden = out.hidden_states[-1][:, keep].flatten(0, 1).to(head.weight.dtype)
    loss_sum = kernel(head.weight, hidden, targets.flatten(), head.bias)
    return LossOutput(loss_sum / num_items)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: a diverged model should not overflow the report
