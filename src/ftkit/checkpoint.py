"""Checkpoints (``accelerator.save_state``), written atomically, and resuming from them.

A checkpoint holds the trainable weights (the adapter, or everything for a full fine-tune), the
optimizer, the scheduler, every process's RNG state and the data position; the frozen base is
reloaded from ``model_name_or_path`` instead of being copied into every checkpoint.

ftkit's own state is data, never a pickle: ``ftkit_state.json`` (progress, scheduler, the run's
identity, the world size, the base model's eval loss) and ``rng_state_<rank>.json``. Accelerate
writes weights as safetensors and the optimizer as a tensor file it loads with
``weights_only=True``; a checkpoint holding any ``*.pkl`` (Accelerate's
``custom_checkpoint_*.pkl`` load with ``weights_only=False``) is refused before anything loads.

Every checkpoint lists the SHA-256 of all its files, every rank's included, in
``checksums.sha256`` (``ftkit.integrity``); resuming verifies them first and names a damaged file
(and the checkpoint to resume from instead) rather than loading it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from ftkit import engines, integrity
from ftkit.errors import FtkitError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "ftkit_state.json"
RNG_STATE_NAME = "rng_state_{}.json"


@dataclass
class Progress:
    """Where training is: optimizer steps done, epoch, micro-batches consumed in this epoch, and
    the steps fp16's grad scaler skipped (an overflow: no update, the scale halves)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_steps: int = 0

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


def read_state(path: Path) -> dict | None:
    """A checkpoint's ``ftkit_state.json``, or None when it has none (or it is unreadable)."""
    try:
        return json.loads((Path(path) / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def checkpoints(output_dir: Path, lineage: str | None = None) -> list[Path]:
    """Complete checkpoints, oldest first (scratch dirs of a crashed save are ignored).

    With ``lineage`` (``rundir.lineage`` of a run's identity), only the checkpoints of that run
    and its extensions: rotation and ``latest`` never consider another run's.
    """
    from ftkit.rundir import lineage as lineage_of

    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    if lineage is not None:
        found = [p for p in found if lineage_of((read_state(p) or {}).get("fields", {})) == lineage]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def rng_state() -> dict:
    """Every RNG this process draws from, as JSON-able data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data) + "\n", encoding="utf-8")


def missing_ranks(path: Path, num_processes: int) -> list[int]:
    """The ranks whose own state (``rng_state_<rank>.json``) a checkpoint dir lacks."""
    return [r for r in range(num_processes) if not (path / RNG_STATE_NAME.format(r)).is_file()]


def save(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    keep: int,
    objects: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """All processes write into a scratch dir; the main process renames it into place, then prunes.

    ``objects`` (name -> object with ``state_dict``) and ``extra`` (JSON data, e.g. the run's
    ``fingerprint``) go into ``ftkit_state.json``; rotation keeps the last ``keep`` checkpoints
    of the same fingerprint. On failure the scratch dir is removed; a full disk is one line.
    """
    from ftkit.io import umask_modes
    from ftkit.rundir import disk_full, lineage, no_space_error

    root = Path(output_dir) / "checkpoints"
    scratch = root / f".checkpoint-{step}.tmp"
    final = root / f"checkpoint-{step}"
    extra = dict(extra or {})
    try:
        if accelerator.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(
            str(scratch), safe_serialization=True, **engines.save_state_kwargs(accelerator)
        )
        _write_json(scratch / RNG_STATE_NAME.format(accelerator.process_index), rng_state())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            missing = missing_ranks(scratch, accelerator.num_processes)
            if missing:
                raise FtkitError(
                    f"checkpoint {step}: the state of rank(s) {missing} did not reach {scratch} "
                    "(output_dir is not the same directory on every node): put output_dir on a "
                    "filesystem every node mounts at the same path"
                )
            for pickled in scratch.glob("random_states_*.pkl"):  # ours is rng_state_N.json
                pickled.unlink()
            state = {
                **extra,
                "step": step,
                "world_size": accelerator.num_processes,
                **{name: obj.state_dict() for name, obj in (objects or {}).items()},
            }
            _write_json(scratch / STATE_NAME, state)
            integrity.write_manifest(scratch)  # last: every rank's files are in, pickles out
            umask_modes(scratch)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(scratch, final)
            for old in checkpoints(output_dir, lineage(extra.get("fields", {})))[:-keep]:
                # Renamed out of the pattern first: a stop mid-delete never leaves a partial
                # checkpoint-N that `latest` would pick.
                doomed = root / f".{old.name}.deleting"
                os.replace(old, doomed)
                shutil.rmtree(doomed)
            # One line per checkpoint: the CLI quiets Accelerate's own per-file INFO lines.
            logger.info("checkpoint %d saved to %s", step, final)
    except BaseException as err:  # a second Ctrl-C included: no half-written checkpoint stays
        if accelerator.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(err, Exception) and disk_full(
            err, root.parent if not root.exists() else root
        ):
            raise no_space_error(root, err) from err
        raise
    accelerator.wait_for_everyone()
    return final


def resume(
    accelerator: Accelerator,
    output_dir: Path,
    which: str,
    objects: dict | None = None,
    identity: dict | None = None,
) -> dict:
    """Load ``which`` (a checkpoint dir, or 'latest' under output_dir) into the prepared objects.

    Refused before anything loads: a checkpoint holding pickles, one whose files no longer match
    their checksums (the file named), one without ftkit's state, one of another run (its
    differing recipe fields named), or one written by another process count. A recipe that
    differs from the checkpoint's only in its horizon (``max_steps`` / ``num_train_epochs``)
    extends the run (``Trainer`` refuses a horizon behind the checkpoint's step).
    Returns the checkpoint's ``ftkit_state.json`` data.
    """
    from ftkit.rundir import differing_fields, fingerprint, horizon_moved, lineage

    ours = lineage(identity) if identity is not None else None
    if which == "latest":
        # A checkpoint whose state cannot be read is damaged, not another run's: it is the one
        # to name (below), never silently passed over for an older one.
        found = [p for p in checkpoints(output_dir) if _ours_or_unreadable(p, ours)]
        if not found:
            others = checkpoints(output_dir)
            why = f" (only another run's: {others[-1].name})" if others else ""
            raise FtkitError(
                f"resume_from_checkpoint=latest but {output_dir}/checkpoints holds no checkpoint "
                f"of this recipe{why}"
            )
        path = found[-1]
    else:
        path = Path(which)
        if not path.is_dir():
            raise FtkitError(f"checkpoint not found: {path} (pass a checkpoint-N dir or 'latest')")
    pickles = sorted(p.name for p in path.glob("*.pkl"))
    if pickles:
        raise FtkitError(
            f"checkpoint {path} holds pickle files ({', '.join(pickles)}) that ftkit never "
            "writes; loading them could run code, so it is refused: delete them or resume from "
            "a checkpoint ftkit wrote"
        )
    _refuse_damaged(accelerator, path, ours)
    state = read_state(path)
    if state is None:
        raise FtkitError(
            f"checkpoint {path} has no readable {STATE_NAME}: it was not written by this version "
            "of ftkit; start a fresh run"
        )
    theirs = state.get("fields", {})
    if (
        identity is not None
        and state.get("fingerprint") != fingerprint(identity)
        and not horizon_moved(identity, theirs)
    ):
        differing = differing_fields(identity, theirs)
        raise FtkitError(
            f"checkpoint {path} belongs to another run; its recipe differs in "
            f"{'; '.join(differing) or 'fields this ftkit does not know'}: resume with the "
            "recipe that wrote it"
        )
    saved_by = state.get("world_size")
    if saved_by != accelerator.num_processes:
        raise FtkitError(
            f"checkpoint {path} was written by {saved_by} process(es) and this run has "
            f"{accelerator.num_processes}: the data position would not match; resume with "
            f"{saved_by} process(es)"
        )
    missing = missing_ranks(path, accelerator.num_processes)
    if missing:  # checked by every rank alike: none starts loading while another refuses
        raise FtkitError(
            f"checkpoint {path} lacks the state of rank(s) {missing} "
            f"({RNG_STATE_NAME.format(missing[0])}): it is incomplete; resume from another one"
        )
    rng_path = path / RNG_STATE_NAME.format(accelerator.process_index)
    try:
        rng = json.loads(rng_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FtkitError(f"checkpoint {path}: cannot read {rng_path.name} ({err})") from err
    accelerator.load_state(str(path), **engines.load_state_kwargs(accelerator))
    for name, obj in (objects or {}).items():
        obj.load_state_dict(state[name])
    set_rng_state(rng)  # last: loading draws nothing after this
    return state


def _ours_or_unreadable(path: Path, lineage: str | None) -> bool:
    from ftkit.rundir import lineage as lineage_of

    state = read_state(path)
    return lineage is None or state is None or lineage_of(state.get("fields", {})) == lineage


def _step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.name).group(1))


def _refuse_damaged(accelerator: Accelerator, path: Path, lineage: str | None) -> None:
    """Verify ``path`` against its checksums before any of it is read, naming a damaged file.

    The main process reads the checkpoint once, however many ranks resume; every rank gets its
    verdict and raises the same line (none starts loading while another refuses).
    """
    from accelerate.utils import broadcast_object_list

    verdict = [integrity.damage(path) if accelerator.is_main_process else None]
    problem = broadcast_object_list(verdict)[0]
    if problem is None:
        return
    earlier, root = [], path.parent
    if root.name == "checkpoints" and CHECKPOINT_PATTERN.match(path.name):
        earlier = [p for p in checkpoints(root.parent, lineage) if _step(p) < _step(path)]
    fix = (
        f"resume from the previous checkpoint instead: --resume_from_checkpoint {earlier[-1]}"
        if earlier
        else "no earlier checkpoint of this run is left: start over with "
        "--overwrite_output_dir true"
    )
    raise integrity.DamagedFileError(f"checkpoint {path} is damaged: {problem}; {fix}")
