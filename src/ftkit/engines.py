"""Distributed engines (DDP, DeepSpeed ZeRO, FSDP): what was asked for, what runs, and the few
places where ftkit's loop and saving must know which one it is.

Accelerate hides most differences; these are the ones it does not:

* DeepSpeed on a machine without CUDA runs only when the Accelerator is built with ``cpu=False``
  and the gloo backend (``cpu=True`` silently turns a DeepSpeed config into plain DDP, and
  without gloo both ranks silently claim rank 0). FSDP cannot run through Accelerate without CUDA
  at all, so it is refused before the model loads.
* Under DeepSpeed, ``Accelerator.backward`` steps the engine whenever ``sync_gradients`` is set
  (``no_sync`` is a no-op for ZeRO >= 2), and the engine divides the loss by its own
  accumulation steps: :func:`loss_factor` and ``Trainer.backward_window`` handle both.
* DeepSpeed clips inside its own step: the recipe's ``max_grad_norm`` is written into the engine
  config before ``prepare`` (:func:`configure_deepspeed`).
* Checkpoints and the final adapter: ZeRO-3 partitions parameters (``numel() == 0`` locally) and
  FSDP2 turns them into DTensors, so the trainable tensors are gathered on all ranks
  (:func:`trainable_state`) before the main process writes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ftkit.errors import ConfigError, FtkitError

logger = logging.getLogger(__name__)


class EngineError(FtkitError):
    """The distributed engine asked for is not the one that would run."""


class PeerLostError(FtkitError):
    """Another process of the run stopped answering (``ddp_timeout``) or went away."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested_engine() -> str | None:
    """``deepspeed`` or ``fsdp`` when the accelerate config (via ``accelerate launch``) asks for it."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def accelerator_kwargs(engine: str | None, cuda: bool, ddp_timeout: int = 1800) -> dict:
    """The Accelerator arguments that make ``engine`` really run on this machine, with the
    recipe's process-group timeout (``ddp_timeout`` seconds) in one ``InitProcessGroupKwargs``."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    if engine == "fsdp" and not cuda:
        raise EngineError(
            "the accelerate config asks for FSDP, which Accelerate runs only on GPUs and this "
            "machine has no CUDA device: use accelerate_configs/deepspeed_zero3_cpu.yaml (ZeRO-3 "
            "shards the same way on CPU) or a DDP/CPU config"
        )
    group = {"timeout": timedelta(seconds=ddp_timeout)}
    if engine == "deepspeed" and not cuda:
        # DeepSpeed's CPU accelerator needs gloo (no oneCCL): without it every rank believes it
        # is rank 0 of 1. cpu=True would select plain DDP instead of DeepSpeed.
        group["backend"] = "gloo"
    handler = InitProcessGroupKwargs(**group)
    if not cuda and "timeout" not in handler.to_kwargs() and _world_size() > 1:
        # to_kwargs() drops values equal to its NCCL default (600 s); gloo would then wait
        # torch's 1800 s instead of the recipe's value.
        raise ConfigError(
            f"ddp_timeout {ddp_timeout} cannot reach the gloo process group (Accelerate drops a "
            "timeout equal to its NCCL default, and gloo would wait 1800 s): use 599 or 601"
        )
    return {"cpu": not cuda and engine != "deepspeed", "kwargs_handlers": [handler]}


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_engine(accelerator: Accelerator, engine: str | None) -> None:
    """Refuse a run whose engine or world size is not what the launcher asked for."""
    expected = {"deepspeed": DistributedType.DEEPSPEED, "fsdp": DistributedType.FSDP}.get(engine)
    actual = accelerator.distributed_type
    if expected is not None and actual != expected:
        hint = (
            " (ACCELERATE_USE_CPU=true or --cpu selects plain CPU DDP: unset it)"
            if _env_flag("ACCELERATE_USE_CPU")
            else ""
        )
        raise EngineError(
            f"the accelerate config asks for {engine} but Accelerate set up {actual}{hint}; "
            "refusing to train with another engine than the one asked for"
        )
    world = _world_size()
    if world != accelerator.num_processes:
        raise EngineError(
            f"the launcher started {world} processes but Accelerate sees "
            f"{accelerator.num_processes} (process group backend {accelerator.state.backend!r}): "
            "the ranks would train independently"
        )


def deepspeed_engine(accelerator: Accelerator):
    """The prepared DeepSpeed engine, or None when DeepSpeed is not running (or not prepared)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapped is None else wrapped.engine


def zero_stage(accelerator: Accelerator) -> int | None:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def _is_fsdp2(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def engine_name(accelerator: Accelerator, model=None) -> str:
    """``deepspeed``, ``fsdp``, ``ddp`` (several processes, plain data parallel) or ``none``."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP or (model is not None and _is_fsdp2(model)):
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "none"


def techniques(accelerator: Accelerator, model=None) -> dict:
    """The engine entries of metrics.json ``techniques`` (``model``: the prepared one)."""
    return {"engine": engine_name(accelerator, model), "zero_stage": zero_stage(accelerator)}


def check_recipe(accelerator: Accelerator, recipe) -> None:
    """Combinations an engine cannot run, refused before the model loads."""
    quantised = recipe.model.load_in_8bit or recipe.model.load_in_4bit
    if quantised and accelerator.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
    ):
        raise ConfigError(
            f"load_in_8bit/load_in_4bit cannot be combined with {engine_name(accelerator)} "
            "(bitsandbytes weights cannot be sharded): drop the flag or use a DDP config"
        )


def deepspeed_clipping(yaml_value, recipe_value: float) -> float:
    """DeepSpeed's ``gradient_clipping`` for a run: the recipe's ``max_grad_norm``.

    The recipe is the one place a run's settings live (it is saved with the run), so it wins;
    but an accelerate/DeepSpeed config that *explicitly* names another value is refused rather
    than silently overridden: the two files contradict each other and the user must pick one.
    ``auto``/absent defer to the recipe. (Accelerate drops an explicit ``0.0`` and DeepSpeed then
    defaults to 1.0; setting the value in code makes 0.0 mean "no clipping" as in the recipe.)
    """
    recipe_value = float(recipe_value)
    if yaml_value in (None, "auto", "none", "None"):
        return recipe_value
    if float(yaml_value) != recipe_value:
        raise ConfigError(
            f"the DeepSpeed config sets gradient_clipping={float(yaml_value)} but the recipe sets "
            f"max_grad_norm={recipe_value}: remove gradient_clipping from the accelerate config "
            "(ftkit passes the recipe's value to DeepSpeed) or make them equal"
        )
    return recipe_value


def configure_deepspeed(accelerator: Accelerator, max_grad_norm: float) -> None:
    """Before ``prepare``: the engine clips to the recipe's ``max_grad_norm`` (0 disables)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    # plugin.gradient_clipping is what the YAML (via ACCELERATE_GRADIENT_CLIPPING) or the DS
    # JSON said, 0.0 included; the config dict has lost an explicit 0.0 by now.
    plugin.deepspeed_config["gradient_clipping"] = deepspeed_clipping(
        plugin.gradient_clipping, max_grad_norm
    )


def loss_factor(accelerator: Accelerator) -> int:
    """What a per-window-token loss is multiplied by before ``backward``.

    DDP and DeepSpeed average gradients over processes (x world size); DeepSpeed's backward
    also divides by its own gradient-accumulation steps, which ftkit leaves at 1 (it marks the
    window end itself) but which a DeepSpeed JSON may set.
    """
    engine = deepspeed_engine(accelerator)
    gas = engine.gradient_accumulation_steps() if engine is not None else 1
    return accelerator.num_processes * gas


def clip_parameters(accelerator: Accelerator, model, trainable: list) -> list:
    """The parameters to hand ``Accelerator.clip_grad_norm_`` so the norm is the global one.

    Under Accelerate's FSDP it computes the global norm (FSDP1's ``model.clip_grad_norm_``, or
    its DTensor-aware FSDP2 path) only when given exactly ``model.parameters()``; any other list
    falls through to a plain torch clip, which for FSDP1 is each rank's own shard norm. Frozen
    parameters have no gradient, so the norm is still the trainable one's. (GPU-only path.)
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        return list(model.parameters())
    return trainable


# -- checkpoints and saving -----------------------------------------------------------------------


def shards_parameters(accelerator: Accelerator) -> bool:
    """FSDP or ZeRO-3: outside a module's forward a rank holds only a shard of its weights."""
    return accelerator.distributed_type == DistributedType.FSDP or zero_stage(accelerator) == 3


def shards_model(accelerator: Accelerator) -> bool:
    """DeepSpeed or FSDP: ``save_state`` writes the model itself (its hooks get no weights)."""
    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def save_state_kwargs(accelerator: Accelerator) -> dict:
    """Extra ``save_state`` arguments: DeepSpeed keeps the frozen base out of its checkpoint."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"exclude_frozen_parameters": True}
    return {}


def load_state_kwargs(accelerator: Accelerator) -> dict:
    """Extra ``load_state`` arguments: the DeepSpeed checkpoint lacks the (reloaded) frozen base."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"load_module_strict": False}
    return {}


def _zero3_partitioned(accelerator: Accelerator) -> bool:
    engine = deepspeed_engine(accelerator)
    return engine is not None and bool(engine.zero_optimization_partition_weights())


def trainable_state(accelerator: Accelerator, model) -> dict[str, torch.Tensor] | None:
    """Full trainable tensors by parameter name, on every rank; None when they are whole already.

    A collective under ZeRO-3 and FSDP: every rank must call it. ZeRO-3 parameters are gathered
    with ``GatheredParameters`` (needed once a LoRA matrix exceeds
    ``stage3_param_persistence_threshold``); FSDP2 DTensors with ``full_tensor()``; Accelerate's
    FSDP1 (GPU only) through ``get_state_dict``.
    """
    unwrapped = accelerator.unwrap_model(model)
    named = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    return gather_trainable(
        named,
        zero3=_zero3_partitioned(accelerator),
        fsdp1_state=(
            (lambda: accelerator.get_state_dict(model))
            if accelerator.distributed_type == DistributedType.FSDP and not _has_dtensors(named)
            else None
        ),
    )


def _has_dtensors(named) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for _, p in named)


def gather_trainable(named, *, zero3: bool = False, fsdp1_state=None):
    """The engine-independent part of :func:`trainable_state` (also used without Accelerate)."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().clone().cpu() for n, p in named}
    if _has_dtensors(named):
        from torch.distributed.tensor import DTensor

        return {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().cpu()
            for n, p in named
        }
    if fsdp1_state is not None:  # Accelerate's FSDP1: full state dict (rank 0), GPU only
        full = fsdp1_state() or {}
        return {n: full[n] for n, _ in named if n in full}
    return None


# -- a lost node ----------------------------------------------------------------------------------

# gloo raises a plain RuntimeError (not torch.distributed.DistError) for a peer that timed out or
# closed its connection; these are the parts of its messages that say so.
_GLOO_PEER_LOST = ("gloo/transport", "Connection closed by peer", "Connection reset by peer")


def _peer_lost(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(part in str(err) for part in _GLOO_PEER_LOST)


@contextlib.contextmanager
def peer_failures(ddp_timeout: int, resume_hint: Callable[[], str]) -> Iterator[None]:
    """Turn a collective that failed because another node stopped answering (for longer than
    ``ddp_timeout`` s) or crashed into one :class:`PeerLostError` line, naming where to resume.

    The broken process group is destroyed first: left to the interpreter's exit, gloo's threads
    abort the process ("terminate called without an active exception") after the error line.
    """
    import torch.distributed as dist

    try:
        yield
    except Exception as err:
        if not (dist.is_available() and dist.is_initialized() and _peer_lost(err)):
            raise
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        detail = detail.split("] ", 1)[-1].split(". ", 1)[0]  # no gloo source line, no advice
        cause = (
            f"no answer within ddp_timeout={ddp_timeout} s"
            if "Timed out" in detail or "timed out" in detail
            else "a process of the run went away"
        )
        raise PeerLostError(
            f"lost contact with another node or process of the run ({cause}: {detail}); "
            f"{resume_hint()}"
        ) from err
