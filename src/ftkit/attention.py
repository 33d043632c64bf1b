"""Attention over a flattened (padding-free) row at the cost of its sequences, not of the row.

transformers runs a flattened row's attention as one SDPA call over the whole row with a
block-diagonal causal mask (built from ``position_ids``): O(T²) in the row length T, although
only the blocks on the diagonal are ever used. On a batch of 8 Alpaca records (T ≈ 750) that is
~8× the attention work the sequences need, and a mask stops SDPA from using its causal kernels.
Its exact varlen path needs the ``flash-attn`` package (CUDA only), and torch has no varlen
attention on CPU, so ftkit adds the smallest thing that does it: one causal SDPA call per
sequence, cut at the ``cu_seq_lens_q`` boundaries that transformers' ``DataCollatorWithFlattening``
already writes for flash-attention. It is registered through transformers' public
``AttentionInterface`` / ``AttentionMaskInterface`` (no library code is replaced) and used only
where ``attn_implementation`` resolves to it (``auto`` with padding-free batches).

A batch without ``cu_seq_lens_q`` (a right-padded evaluation batch, generation with a cache)
goes to transformers' own SDPA with its usual mask, so the same model stays exact everywhere.
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F

from ftkit.config import SDPA_VARLEN
from ftkit.errors import ConfigError

logger = logging.getLogger(__name__)

REGISTERED_NAME = "ftkit_sdpa_varlen"  # its name in transformers' attention registry


def _sequence_attention(query, key, value, dropout: float, scaling, sliding_window) -> torch.Tensor:
    """Causal SDPA over one sequence (1, H, L, D); a window longer than L changes nothing."""
    length = query.shape[2]
    if sliding_window is None or length <= sliding_window:
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, scale=scaling, is_causal=True
        )
    # transformers' sliding window: query q sees keys k with 0 <= q - k < sliding_window.
    positions = torch.arange(length, device=query.device)
    distance = positions[:, None] - positions[None, :]
    mask = (distance >= 0) & (distance < sliding_window)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )


def sdpa_varlen_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs,
):
    """transformers' attention-function signature; (B, H, T, D) in, (B, T, H, D) out."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("sdpa_varlen does not support attention soft-capping; use eager")
    same_keys = cu_seq_lens_k is None or torch.equal(cu_seq_lens_k, cu_seq_lens_q)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2] or not same_keys:
        raise ValueError(
            "sdpa_varlen expects one flattened row without a KV cache (cu_seq_lens_q/k equal)"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens_q.tolist()  # one host sync per layer: the cut points
    pieces = [
        _sequence_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout,
            scaling,
            sliding_window,
        )
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``REGISTERED_NAME`` a transformers attention implementation (idempotent).

    Its mask function is transformers' SDPA mask, so batches without ``cu_seq_lens_q`` get
    exactly the mask (padding, causal, sliding window) that ``sdpa`` would.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REGISTERED_NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(REGISTERED_NAME, sdpa_mask)


def resolve(setting: str, padding_free: bool) -> str | None:
    """The ``attn_implementation`` to load the model with (None: transformers' default).

    ``auto``: ``sdpa_varlen`` for padding-free batches, transformers' default otherwise.
    """
    if setting == "auto":
        setting = SDPA_VARLEN if padding_free else None
    if setting == SDPA_VARLEN and not padding_free:
        raise ConfigError(
            "attn_implementation sdpa_varlen attends per sequence of a flattened row and needs "
            "padding-free batches: set padding_free true (or attn_implementation auto/sdpa)"
        )
    if setting == "flash_attention_2":
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn "
                "package (pip install flash-attn); use auto (sdpa_varlen when padding-free)"
            )
    if setting == SDPA_VARLEN:
        register()
        return REGISTERED_NAME
    return setting


def recipe_name(loaded: str) -> str:
    """What ``metrics.json`` records: the recipe's name of the implementation a model runs."""
    return SDPA_VARLEN if loaded == REGISTERED_NAME else loaded
