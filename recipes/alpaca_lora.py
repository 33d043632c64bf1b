"""Fine-tune a causal LM on instruction data with LoRA (PEFT's or ftkit's): ``ftkit train``.

The recipe YAML says *what* to train; the Accelerate config says *how* (precision, processes):

    accelerate launch -q --config_file accelerate_configs/cpu.yaml recipes/alpaca_lora.py
    accelerate launch -q --config_file accelerate_configs/cpu.yaml recipes/alpaca_lora.py --lora_impl ftkit
    accelerate launch -q --config_file accelerate_configs/single_gpu_fp16.yaml \
        recipes/alpaca_lora.py --config llama2-7b
    ftkit launch --config llama2-7b -- --config_file accelerate_configs/ddp_2gpu_fp16.yaml  # 2 T4s

``--config`` takes a shipped recipe name (tiny, llama2-7b, bloom-1b7) or a YAML path; any recipe
field can be overridden as ``--field value``.
"""

import sys

from ftkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
