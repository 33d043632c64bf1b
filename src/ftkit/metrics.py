"""Loss per supervised token, the one number training, evaluation and reports all quote."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ftkit.data import IGNORE_INDEX


def supervised_tokens(batch) -> torch.Tensor:
    """Tokens that contribute to the causal-LM loss (labels are shifted by one)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def example_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and supervised-token count per example.

    Per example, not per batch, so a distributed eval can drop the samples Accelerate repeats to
    even out the last batch (``gather_for_metrics``) and still weight every token equally.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view(labels.shape).sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: a diverged model should not overflow the report
