"""Run by `accelerate launch` in test_techniques: each rank dumps its gradients and weights per step."""

import sys

import torch

from ftkit.config import parse_recipe
from ftkit.train import Trainer


def trainable(model, attr: str) -> dict:
    return {
        n: getattr(p, attr).detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }


def main() -> None:
    dump_dir = sys.argv[1]
    trainer = Trainer(parse_recipe(sys.argv[2:]))
    model = trainer.accelerator.unwrap_model(trainer.model)
    rank = trainer.accelerator.process_index
    for step, window in enumerate(trainer.windows(), start=1):
        trainer.backward_window(window)
        grads = trainable(model, "grad")
        trainer.optimizer_step()
        trainer.progress.advance(len(window))
        dump = {"grads": grads, "weights": trainable(model, "data")}
        torch.save(dump, f"{dump_dir}/rank{rank}_step{step}.pt")
        if step >= trainer.total_steps:
            break
    trainer.save_artifacts()


if __name__ == "__main__":
    main()
