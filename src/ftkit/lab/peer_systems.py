"""What runs inside one ``make bench-peers`` process: TRL's SFTTrainer, HF Trainer + PEFT, a bare loop.

``ftkit.lab.peers`` starts each run as ``accelerate launch ... -m ftkit.lab.peer_systems SPEC.json``
(ftkit's own rows go through ``ftkit train`` instead), so every system gets the same launcher,
thread count and environment. A run trains ``steps`` optimizer steps and writes one JSON result:
per step, what the batch it trained held (supervised tokens, sequences, computed positions) and
the step's time; and the wall time of all steps, from just before the first batch is drawn to
the end of the last optimizer step, so model loading and tokenisation are left out, as
ftkit's own ``wall_time_s`` leaves them out.

How each system is timed: the Trainers by a callback (``on_epoch_begin`` of the first epoch to
``on_step_end`` of the last step; a step is ``on_step_begin`` to ``on_step_end``, after its batch
is fetched); the bare loop by timestamps at the same points. What a batch holds is counted from
the tensors the model is called with (a Trainer subclass whose ``training_step`` counts, then
defers to the Trainer's own).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from ftkit.data import IGNORE_INDEX

SYSTEMS = ("trl", "trl_padding_free", "trl_packing", "hf", "hf_group_by_length", "bare")
LORA_TARGET = ["q_proj", "v_proj"]


def batch_counts(batch) -> dict:
    """Supervised tokens (shifted labels), sequences and computed positions of one micro-batch.

    A flattened row (position ids, no attention mask: ftkit's and TRL's padding-free and packed
    batches) holds one sequence per position id 0; a padded batch one per row.
    """
    labels = batch["labels"]
    position_ids = batch.get("position_ids")
    flattened = position_ids is not None and "attention_mask" not in batch
    return {
        "supervised_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "sequences": int((position_ids == 0).sum()) if flattened else int(labels.shape[0]),
        "computed_tokens": int(labels.numel()),
    }


# -- the Trainers -------------------------------------------------------------------------------


def _clock_callback(steps: int):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Step times and the wall time of all steps, from the Trainer's own events."""

        def __init__(self):
            self.start = self.end = self._began = None
            self.step_times: list[float] = []

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self._began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step_times.append(now - self._began)
            if state.global_step == steps:
                self.end = now

    return StepClock()


def _counting(trainer_cls):
    """``trainer_cls`` whose ``training_step`` records what each micro-batch holds first."""

    class Counting(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.batch_counts: list[dict] = []

        def training_step(self, model, inputs, *args, **kwargs):
            self.batch_counts.append(batch_counts(inputs))
            return super().training_step(model, inputs, *args, **kwargs)

    Counting.__name__ = f"Counting{trainer_cls.__name__}"
    return Counting


def _trainer_result(trainer, clock, steps: int) -> dict:
    if clock.end is None or len(trainer.batch_counts) != steps:
        raise RuntimeError(
            f"the Trainer ran {len(trainer.batch_counts)} micro-batches and "
            f"{trainer.state.global_step} steps, not {steps}"
        )
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "steps": [
            {**counts, "step_time_s": seconds}
            for counts, seconds in zip(trainer.batch_counts, clock.step_times, strict=True)
        ],
        "window_wall_s": clock.end - clock.start,
        "final_loss": losses[-1] if losses else None,
    }


def _schedule(spec: dict) -> dict:
    """TrainingArguments of the workload's optimisation (fp32, no GC, AdamW), for both Trainers."""
    from ftkit.config import warmup_steps

    train = _ftkit_recipe(spec).train
    return {
        "output_dir": spec["output_dir"],
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "max_steps": train.max_steps,
        "learning_rate": train.learning_rate,
        "lr_scheduler_type": train.lr_scheduler_type,
        "warmup_steps": warmup_steps(train.warmup_ratio, train.max_steps),
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "optim": "adamw_torch",
        "seed": train.seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        # TRL defaults to bf16 and gradient checkpointing: the workload's precision, every
        # system the same (fp32, or bf16 autocast over a bf16 base with fp32 adapters)
        "bf16": spec.get("precision") == "bf16",
        "fp16": False,
        "use_cpu": not torch.cuda.is_available(),  # what a CPU user sets (bf16 refuses without)
        **_without_gradient_checkpointing(),  # and without GC, as ftkit's default
        "dataloader_num_workers": 0,
    }


def _without_gradient_checkpointing() -> dict:
    """GC off, under the name the installed TrainingArguments has as a field.

    Newer transformers rename ``gradient_checkpointing`` to ``activation_checkpointing`` and keep
    the old name as an alias that loses to a subclass default of the new one (TRL's SFTConfig
    turns GC on): so the new name where it exists, the old one before it (5.17 has no other).
    """
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in known
        else "gradient_checkpointing"
    )
    return {name: False}


def _lora_config(spec: dict):
    from peft import LoraConfig

    adapter = _ftkit_recipe(spec).adapter
    return LoraConfig(
        r=adapter.lora_r,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.lora_dropout,
        target_modules=adapter.lora_target,
        task_type="CAUSAL_LM",
    )


def _base_model(spec: dict):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if spec.get("precision") == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)


def _ftkit_recipe(spec: dict):
    from ftkit.config import Recipe

    return Recipe.from_dict(spec["recipe"], source="the bench-peers workload")


def run_hf(spec: dict, group_by_length: bool) -> dict:
    """transformers' Trainer + PEFT LoRA + DataCollatorForSeq2Seq on ftkit's tokenised records.

    The records are tokenised by ftkit's own data code (``build_datasets``), so prompt masks and
    truncation are ftkit's exactly; ``ftkit.data.collator`` is the DataCollatorForSeq2Seq.
    """
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from ftkit.data import build_datasets, collator
    from ftkit.modeling import load_tokenizer

    recipe = _ftkit_recipe(spec)
    tokenizer = load_tokenizer(spec["model_dir"])
    data = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    strategy = "group_by_length" if group_by_length else "random"
    args = TrainingArguments(**_schedule(spec), train_sampling_strategy=strategy)
    model = get_peft_model(_base_model(spec), _lora_config(spec))
    steps = recipe.train.max_steps
    clock = _clock_callback(steps)
    trainer = _counting(Trainer)(
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=collator(tokenizer),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    return _trainer_result(trainer, clock, steps)


def prompt_completion_records(spec: dict) -> list[dict]:
    """The Alpaca records as TRL prompt/completion pairs: ftkit's Alpaca template is the prompt.

    TRL masks the prompt (``completion_only_loss`` defaults to on for this format) and appends
    EOS to the completion, as ftkit supervises the response and its EOS.
    """
    from ftkit.data import load_records, load_template, validate_records

    records = validate_records(load_records(spec["records"]), spec["records"], data_format="alpaca")
    template = load_template()
    return [
        {"prompt": template.format(r["instruction"], r["input"]), "completion": r["output"]}
        for r in records
    ]


def run_trl(spec: dict, padding_free: bool, packing: bool) -> dict:
    """TRL's SFTTrainer with a PEFT LoRA config, on prompt/completion records, as users run it.

    TRL's own tokenisation, masking and collator; its defaults except the workload's (fp32, no
    gradient checkpointing, batch, steps, learning rate). Padding-free without packing makes TRL
    refuse ``max_length`` (it cannot truncate there), so that row runs untruncated; packing
    (best-fit decreasing) fills rows of ``max_length`` tokens, so a step holds more sequences.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    recipe = _ftkit_recipe(spec)
    config = SFTConfig(
        **_schedule(spec),
        max_length=None if padding_free and not packing else recipe.data.max_length,
        padding_free=padding_free,
        packing=packing,
    )
    steps = recipe.train.max_steps
    clock = _clock_callback(steps)
    trainer = _counting(SFTTrainer)(
        model=_base_model(spec),
        args=config,
        train_dataset=Dataset.from_list(prompt_completion_records(spec)),
        processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
        peft_config=_lora_config(spec),
        callbacks=[clock],
    )
    trainer.train()
    return _trainer_result(trainer, clock, steps)


# -- the bare loop ------------------------------------------------------------------------------


def ftkit_loader(data, recipe, tokenizer, padding_free: bool):
    """A plain DataLoader that yields exactly the batches ftkit's prepared train loader yields.

    ftkit's random batches come from Accelerate's seedable sampler, which ``prepare`` puts in
    place of the loader's RandomSampler (a permutation seeded with seed + epoch); that sampler is
    used here directly. Length-grouped batches keep ftkit's own sampler, as ``prepare`` does.
    """
    from accelerate.data_loader import SeedableRandomSampler
    from torch.utils.data import DataLoader

    from ftkit import batching
    from ftkit.data import collator

    cfg = recipe.train
    kwargs = batching.train_loader_kwargs(
        data,
        cfg.per_device_train_batch_size,
        cfg.seed,
        recipe.data.group_by_length,
        batching.flattening_collator() if padding_free else collator(tokenizer),
    )
    if "sampler" not in kwargs:
        kwargs.pop("shuffle")
        kwargs.pop("generator")
        kwargs["sampler"] = SeedableRandomSampler(data_source=data, data_seed=cfg.seed)
    return DataLoader(data, **kwargs)


def run_bare(spec: dict) -> dict:
    """A plain torch loop over the batches ftkit makes, with ftkit's model, loss and optimizer.

    ftkit's own pieces (tokeniser, ``build_datasets``, batching mode, ``build_model``, the
    supervised-logits loss) and a torch ``DataLoader``, AdamW, gradient clipping and the same
    LR schedule, without Accelerate or ftkit's loop: the floor ftkit's step time is compared to.
    """
    from accelerate.utils import send_to_device, set_seed
    from transformers import get_scheduler

    from ftkit import batching
    from ftkit.config import warmup_steps
    from ftkit.data import build_datasets
    from ftkit.metrics import supervised_logits_loss, supervised_tokens, use_supervised_logits
    from ftkit.modeling import build_model, load_tokenizer

    recipe = _ftkit_recipe(spec)
    cfg, seed = recipe.train, recipe.train.seed
    set_seed(seed)
    tokenizer = load_tokenizer(spec["model_dir"])
    data = build_datasets(recipe.data, tokenizer, seed)
    padding_free = batching.resolve_padding_free(recipe.data.padding_free, spec["model_dir"])
    loader = ftkit_loader(data.train, recipe, tokenizer, padding_free)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as the Trainers
    model = build_model(
        recipe.model, recipe.adapter, seed, device, tokenizer=tokenizer, padding_free=padding_free
    )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(cfg.warmup_ratio, cfg.max_steps),
        num_training_steps=cfg.max_steps,
    )
    supervised_logits = use_supervised_logits(cfg.supervised_logits_only, model)
    bf16 = spec.get("precision") == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    rows, loss = [], None
    start = time.perf_counter()
    for epoch in range(math.ceil(cfg.max_steps / len(loader))):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batch = send_to_device(batch, device)  # max_length_q/k are ints
            began = time.perf_counter()
            tokens = supervised_tokens(batch)
            with autocast:  # as Accelerate wraps ftkit's forward under bf16 mixed precision
                if supervised_logits:
                    out = supervised_logits_loss(model, batch, tokens)
                else:
                    out = model(**batch, use_cache=False, num_items_in_batch=tokens)
            out.loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(out.loss)
            rows.append({**batch_counts(batch), "step_time_s": time.perf_counter() - began})
            if len(rows) == cfg.max_steps:
                break
    return {"steps": rows, "window_wall_s": time.perf_counter() - start, "final_loss": loss}


def run(spec: dict) -> dict:
    system = spec["system"]
    runners = {
        "trl": lambda: run_trl(spec, padding_free=False, packing=False),
        "trl_padding_free": lambda: run_trl(spec, padding_free=True, packing=False),
        "trl_packing": lambda: run_trl(spec, padding_free=False, packing=True),
        "hf": lambda: run_hf(spec, group_by_length=False),
        "hf_group_by_length": lambda: run_hf(spec, group_by_length=True),
        "bare": lambda: run_bare(spec),
    }
    if system not in runners:
        raise ValueError(f"unknown peer system {system!r}; known: {', '.join(SYSTEMS)}")
    return runners[system]()


def main(argv: list[str] | None = None) -> None:
    spec_path = Path((argv or sys.argv[1:])[0])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    result = {"system": spec["system"], **run(spec)}
    if torch.cuda.is_available():  # the Trainers' and the loop's, as ftkit's metrics report it
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
