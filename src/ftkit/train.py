"""The Accelerate-driven training loop.

Accelerate owns precision (autocast + grad scaler), process groups and gradient sync; gradient
accumulation follows Accelerate's recipe for variable-size samples (prefetch a window, count its
supervised tokens across processes, ``no_sync`` all but the last micro-batch). This module only adds what none of the libraries does for a LoRA recipe: the loss normalised per
supervised token across a whole accumulation window and all processes, a NaN guard, atomic
checkpoints that hold the adapter but not the frozen base, and an honest run log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ftkit import (
    adapters,
    attention,
    batching,
    card,
    checkpoint,
    engines,
    hub,
    quiet,
    reporting,
    rundir,
    stopping,
    tracking,
)
from ftkit.config import (
    RESOLVED_CONFIG_NAME,
    Recipe,
    precision_of_mixed_precision,
    save_recipe,
    warmup_steps,
)
from ftkit.data import InstructionData, build_datasets, collator
from ftkit.errors import ConfigError, FtkitError
from ftkit.meter import PeakMemoryMeter, parameter_counts, tensor_bytes, trainable_parameters_line
from ftkit.metrics import (
    check_fused_head,
    check_loss_kernel,
    example_losses,
    fused_head_loss,
    liger_cross_entropy,
    logits_positions,
    perplexity,
    supervised_logits_loss,
    supervised_tokens,
    use_supervised_logits,
)
from ftkit.modeling import (
    build_model,
    check_context_length,
    check_precision_combination,
    cuda_capability,
    load_tokenizer,
    requested_mixed_precision,
    require_model_dir,
    resolve_mixed_precision,
    resolve_model_path,
)

logger = logging.getLogger(__name__)


class TrainingDivergedError(FtkitError):
    """The loss became NaN/inf; training stopped before the bad step touched the weights."""


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)


def make_accelerator(ddp_timeout: int = 1800, **kwargs) -> Accelerator:
    """The run's Accelerator; ``kwargs`` (e.g. ``log_with``, ``project_dir``) go to it as they are.

    ``ddp_timeout`` (seconds) bounds every collective: a node that stops answering ends the run.
    """
    precision = resolve_mixed_precision(
        requested_mixed_precision(), torch.cuda.is_available(), cuda_capability()
    )
    engine = engines.requested_engine()  # DeepSpeed/FSDP asked for by the accelerate config
    quiet.quiet_deepspeed_detection(uses_deepspeed=engine == "deepspeed")
    accelerator = Accelerator(
        **engines.accelerator_kwargs(engine, torch.cuda.is_available(), ddp_timeout),
        mixed_precision=precision,
        # Accumulation is windowed in Trainer.backward_window (Accelerate's documented recipe for
        # per-token losses); accumulate() would miss the sync on a prefetched partial window.
        # Seeded per-epoch shuffling (set_epoch) makes a resumed run see the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **kwargs,
    )
    engines.check_engine(accelerator, engine)  # never silently another engine than asked for
    return accelerator


def check_ranks_get_distinct_records(n_records: int, batch_size: int, num_processes: int) -> None:
    """Refuse a split that cannot give every process one batch of distinct records.

    Accelerate evens the batches across processes by repeating records, so with fewer records
    than one batch per process the result silently differs from one process's (3 records on 2
    ranks train on 4). A merely uneven last round is only logged.
    """
    need = batch_size * num_processes
    if num_processes == 1 or n_records % need == 0:
        return
    if n_records < need:
        fix = (
            f"per_device_train_batch_size {n_records // num_processes}"
            if n_records >= num_processes
            else "fewer processes"
        )
        raise ConfigError(
            f"{n_records} training records cannot fill one batch of {batch_size} on each of "
            f"{num_processes} processes without repeating records (the result would differ from "
            f"one process's): use at least {need} records, {fix}, or fewer processes"
        )
    logger.warning(
        "%d training records over %d processes x %d: the last round of each epoch repeats %d "
        "records to even the batches",
        n_records,
        num_processes,
        batch_size,
        need - n_records % need,
    )


class Trainer:
    """One LoRA (or full) fine-tuning run; ``fit()`` returns its metrics."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator | None = None):
        self.recipe = recipe
        self.output_dir = Path(recipe.train.output_dir)
        # Checked before the model loads; claimed (written) in fit().
        self.identity = rundir.identity_fields(recipe)
        self.fingerprint = rundir.fingerprint(self.identity)
        rundir.check_output_dir(self.output_dir)
        self._claim(dry_run=True)  # writes nothing: a dir ftkit may not use stays untouched
        # One writer per output dir: the main process (torchrun's RANK 0; no process group
        # yet) holds the lock from here until fit() ends, so a second run is refused at once.
        self.run_lock = rundir.RunLock(self.output_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            self.run_lock.acquire()
            weakref.finalize(self, self.run_lock.release)  # a Trainer dropped without fit()
        try:
            self._set_up(accelerator)
        except BaseException:
            self.run_lock.release()
            raise

    def _set_up(self, accelerator: Accelerator | None) -> None:
        recipe = self.recipe
        self.eval_before: dict = {}
        # Before anything loads: a missing tracker package or an impossible upload is one line now.
        hub.check_can_push(recipe.train)
        check_loss_kernel(recipe.train.loss_kernel)
        tracker_kwargs = tracking.accelerator_kwargs(recipe.train)
        # Then, before any process group exists: materialising the embedded base needs no
        # collective and writes complete weights from every rank and node (its own file lock).
        self.base_path = resolve_model_path(recipe.model.model_name_or_path)
        self.memory = PeakMemoryMeter(pin_malloc=recipe.train.exact_peak_memory).start()
        self.accelerator = accelerator or make_accelerator(
            recipe.train.ddp_timeout, **tracker_kwargs
        )
        # The first collective: every node must see the output dir the main process writes.
        rundir.check_shared_output_dir(self.accelerator, self.output_dir)
        set_seed(recipe.train.seed)
        require_model_dir(self.base_path)
        self.tokenizer = load_tokenizer(self.base_path)
        check_context_length(recipe.data, self.base_path)  # before the data is tokenised
        self.padding_free = batching.resolve_padding_free(recipe.data.padding_free, self.base_path)
        attention.resolve(recipe.model.attn_implementation, self.padding_free)  # before loading
        attention.reset_kernels_used()
        # The tokens are cached per machine ($FTKIT_HOME): each node's local main process
        # builds them while the node's other processes wait, then those read the cache.
        with self.accelerator.local_main_process_first():
            self.data: InstructionData = build_datasets(
                recipe.data, self.tokenizer, recipe.train.seed
            )
        check_precision_combination(recipe, self.accelerator.mixed_precision)
        engines.check_recipe(self.accelerator, recipe)
        self.loss_kernel = self._loss_kernel()
        self.split = rundir.split_identity(self.data)
        check_ranks_get_distinct_records(
            len(self.data.train),
            recipe.train.per_device_train_batch_size,
            self.accelerator.num_processes,
        )
        model = build_model(
            recipe.model,
            recipe.adapter,
            recipe.train.seed,
            device=self.accelerator.device,
            tokenizer=self.tokenizer,  # an added pad token resizes the embeddings
            padding_free=self.padding_free,
        )
        # What the model really runs (transformers' default may differ per architecture).
        self.attn_implementation = attention.recipe_name(model.config._attn_implementation)
        self.memory.make_resident(model.parameters())
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=recipe.train.learning_rate,
            weight_decay=recipe.train.weight_decay,
        )
        train_loader, eval_loader = self._loaders()
        engines.configure_deepspeed(self.accelerator, recipe.train.max_grad_norm)
        self.supervised_logits = use_supervised_logits(recipe.train.supervised_logits_only, model)
        self.token_counts = batching.TokenCounts(
            batching.mode_name(self.padding_free, recipe.data.group_by_length),
            logits_positions if self.supervised_logits or self.loss_kernel else None,
            logits_mode=recipe.train.loss_kernel if self.loss_kernel else None,
        )
        self.model, self.optimizer, self.train_loader, self.eval_loader = self.accelerator.prepare(
            model, optimizer, train_loader, eval_loader
        )
        # After prepare: FSDP2 replaces every parameter, so clipping must see the prepared ones.
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.total_steps = self._total_steps()
        # Not prepared: Accelerate's wrapper would step it once per process; we step once per
        # optimizer step, and register it so save_state/load_state include it.
        self.scheduler = get_scheduler(
            recipe.train.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=warmup_steps(recipe.train.warmup_ratio, self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.progress = checkpoint.Progress()
        self.stop = stopping.StopRequest()  # signal handlers: installed by fit() for its loop
        self.stop_signal: int | None = None  # the signal all ranks agreed to stop on
        self.horizon_moved: dict | None = None  # an extended run: where, and from what
        # Saved as data (ftkit_state.json) by checkpoint.save, not as Accelerate's pickles.
        self.checkpointed = {"scheduler": self.scheduler, "progress": self.progress}
        checkpoint.register_adapter_only_hooks(self.accelerator)

    def _loss_kernel(self):
        """The fused head+loss kernel asked for (None: the model's head, then cross-entropy)."""
        kernel = self.recipe.train.loss_kernel
        if kernel == "none":
            return None
        from transformers import AutoConfig

        check_fused_head(
            kernel,
            AutoConfig.from_pretrained(self.base_path).model_type,
            self.recipe.adapter.lora_target,
            engines.shards_parameters(self.accelerator),
        )
        return liger_cross_entropy()

    def _claim(self, dry_run: bool = False) -> None:
        cfg = self.recipe.train
        rundir.claim(
            self.output_dir,
            self.recipe,
            overwrite=cfg.overwrite_output_dir,
            resuming=bool(cfg.resume_from_checkpoint),
            dry_run=dry_run,
            split=getattr(self, "split", None),
            fields=self.identity,  # the recipe as given (Trainer resolves e.g. data_format: auto)
        )

    def _run_state(self) -> dict:
        """What every checkpoint records besides weights: the run's identity, the base's eval."""
        return {
            "fingerprint": self.fingerprint,
            "fields": self.identity,
            "eval_before": self.eval_before,
        }

    def _loaders(self) -> tuple[DataLoader, DataLoader]:
        pad = collator(self.tokenizer)
        cfg = self.recipe.train
        train = DataLoader(
            self.data.train,
            **batching.train_loader_kwargs(
                self.data.train,
                cfg.per_device_train_batch_size,
                cfg.seed,
                self.recipe.data.group_by_length,
                batching.flattening_collator() if self.padding_free else pad,
            ),
        )
        evaluation = DataLoader(
            self.data.eval, batch_size=cfg.per_device_eval_batch_size, collate_fn=pad
        )
        return train, evaluation

    @property
    def windows_per_epoch(self) -> int:
        return math.ceil(len(self.train_loader) / self.recipe.train.gradient_accumulation_steps)

    def _total_steps(self) -> int:
        cfg = self.recipe.train
        if cfg.max_steps > 0:
            return cfg.max_steps
        return max(1, math.ceil(cfg.num_train_epochs * self.windows_per_epoch))

    # -- one optimizer step ---------------------------------------------------------------------

    def windows(self):
        """Yield lists of micro-batches, one list per optimizer step (the last may be partial)."""
        ga = self.recipe.train.gradient_accumulation_steps
        while self.progress.step < self.total_steps:
            self.train_loader.set_epoch(self.progress.epoch)
            loader = self.accelerator.skip_first_batches(
                self.train_loader, self.progress.batches_in_epoch
            )
            window = []
            for batch in loader:
                window.append(batch)
                if len(window) == ga:
                    yield window
                    window = []
            if window:
                yield window
            self.progress.next_epoch()

    def backward_window(self, window) -> torch.Tensor:
        """Forward+backward a window; gradients equal one big batch's, per supervised token.

        This is Accelerate's recipe for gradient accumulation on samples of variable size: the
        window is prefetched so its supervised tokens can be summed over all processes, each
        micro-batch loss is ``sum_token_loss / window_tokens`` (transformers' ``num_items_in_batch``)
        times the world size (DDP averages over processes), and gradients are synced only on the
        last micro-batch. Returns the window's loss.
        """
        acc = self.accelerator
        window_tokens = acc.reduce(sum(supervised_tokens(b) for b in window), "sum")
        window_loss = torch.zeros((), device=acc.device)
        factor = engines.loss_factor(acc)
        try:
            for i, batch in enumerate(window):
                last = i == len(window) - 1
                # DeepSpeed's backward steps the engine whenever sync_gradients is set (no_sync
                # is a no-op for ZeRO >= 2): mark the window's end. Nothing else reads it here.
                acc.sync_gradients = last
                with contextlib.nullcontext() if last else acc.no_sync(self.model):
                    # Only the loss: the model's output object would keep the full logits
                    # (micro-batch x seq x vocab) alive through backward.
                    loss = self.forward_micro_batch(batch, window_tokens).loss
                    acc.backward(loss * factor)
                    window_loss += loss.detach()
        finally:
            acc.sync_gradients = True
        return acc.reduce(window_loss, "sum")

    def forward_micro_batch(self, batch, window_tokens):
        """The micro-batch's output, whose ``.loss`` is summed over its supervised tokens ÷ the
        window's.

        Supervised-logits mode runs the LM head only at supervised positions; otherwise the model
        computes full logits and its own loss (``num_items_in_batch``). ``use_cache=False``
        always: a KV cache would make transformers ignore a flattened row's sequence boundaries.
        """
        if self.loss_kernel is not None:
            return fused_head_loss(self.model, batch, window_tokens, self.loss_kernel)
        if self.supervised_logits:
            return supervised_logits_loss(self.model, batch, window_tokens)
        return self.model(**batch, use_cache=False, num_items_in_batch=window_tokens)

    def clip_gradients(self) -> torch.Tensor | None:
        """The pre-clip gradient norm (a tensor: not read here), gradients clipped in place."""
        if self.recipe.train.max_grad_norm <= 0:
            return None
        # Under DeepSpeed the engine clipped in its step; this returns its pre-clip norm.
        return self.accelerator.clip_grad_norm_(
            engines.clip_parameters(self.accelerator, self.model, self.trainable),
            self.recipe.train.max_grad_norm,
        )

    def apply_update(self) -> None:
        """The optimizer and scheduler step on the (clipped) gradients, which are then freed."""
        self.optimizer.step()
        if self.accelerator.optimizer_step_was_skipped:
            self.progress.skipped_steps += 1
        else:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip, then update: one optimizer step on the window's gradients; returns the norm."""
        grad_norm = self.clip_gradients()
        self.apply_update()
        return grad_norm

    def train_step(self, window) -> dict:
        """One optimizer step over ``window``; a non-finite loss stops before touching weights.

        The step reads the device once: the loss (which decides whether the weights may change),
        the gradient norm and the real-token count together, in one transfer. On a GPU every
        read is a host sync; a read per figure would be three per step.
        """
        acc = self.accelerator
        step_start = time.perf_counter()
        window_loss = self.backward_window(window)
        grad_norm = self.clip_gradients()
        real = sum(batching.real_tokens(b) for b in window)
        # One collective for the real-token count and every rank's stop vote (stopping.py).
        votes = real.new_tensor(self.stop.votes())
        counts = acc.reduce(torch.cat([real.reshape(1), votes]), "sum")
        figures = [window_loss, *counts] + ([] if grad_norm is None else [grad_norm])
        # (DeepSpeed's engine hands back its gradient norm as a Python float: as_tensor takes both)
        loss, real_tokens, *rest = torch.stack(
            [torch.as_tensor(x, dtype=torch.float64, device=window_loss.device) for x in figures]
        ).tolist()
        self.stop_signal = stopping.agreed_signal(rest[: len(votes)])
        norm = rest[len(votes) :]
        step = self.progress.step + 1
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(
                f"non-finite loss ({loss}) at step {step}: stopped before updating the weights; "
                f"the last good checkpoint in {self.output_dir / 'checkpoints'} is intact "
                "(lower learning_rate, or use bf16 instead of fp16)"
            )
        lr = self.scheduler.get_last_lr()[0]
        self.apply_update()
        self.progress.advance(len(window))
        elapsed = time.perf_counter() - step_start
        self.token_counts.add(window, elapsed)
        return {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": norm[0] if norm else None,
            "tokens_per_s": real_tokens / elapsed,
            "step_time_s": elapsed,
            "tokens": real_tokens,
        }

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Mean loss per supervised token over the held-out split, and its perplexity.

        Under a forked RNG: evaluating never changes what training draws next (dropout, data).
        """
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict:
        if len(self.data.eval) == 0:
            return {}
        self.model.eval()
        loss_sum = torch.zeros((), device=self.accelerator.device)
        tokens = torch.zeros((), device=self.accelerator.device, dtype=torch.long)
        for batch in self.eval_loader:
            sums, counts = self.accelerator.gather_for_metrics(
                example_losses(self.model, batch, self.supervised_logits)
            )
            loss_sum += sums.sum()
            tokens += counts.sum()
        self.model.train()
        loss = float(loss_sum / tokens)
        return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}

    # -- the run --------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            self.run_lock.release()

    def _fit(self) -> TrainResult:
        acc, cfg = self.accelerator, self.recipe.train
        if acc.is_main_process:
            self._claim()
        acc.wait_for_everyone()
        if cfg.resume_from_checkpoint:
            state = checkpoint.resume(
                acc,
                self.output_dir,
                cfg.resume_from_checkpoint,
                objects=self.checkpointed,
                identity=self.identity,
            )
        log = reporting.RunLog(
            self.output_dir, enabled=acc.is_main_process, append=bool(cfg.resume_from_checkpoint)
        )
        if cfg.resume_from_checkpoint:
            log.resume_at(self.progress.step)  # each step once: drop rows a killed run logged
            self.eval_before = state.get("eval_before") or {}  # the base's, not the checkpoint's
            if state.get("fingerprint") != self.fingerprint:
                self._move_horizon(state["fields"])
        else:
            self.eval_before = self.evaluate()  # step 0: the base model
        if acc.is_main_process:
            save_recipe(self.recipe, self.output_dir / RESOLVED_CONFIG_NAME)
            logger.info(trainable_parameters_line(*parameter_counts(self.model)))
        before = self.eval_before
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.progress.step,
            disable=not acc.is_local_main_process,
            desc="train",
        )
        # Every logging_steps steps, one row to metrics.jsonl, the bar and the trackers.
        steps = tracking.StepLogger(acc, self.recipe, log, bar, self.total_steps)
        steps.start()
        steps.track(before, self.progress.step)
        start = time.perf_counter()
        try:
            with self.stop:
                self._train_loop(bar, steps)
        except KeyboardInterrupt:
            if self.stop.signum is None:
                raise
            raise stopping.interrupted_at_once() from None  # a second Ctrl-C
        finally:
            bar.close()  # on an error too: the bar's line ends before the error line
        wall_time = time.perf_counter() - start
        after = self.evaluate()
        steps.track(after, self.progress.step)
        metrics = {
            "train_loss": log.last_loss,
            "eval_loss_before": before.get("eval_loss"),
            "eval_loss": after.get("eval_loss"),
            "eval_perplexity_before": before.get("eval_perplexity"),
            "eval_perplexity": after.get("eval_perplexity"),
            "steps": self.progress.step,
            "optimizer_steps_skipped": self.progress.skipped_steps,
            "wall_time_s": wall_time,
            "horizon_moved": self.horizon_moved,  # set when this run extended a checkpoint's
            "train_records": len(self.data.train),
            "eval_records": len(self.data.eval),
            "techniques": self.techniques(),
            "memory": self.memory_figures(),
            "throughput": self.token_counts.figures(acc),
        }
        metrics.update(reporting.plan_beside_measured(cfg, metrics["memory"], log.history))
        self.save_artifacts(metrics, log)
        if acc.is_main_process:
            print(reporting.summary(metrics, self.output_dir))
            if cfg.push_to_hub:
                hub.push(self.output_dir, cfg)
        acc.wait_for_everyone()
        steps.end()
        return TrainResult(self.output_dir, metrics, log.history)

    def _move_horizon(self, theirs: dict) -> None:
        """Resume a run whose ``max_steps`` / ``num_train_epochs`` moved (an extension).

        As in HF Trainer, the schedule is the one for the new total, from the resumed step on:
        the scheduler was built for the new total and the checkpoint restored its step, so the
        learning rate is re-derived for that step (the checkpoint's optimizer holds the old
        schedule's). Warmup, if ratio-based, is the new total's too. Recorded in metrics.json.
        """
        step = self.progress.step
        if step > self.total_steps:
            raise ConfigError(
                f"the checkpoint is at step {step}, past this recipe's {self.total_steps} steps: "
                "raise max_steps / num_train_epochs, or resume with the recipe's old values"
            )
        self.scheduler.last_epoch -= 1
        self.scheduler.step()  # public API: sets the optimizer's lr for the step after `step`
        if self.accelerator.is_main_process:
            rundir.move_horizon(self.output_dir, self.identity)
        moved = {
            k: [theirs.get(k), self.identity.get(k)]
            for k in rundir.HORIZON
            if theirs.get(k) != self.identity.get(k)
        }
        self.horizon_moved = {"at_step": step, "total_steps": self.total_steps, **moved}
        logger.info(
            "extending the run from step %d: %s (the learning-rate schedule follows the new "
            "total from here)",
            step,
            ", ".join(f"{k} {a} -> {b}" for k, (a, b) in moved.items()),
        )

    def _train_loop(self, bar, steps) -> None:
        """Optimizer steps until the horizon, or until a signal: then checkpoint and stop.

        With ``save_steps`` set, the last step is checkpointed too (as HF Trainer does), so a
        finished run can be extended exactly from where it ended.
        """
        cfg = self.recipe.train
        for window in self.windows():
            row = self.train_step(window)
            step = row["step"]
            bar.update(1)
            steps.train_step(row)
            done = step >= self.total_steps
            stopping_now = self.stop_signal is not None and not done
            if cfg.eval_steps and step % cfg.eval_steps == 0 and not done and not stopping_now:
                steps.evaluation(step, self.evaluate())
            if stopping_now or (cfg.save_steps and (step % cfg.save_steps == 0 or done)):
                checkpoint.save(
                    self.accelerator,
                    self.output_dir,
                    step,
                    cfg.save_total_limit,
                    objects=self.checkpointed,
                    extra=self._run_state(),
                )
            if stopping_now:
                steps.flush()
                raise stopping.stopped_at(step, self.stop_signal)
            if done:
                break
        steps.flush()

    def memory_figures(self) -> dict:
        """Exact tensor bytes plus the measured peak; activations are the residual."""
        tensors = tensor_bytes(self.accelerator.unwrap_model(self.model), self.optimizer)
        peak = self.memory.read()
        split = peak.split(tensors)
        return {
            "trainable_params": tensors.trainable_params,
            "total_params": tensors.total_params,
            "params_bytes": split.params,
            "grads_bytes": split.grads,
            "optimizer_bytes": split.optimizer,
            "activations_bytes": split.activations,
            "peak_bytes": split.peak,
            "reserved_bytes": peak.reserved,
            "device_used_bytes": peak.device_used,  # CUDA: the whole process, as NVML sees it
            "peak_kind": self.memory.kind,
        }

    def techniques(self) -> dict:
        """What was active, recorded next to the figures so ablations need no guessing."""
        quant = (
            "8bit"
            if self.recipe.model.load_in_8bit
            else "4bit"
            if self.recipe.model.load_in_4bit
            else None
        )
        return {
            "precision": precision_of_mixed_precision(self.accelerator.mixed_precision),
            "model_dtype": self.recipe.model.model_dtype,
            "gradient_accumulation_steps": self.recipe.train.gradient_accumulation_steps,
            "gradient_checkpointing": self.recipe.model.gradient_checkpointing,
            "attn_implementation": self.attn_implementation,
            # what sdpa_varlen ran padding-free rows on (torch's varlen kernel or per sequence)
            "attn_kernels": attention.kernels_used(),
            "lora_impl": self.recipe.adapter.lora_impl,
            "quantization": quant,
            "world_size": self.accelerator.num_processes,
            "distributed_type": str(self.accelerator.distributed_type),
            **engines.techniques(self.accelerator, self.model),
            "device": str(self.accelerator.device),
        }

    def save_artifacts(self, metrics: dict | None = None, log=None) -> None:
        """Adapter (or full model), tokenizer, config and metrics: one all-or-nothing commit.

        Everything is staged in one scratch dir, then renamed in (``rundir.commit``); written by
        the main process only. A full disk leaves the dir as it was and says so in one line.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        state = engines.trainable_state(acc, self.model)  # all ranks: a gather under ZeRO-3/FSDP
        if acc.is_main_process:
            rundir.commit(self.output_dir, partial(self._write_artifacts, metrics, log, state))
            if metrics is not None:
                # After the weights: replaces the empty template README.md PEFT's save writes;
                # listed in the run marker, so the next run knows the README is ftkit's.
                card.write_model_card(self.recipe, metrics, self.output_dir)
                rundir.record_artefacts(self.output_dir, [card.CARD_NAME])
        acc.wait_for_everyone()

    def _write_artifacts(self, metrics, log, state, stage: Path) -> None:
        adapters.save_trained(
            self.accelerator.unwrap_model(self.model),
            stage,
            impl=self.recipe.adapter.lora_impl,
            base_model_name_or_path=self.base_path,
            state_dict=state,
        )
        self.tokenizer.save_pretrained(stage)
        save_recipe(self.recipe, stage / RESOLVED_CONFIG_NAME)
        if metrics is not None and log is not None:
            log.finish(metrics, stage)


def train(recipe: Recipe) -> TrainResult:
    """One run; a lost node (stopped or crashed) is one ``ftkit error:`` line, never a hang."""
    with engines.peer_failures(recipe.train.ddp_timeout, partial(_resume_hint, recipe)):
        return Trainer(recipe).fit()


def _resume_hint(recipe: Recipe) -> str:
    """Where a lost run can continue from: its newest complete checkpoint, if any."""
    found = checkpoint.checkpoints(
        recipe.train.output_dir, rundir.lineage(rundir.identity_fields(recipe))
    )
    if not found:
        return "no checkpoint was saved yet (set save_steps to make a run resumable)"
    return (
        f"the last complete checkpoint is {found[-1]}: once every node is up, rerun with "
        "--resume_from_checkpoint latest"
    )
