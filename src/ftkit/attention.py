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

On CUDA in fp16/bf16 the whole row goes to torch's variable-length flash attention instead
(``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10): one kernel per layer for every
sequence of the row, causal or sliding-window, grouped-query heads without copies where the
installed torch takes ``enable_gqa``. Per-sequence SDPA stays where it cannot run (CPU, fp32,
dropout in attention, a head size flash does not take). ``kernels_used()`` says which ran.

A batch without ``cu_seq_lens_q`` (a right-padded evaluation batch, generation with a cache)
goes to transformers' own SDPA with its usual mask, so the same model stays exact everywhere.

Host syncs: the varlen kernel needs none (the collator's ``max_length_q`` is a Python int); the
per-sequence path reads the cut points once per forward, not once per layer (every layer of a
forward gets the same ``cu_seq_lens_q`` tensor, and gradient checkpointing's recompute too).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import weakref

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


VARLEN_KERNEL, PER_SEQUENCE = "varlen_attn", "per-sequence sdpa"
_used: set[str] = set()


def kernels_used() -> list[str]:
    """The kernels padding-free rows ran on in this process since ``reset_kernels_used``."""
    return sorted(_used)


def reset_kernels_used() -> None:
    _used.clear()


def torch_varlen_attn():
    """torch's variable-length flash attention, or None where this torch has none (< 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's where it is on (as SDPA is cast under autocast:
    an fp32 base under bf16 mixed precision reaches attention with fp32 queries after RoPE)."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def varlen_kernel_applies(query: torch.Tensor, dropout: float) -> bool:
    """Where flash attention runs: CUDA, half precision, head size a multiple of 8 up to 256."""
    head_dim = query.shape[-1]
    return (
        query.is_cuda
        and compute_dtype(query) in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and not dropout
        and torch_varlen_attn() is not None
    )


@functools.lru_cache(maxsize=8)
def _takes(function, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _varlen_rows(query, key, value, cu_seq_lens, max_length: int, scaling, sliding_window, groups):
    """One varlen_attn call over the row: (1, H, T, D) in, (1, T, H, D) out."""
    kernel = torch_varlen_attn()
    gqa = {"enable_gqa": True} if groups > 1 and _takes(kernel, "enable_gqa") else {}
    if groups > 1 and not gqa:  # a torch whose varlen_attn predates GQA
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # transformers' window: query q sees keys q - k in [0, window); flash's (left, right) = (w-1, 0)
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    cu = cu_seq_lens.to(torch.int32)
    dtype = compute_dtype(query)
    out = kernel(
        *(t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value)),
        cu,
        cu,
        max_length,
        max_length,
        scale=scaling,
        window_size=window,
        **gqa,
    )
    return out.unsqueeze(0)


class _CutPoints:
    """The row's sequence boundaries as Python ints, read from the device once per forward."""

    def __init__(self):
        self._tensor = lambda: None
        self._bounds: list[int] = []

    def __call__(self, cu_seq_lens_q: torch.Tensor, cu_seq_lens_k) -> list[int]:
        if self._tensor() is not cu_seq_lens_q:
            same = cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q
            both = cu_seq_lens_q if same else torch.stack([cu_seq_lens_q, cu_seq_lens_k])
            values = both.tolist()  # the one host sync
            if not same and values[0] != values[1]:
                raise ValueError(
                    "sdpa_varlen expects one flattened row without a KV cache "
                    "(cu_seq_lens_q/k equal)"
                )
            self._bounds = values if same else values[0]
            self._tensor = weakref.ref(cu_seq_lens_q)
        return self._bounds


_cut_points = _CutPoints()


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
    max_length_q: int | None = None,
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
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError(
            "sdpa_varlen expects one flattened row without a KV cache (cu_seq_lens_q/k equal)"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if max_length_q is not None and varlen_kernel_applies(query, dropout):
        _used.add(VARLEN_KERNEL)
        # cu_seq_lens_k is the collator's copy of cu_seq_lens_q (no KV cache: checked above)
        return _varlen_rows(
            query, key, value, cu_seq_lens_q, max_length_q, scaling, sliding_window, groups
        ), None
    _used.add(PER_SEQUENCE)
    bounds = _cut_points(cu_seq_lens_q, cu_seq_lens_k)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
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
