"""ftkit: LoRA fine-tuning recipes for LLaMA-2 / BLOOM on top of transformers, PEFT and Accelerate."""

__version__ = "0.1.0"
