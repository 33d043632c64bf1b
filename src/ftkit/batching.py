"""How training micro-batches are formed: right-padded, length-grouped, or padding-free.

* **padded** (``padding_free: false``, ``group_by_length: false``): random batches, right-padded
  by :func:`ftkit.data.collator`. On Alpaca lengths a random batch of 8 computes ~1.8 tokens per
  real token.
* **length-grouped** (``group_by_length: true``): :class:`LengthGroupedSampler` forms batches of
  similar lengths inside random mega-batches; still right-padded, with far less padding.
* **padding-free** (``padding_free: true``): each micro-batch is one flattened row with
  ``position_ids`` restarting at 0 for every sequence (transformers' ``DataCollatorWithFlattening``),
  no padding at all. By default attention runs per sequence (:mod:`ftkit.attention`, cut at the
  collator's ``cu_seq_lens_q``). Under ``sdpa``/``eager`` transformers derives a block-diagonal
  causal mask from the position ids *only when there is no attention mask and no KV cache*, so
  the model is always called with ``use_cache=False``: with a ``DynamicCache`` the
  packed-sequence detection is skipped and that attention silently crosses sequence boundaries.

Labels of a flattened row: the collator writes ``-100`` in place of each sequence's first label,
so the (shifted) target at every sequence boundary is masked, and every other label is ours
(``-100`` on prompts). The supervised-token count of a flattened row therefore equals the padded
batch's (``labels[:, 1:] != -100`` summed), which keeps the per-supervised-token normalisation
across accumulation windows and processes exact.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Sampler
from transformers import DataCollatorWithFlattening

from ftkit.data import IGNORE_INDEX
from ftkit.errors import ConfigError

logger = logging.getLogger(__name__)

# Model types whose flattened rows are exact in transformers 5.24 (position ids restart the
# positions and drive the block-diagonal mask): each is proven by a tiny model in
# tests/test_batching.py (changing one sequence leaves the others' logits bit-identical).
PADDING_FREE_EXACT = ("llama", "mistral", "qwen2", "gemma", "phi", "phi3", "gpt2")
# Known not to be exact, and why (also proven there): the flattened row's attention or positions
# cross sequence boundaries.
_NOT_EXACT = {
    "bloom": "their ALiBi position bias is built from the attention mask, not from position_ids",
    "mpt": "their ALiBi position bias is built from the attention mask, not from position_ids",
    "opt": "their learned positions come from the attention mask, not from position_ids",
}


def flattening_collator() -> DataCollatorWithFlattening:
    """One row per micro-batch: input_ids, labels (-100 at sequence starts), position_ids, and
    the sequence boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``) that varlen attention
    (ftkit's ``sdpa_varlen``, flash-attention) cuts the row at; SDPA and eager ignore them."""
    return DataCollatorWithFlattening(
        return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=True
    )


def padding_free_problem(model_config) -> str | None:
    """Why padding-free batches would not be exact (or are not proven exact) here, or None."""
    model_type = getattr(model_config, "model_type", "")
    if model_type in PADDING_FREE_EXACT and not getattr(model_config, "alibi", False):
        return None
    why = _NOT_EXACT.get(model_type) or (
        "their ALiBi position bias is built from the attention mask, not from position_ids"
        if getattr(model_config, "alibi", False)
        else f"ftkit has not proven flattened rows exact for them (proven: "
        f"{', '.join(PADDING_FREE_EXACT)})"
    )
    return (
        f"padding_free is not exact for {model_type} models: {why}, so attention in a flattened "
        "row could cross sequence boundaries; set padding_free false or auto (and group_by_length "
        "true to cut padding instead)"
    )


def resolve_padding_free(setting: str, model_config) -> bool:
    """``auto`` → on where exact; ``true`` on a model where it is not exact is a ConfigError.

    ``model_config`` is a transformers config or a model directory (read before the model loads).
    """
    if setting == "false":
        return False
    if not hasattr(model_config, "model_type"):
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(model_config)
    problem = padding_free_problem(model_config)
    if setting == "true" and problem:
        raise ConfigError(problem)
    if setting == "auto" and problem:
        logger.info("padding_free auto: off (%s)", problem.split(", so ")[0])
    return problem is None


def is_flattened(batch) -> bool:
    """A padding-free batch: one row, position ids, no attention mask."""
    return "position_ids" in batch and "attention_mask" not in batch


def real_tokens(batch):
    """Tokens of real records in a batch (padding excluded)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return batch["input_ids"].new_tensor(batch["input_ids"].numel())


def computed_tokens(batch) -> int:
    """Positions the model runs on, padding included."""
    return batch["input_ids"].numel()


# -- length-grouped batches -----------------------------------------------------------------------

MEGABATCH_BATCHES = 50  # batches per mega-batch (as transformers' LengthGroupedSampler)


class LengthGroupedSampler(Sampler[int]):
    """Indices in length-grouped order: random mega-batches, each sorted by length, batches shuffled.

    Per epoch: a seeded permutation of all records is cut into mega-batches of
    ``MEGABATCH_BATCHES * batch_size``; each is sorted by length (longest first, stable) and cut
    into batches, whose order inside the mega-batch is shuffled. Only the last mega-batch can end
    in a short batch, and it stays last, so a ``BatchSampler`` of the same ``batch_size`` over
    these indices yields exactly the grouped batches.

    The order is a pure function of ``(seed, epoch)``: every process computes the same one (so
    Accelerate's ``BatchSamplerShard`` deals whole batches to processes), ``set_epoch`` (called
    by ``DataLoaderShard.set_epoch``) reshuffles, and a resumed run that skips the first batches
    of an epoch sees the batches the straight run saw.
    """

    def __init__(self, lengths, batch_size: int, seed: int, megabatch_batches=MEGABATCH_BATCHES):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch = batch_size * megabatch_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.megabatch):
            mega = sorted(order[start : start + self.megabatch], key=lambda i: -self.lengths[i])
            cut = [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
            full = [b for b in cut if len(b) == self.batch_size]
            short = [b for b in cut if len(b) < self.batch_size]
            shuffled = torch.randperm(len(full), generator=generator).tolist()
            batches += [full[i] for i in shuffled] + short
        return batches

    def __iter__(self):
        for batch in self.batches():
            yield from batch


def train_loader_kwargs(
    dataset, batch_size: int, seed: int, group_by_length: bool, collate_fn
) -> dict:
    """DataLoader arguments for the training split: seeded random or length-grouped batches.

    Random batches use a ``RandomSampler`` with a seeded generator, which Accelerate's seedable
    sampler replaces; a length-grouped sampler is kept as it is and reseeded by ``set_epoch``.
    """
    kwargs = {"batch_size": batch_size, "collate_fn": collate_fn}
    if group_by_length:
        lengths = [len(ids) for ids in dataset["input_ids"]]
        return {**kwargs, "sampler": LengthGroupedSampler(lengths, batch_size, seed)}
    return {**kwargs, "shuffle": True, "generator": torch.Generator().manual_seed(seed)}


# -- what the batches cost --------------------------------------------------------------------------


class TokenCounts:
    """Real, computed and supervised tokens over a run, for ``metrics.json``.

    ``padding_waste`` = computed ÷ real tokens (1.00 padding-free); ``logits_fraction`` = positions
    whose LM-head logits were computed ÷ positions the model ran on.
    """

    def __init__(self, mode: str, logits_positions=None, logits_mode: str | None = None):
        self.mode = mode
        self.logits_positions = logits_positions  # batch -> positions whose logits are computed
        # full, supervised, or the fused loss kernel (logits computed in chunks, never kept)
        self.logits_mode = logits_mode or ("full" if logits_positions is None else "supervised")
        # Summed where the batches are, read once by figures(): a read per step would be a host
        # sync per step on a GPU. Order: real, computed, supervised, logit positions.
        self.counts: torch.Tensor | None = None
        self.step_time_s = 0.0

    def add(self, window, step_time_s: float) -> None:
        for batch in window:
            computed = computed_tokens(batch)
            positions = self.logits_positions(batch) if self.logits_positions else computed
            supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            row = torch.stack(
                [torch.as_tensor(x, device=supervised.device).double()
                 for x in (real_tokens(batch), computed, supervised, positions)]
            )  # fmt: skip
            self.counts = row if self.counts is None else self.counts + row
        self.step_time_s += step_time_s

    def figures(self, accelerator) -> dict:
        """Summed over processes (a collective: every process calls it)."""
        counts = torch.zeros(4, dtype=torch.float64) if self.counts is None else self.counts
        counts = accelerator.reduce(counts.to(accelerator.device), "sum")
        real, computed, supervised, logits = counts.tolist()
        seconds = self.step_time_s
        return {
            "batching": self.mode,
            "tokens_per_s": real / seconds if seconds else None,
            "supervised_tokens_per_s": supervised / seconds if seconds else None,
            "padding_waste": computed / real if real else None,
            "real_tokens": int(real),
            "computed_tokens": int(computed),
            "supervised_tokens": int(supervised),
            "logits_mode": self.logits_mode,
            "logits_fraction": logits / computed if computed else None,
        }


def mode_name(padding_free: bool, group_by_length: bool) -> str:
    if padding_free:
        return "padding_free"
    return "group_by_length" if group_by_length else "padded"
