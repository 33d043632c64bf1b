"""A quiet console: library noise that says nothing about the run is turned down here, narrowly.

Each filter names one logger or one message, says why it cannot be avoided at the source, and is
lifted where the noise would matter (a quantised base keeps bitsandbytes' kernel warning).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# Accelerate logs seven INFO lines per save_state (one per file); checkpoint.save logs one.
ACCELERATE_CHECKPOINT_LOGGERS = ("accelerate.checkpointing", "accelerate.accelerator")

# bitsandbytes logs "Failed to load CPU gemm_4bit_forward ... pip install kernels" while being
# imported on CPUs with AVX512-BF16.  Unquantised runs import it too: `import peft` does
# (peft.helpers), and transformers imports peft as soon as its optimisation module loads (for
# get_scheduler), so no import path avoids it.  That kernel only serves 4-bit matmuls on CPU, so
# this one logger is quieted unless a quantised base is asked for.
BNB_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
# The same import asks the `kernels` package for that Hub kernel; offline (HF_HUB_OFFLINE, as in
# the tests) kernels >= 0.19 logs that it skips its publisher trust check.  Only that message is
# dropped, from that one logger, and only when no quantised base is asked for.
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
_BNB_HUB_KERNEL = "'kernels-community/quantization-bitsandbytes'"

# DeepSpeed logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable
# to detect it." when it is imported on a machine without a GPU, and Accelerate imports it whenever
# it is installed (unwrap_model looks for a DeepSpeedEngine), so every CPU run printed it.  Dropped
# from DeepSpeed's logger for runs whose accelerate config does not ask for DeepSpeed.
DEEPSPEED_LOGGER = "DeepSpeed"
_DEEPSPEED_CPU_FALLBACK = "Setting accelerator to CPU"

# PEFT 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5
# deprecates (FutureWarning) in favour of is_activation_checkpointing.  The call is PEFT's, not
# ours; ftkit's own code uses the new name.  Ignored only around ftkit's calls into PEFT.
_PEFT_GC_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


def quiet_accelerate_checkpoints() -> None:
    for name in ACCELERATE_CHECKPOINT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message contains ``text``; the rest pass."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_BNB_TRUST_CHECK = _DropMessages(_BNB_HUB_KERNEL)
_DEEPSPEED_DETECTION = _DropMessages(_DEEPSPEED_CPU_FALLBACK)


def _drop(logger_name: str, messages: _DropMessages, drop: bool) -> None:
    logger = logging.getLogger(logger_name)
    (logger.addFilter if drop else logger.removeFilter)(messages)  # each idempotent


def quiet_bitsandbytes(quantised: bool) -> None:
    """Set before bitsandbytes is imported (it warns at import time)."""
    level = logging.NOTSET if quantised else logging.ERROR
    logging.getLogger(BNB_KERNELS_LOGGER).setLevel(level)
    _drop(KERNELS_HUB_LOGGER, _BNB_TRUST_CHECK, drop=not quantised)


def quiet_deepspeed_detection(uses_deepspeed: bool) -> None:
    """Set before DeepSpeed is imported (it warns at import time)."""
    _drop(DEEPSPEED_LOGGER, _DEEPSPEED_DETECTION, drop=not uses_deepspeed)


@contextlib.contextmanager
def peft_calls() -> Iterator[None]:
    """Around ``get_peft_model`` / ``PeftModel.from_pretrained``: PEFT's own deprecated call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_GC_DEPRECATION, category=FutureWarning)
        yield
