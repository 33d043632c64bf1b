"""Checkpoints (``accelerator.save_state``), written atomically, and resuming from them.

A checkpoint holds the trainable weights (the adapter, or everything for a full fine-tune), the
optimizer, the scheduler, every process's RNG state and the data position; the frozen base is
reloaded from ``model_name_or_path`` instead of being copied into every checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from ftkit import engines
from ftkit.errors import FtkitError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Progress:
    """Where training is: optimizer steps done, epoch, micro-batches consumed in this epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0

    def advance(self, micro_batches: int) -> None:
        self.step += 1
        self.batches_in_epoch += micro_batches

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_in_epoch = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def register_adapter_only_hooks(accelerator: Accelerator) -> None:
    """Make save_state/load_state store only trainable weights, via Accelerate's own hooks.

    Not under DeepSpeed/FSDP: there the engine writes the model itself and the hooks get no
    weights; DeepSpeed leaves the frozen base out instead (``engines.save_state_kwargs``).
    """
    if engines.shards_model(accelerator):
        return

    def save_trainable(models, weights, output_dir):
        for index, model in enumerate(models):
            weights[index] = _trainable_state(accelerator.unwrap_model(model))

    def load_trainable(models, input_dir):
        for index, model in enumerate(models):
            suffix = "" if index == 0 else f"_{index}"
            state = load_file(os.path.join(input_dir, f"model{suffix}.safetensors"))
            target = accelerator.unwrap_model(model)
            missing = set(_trainable_state(target)) - set(state)
            if missing:
                raise FtkitError(
                    f"checkpoint {input_dir} lacks {len(missing)} trainable tensors "
                    f"(e.g. {sorted(missing)[0]}): it was made with another adapter setup"
                )
            target.load_state_dict(state, strict=False)
        models.clear()  # loaded here: Accelerate must not load them again as full models

    accelerator.register_save_state_pre_hook(save_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (scratch dirs of a crashed save are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def save(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """All processes write into a scratch dir; the main process renames it into place, then prunes."""
    root = Path(output_dir) / "checkpoints"
    scratch = root / f".checkpoint-{step}.tmp"
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(
        str(scratch), safe_serialization=True, **engines.save_state_kwargs(accelerator)
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(scratch, final)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
        # One line per checkpoint: the CLI quiets Accelerate's own per-file INFO lines.
        logger.info("checkpoint %d saved to %s", step, final)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator: Accelerator, output_dir: Path, which: str) -> Path:
    """Load ``which`` (a checkpoint dir, or 'latest' under output_dir) into the prepared objects."""
    if which == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise FtkitError(f"resume_from_checkpoint=latest but {output_dir}/checkpoints is empty")
        path = found[-1]
    else:
        path = Path(which)
        if not path.is_dir():
            raise FtkitError(f"checkpoint not found: {path} (pass a checkpoint-N dir or 'latest')")
    accelerator.load_state(str(path), **engines.load_state_kwargs(accelerator))
    return path
