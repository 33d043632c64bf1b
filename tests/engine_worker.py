"""Run by `accelerate launch` in test_engines: train with ftkit's Trainer under the launcher's
engine, then dump (main process) what the test compares: engine step count, clipping, the run
log, and the trained model's own logits on a probe batch (computed on every rank: ZeRO-3
gathers weights in forward).

Usage: engine_worker.py DUMP_FILE [--zero3_persistence_0] RECIPE_ARGS...
"""

import json
import sys

import torch

from ftkit import engines
from ftkit.config import parse_recipe
from ftkit.data import collator
from ftkit.train import Trainer, make_accelerator


def main() -> None:
    dump_file, argv = sys.argv[1], sys.argv[2:]
    accelerator = make_accelerator()
    if "--zero3_persistence_0" in argv:
        argv.remove("--zero3_persistence_0")
        # Partition even tiny tensors (default: < 1e5 elements stay whole), so a missing gather
        # shows. The same dict feeds zero.Init (from_pretrained) and deepspeed.initialize.
        zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        zero["stage3_param_persistence_threshold"] = 0
        zero["stage3_model_persistence_threshold"] = 0
    trainer = Trainer(parse_recipe(argv), accelerator=accelerator)
    result = trainer.fit()
    engine = engines.deepspeed_engine(accelerator)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    local_numel = [p.numel() for p in unwrapped.parameters() if p.requires_grad]
    probe = collator(trainer.tokenizer)([trainer.data.train[i] for i in range(3)])
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(
            input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]
        ).logits
    if accelerator.is_main_process:
        info = {
            "global_steps": None if engine is None else engine.global_steps,
            "gradient_clipping": None if engine is None else engine.gradient_clipping(),
            "local_numel": local_numel,
            "zero_config": None if engine is None else engine.config.get("zero_optimization"),
            "techniques": result.metrics["techniques"],
            "history": result.history,
        }
        torch.save({"logits": logits, "probe": dict(probe), "info": info}, dump_file)
        print(json.dumps(info["techniques"]))


if __name__ == "__main__":
    main()
