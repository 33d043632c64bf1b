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

# PEFT 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5
# deprecates (FutureWarning) in favour of is_activation_checkpointing.  The call is PEFT's, not
# ours; ftkit's own code uses the new name.  Ignored only around ftkit's calls into PEFT.
_PEFT_GC_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


def quiet_accelerate_checkpoints() -> None:
    for name in ACCELERATE_CHECKPOINT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_bitsandbytes(quantised: bool) -> None:
    """Set before bitsandbytes is imported (it warns at import time)."""
    level = logging.NOTSET if quantised else logging.ERROR
    logging.getLogger(BNB_KERNELS_LOGGER).setLevel(level)


@contextlib.contextmanager
def peft_calls() -> Iterator[None]:
    """Around ``get_peft_model`` / ``PeftModel.from_pretrained``: PEFT's own deprecated call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_GC_DEPRECATION, category=FutureWarning)
        yield
