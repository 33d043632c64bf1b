"""``ftkit estimate --paper``: the planner on the course's settings, beside published figures.

Each published figure is quoted with its source and labelled as cited, not measured here.
"""

from __future__ import annotations

from ftkit.lab.planner import TrainingPlan, estimate
from ftkit.meter import GIB

# Published figures printed by ``--paper`` beside the planner's own number for the same
# quantity.  Each is (source, claim, plan-builder key); they are quoted, not measured here.
_ANCHORS = (
    (
        "QLoRA, Dettmers et al. 2023 (arXiv:2305.14314), sec. 2",
        "LLaMA-7B 4-bit base model: 5,048 MB",
        "llama 4bit base",
    ),
    (
        "PyTorch blog 'Finetune LLMs on your own consumer hardware' (pytorch.org/blog/finetune-llms)",
        "Llama-2-7B weights: 28 GB in fp32, half that in fp16",
        "llama weights",
    ),
    (
        "same blog",
        "full FT, mixed precision Adam: 16 bytes/param = 112 GB before activations",
        "llama full static",
    ),
    ("same blog", "Llama-2-7B fine-tunes with LoRA on one T4 16GB", "llama lora t4"),
    (
        "huggingface/peft README (2023), A100 80GB",
        "bloomz-7b1: full FT OOM; LoRA in plain PyTorch 32 GB",
        "bloom7b",
    ),
    (
        "BLOOM, BigScience 2022 (arXiv:2211.05100), Table 1",
        "BLOOM-1.7B: 1,722 M parameters",
        "bloom params",
    ),
)


def _anchor_value(key: str) -> str:
    if key == "llama 4bit base":
        e = estimate("llama2-7b", TrainingPlan(precision="fp16", quantization="4bit"))
        adapters = e.trainable_params * 4
        upcast = 2 * 2 * 32000 * 4096  # embeddings + head, fp16 -> fp32
        return (
            f"{(e.params - adapters) / 1e6:,.0f} MB (NF4 linears, embeddings/norms in fp32 as "
            f"ftkit's prepare_model_for_kbit_training leaves them; "
            f"{(e.params - adapters - upcast) / 1e6:,.0f} MB with them in fp16)"
        )
    if key == "llama weights":
        full32 = estimate("llama2-7b", TrainingPlan(lora_r=None, precision="fp32"))
        return f"{full32.params / 1e9:.1f} GB fp32, {full32.params / 2e9:.1f} GB fp16"
    if key == "llama full static":
        e = estimate("llama2-7b", TrainingPlan(lora_r=None, precision="fp16"))
        static = e.params + e.grads + e.optimizer
        return (
            f"{static / e.total_params:.0f} bytes/param = {static / 1e9:.0f} GB "
            f"(+{e.activations / 1e9:.0f} GB activations at 1 x 512)"
        )
    if key == "llama lora t4":
        fp16, nf4 = (
            estimate("llama2-7b", TrainingPlan(precision="fp16", quantization=q))
            for q in (None, "4bit")
        )
        return f"fp16 base: {fp16.verdict('T4')}\n                  4-bit base: {nf4.verdict('T4')}"
    if key == "bloom7b":
        full = estimate("bloom-7b1", TrainingPlan(lora_r=None, precision="fp32"))
        lora = estimate("bloom-7b1", TrainingPlan(precision="fp32", micro_batch_size=8, seq_len=64))
        return (
            f"full FT fp32 {'fits' if full.verdict('A100-80GB').fits else 'does not fit'} "
            f"({full.total / 1e9:.0f} GB); LoRA fp32 {lora.total / 1e9:.0f} GB at 8 x 64 "
            "(README does not state batch/length)"
        )
    e = estimate("bloom-1b7", TrainingPlan())
    return (
        f"{e.total_params / 1e6:,.0f} M parameters (LoRA adapters excluded: "
        f"{(e.total_params - e.trainable_params) / 1e6:,.0f} M)"
    )


def paper_report() -> str:
    out = ["Llama-2-7B, LoRA r=8 on q/v, micro-batch 1 x 512, 2 x T4 with DDP (per device):"]
    for quant in (None, "8bit", "4bit"):
        e = estimate(
            "llama2-7b",
            TrainingPlan(precision="fp16", quantization=quant, world_size=2, strategy="ddp"),
        )
        label = quant or "fp16"
        out.append(
            f"  {label:<5} params {e.params / GIB:5.2f}  act {e.activations / GIB:5.2f}"
            f"  -> {e.verdict('T4')}"
        )
    out.append("BLOOM-1b7, micro-batch 1 x 512, one T4:")
    for name, plan in (
        ("LoRA fp16", TrainingPlan(precision="fp16")),
        ("full FT fp16 (AMP)", TrainingPlan(lora_r=None, precision="fp16")),
    ):
        e = estimate("bloom-1b7", plan)
        out.append(f"  {name:<18} -> {e.verdict('T4')}")
    out.append("Published figures (cited, not measured here) vs this planner:")
    for source, claim, key in _ANCHORS:
        out.append(
            f"  [cited] {claim}\n          source: {source}\n          ftkit:  {_anchor_value(key)}"
        )
    return "\n".join(out)
