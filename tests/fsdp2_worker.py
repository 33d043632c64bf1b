"""Run by torchrun in test_engines: ftkit's Trainer on a raw-torch FSDP2 model (CPU, gloo).

Accelerate cannot run FSDP on CPU, so this stands in for its FSDP2 preparation: the model is
sharded with ``fully_shard`` per decoder layer + root inside ``prepare`` (instead of DDP), and
the optimizer's parameters are switched to the sharded ones, as Accelerate's
``fsdp2_prepare_model`` / ``fsdp2_switch_optimizer_parameters`` do on GPUs. Everything else is
ftkit's own code: the windowed loop, the loss factor, clipping over the Trainer's trainable
parameters (read after prepare), gathering on all ranks and save_trained.

Usage: fsdp2_worker.py DUMP_FILE RECIPE_ARGS...
"""

import sys

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ftkit.config import parse_recipe
from ftkit.train import Trainer, make_accelerator


def decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def main() -> None:
    dump_file, argv = sys.argv[1], sys.argv[2:]
    accelerator = make_accelerator()  # torchrun, no engine asked for: CPU processes + gloo
    prepare = accelerator.prepare
    accelerator.prepare_model = lambda model, **kwargs: model  # sharded below, not DDP-wrapped

    def fsdp2_prepare(model, optimizer, *loaders):
        before = dict(model.named_parameters())
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        after = dict(model.named_parameters())
        sharded = {id(before[name]): after[name] for name in before}
        for group in optimizer.param_groups:
            group["params"] = [sharded[id(p)] for p in group["params"]]
        return prepare(model, optimizer, *loaders)

    accelerator.prepare = fsdp2_prepare
    trainer = Trainer(parse_recipe(argv), accelerator=accelerator)
    assert trainer.trainable and all(isinstance(p, DTensor) for p in trainer.trainable)
    result = trainer.fit()
    if accelerator.is_main_process:
        torch.save(
            {
                "history": result.history,
                "world": accelerator.num_processes,
                "techniques": result.metrics["techniques"],
            },
            dump_file,
        )


if __name__ == "__main__":
    main()
