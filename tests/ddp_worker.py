"""Run by `accelerate launch` in test_techniques: each rank dumps its trainable weights per step."""

import sys

import torch

from ftkit.config import parse_recipe
from ftkit.train import Trainer


def main() -> None:
    dump_dir = sys.argv[1]
    trainer = Trainer(parse_recipe(sys.argv[2:]))
    model = trainer.accelerator.unwrap_model(trainer.model)
    rank = trainer.accelerator.process_index
    for window in trainer.windows():
        step = trainer.train_step(window)["step"]
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(weights, f"{dump_dir}/rank{rank}_step{step}.pt")
        if step >= trainer.total_steps:
            break
    trainer.save_artifacts()


if __name__ == "__main__":
    main()
