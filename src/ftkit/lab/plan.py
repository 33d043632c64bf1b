"""``ftkit plan``: the fastest recipe that fits the GPUs you have, written out ready to launch.

:func:`make_plan` enumerates the recipes a user could run on ``count x GPU`` — the precision the GPU
runs, the base kept in 16, 8 or 4 bits, gradient checkpointing on or off, every micro-batch x
accumulation split that reaches the global batch exactly, and, where DDP cannot hold a recipe,
the sharded engines (ZeRO-2, ZeRO-3, FSDP) — keeps those whose planned total (``ftkit.lab.planner``)
stays under the GPU's memory minus a margin, and ranks them by :func:`step_time`.
:func:`write_plan` writes the chosen one as ``recipe.yaml`` + ``accelerate.yaml``, so that
``ftkit launch --config DIR/recipe.yaml -- --config_file DIR/accelerate.yaml`` runs it and its
``metrics.json`` records the prediction beside the measurement (``plan`` block).

Fixed, not enumerated, because they are never slower nor bigger (``results/throughput-cpu``):
padding-free rows where ``ftkit.batching`` proves them exact (BLOOM stays padded) and the LM head
at supervised positions only. Not enumerated, because ftkit refuses or has not run them: fp32 on a
GPU (16-bit is smaller and faster on every GPU in the table), 8/4-bit bases under ZeRO or FSDP
(bitsandbytes weights cannot be sharded), FSDP in fp16 (no sharded grad scaler run yet), and on
a CPU anything but one fp32 process (the CPU plan exists to prove the planner on this machine).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from ftkit.errors import ConfigError
from ftkit.lab.gpus import GPU, parse_gpu_spec, parse_gpus
from ftkit.lab.planner import NF4_BYTES, Arch, MemoryEstimate, TrainingPlan, estimate
from ftkit.lab.presets import HUB_IDS, PRESETS, resolve_config
from ftkit.meter import GIB, MIB

# How much of the peaks a training step gets.
# GPUs: assumed, not yet measured by ftkit on any GPU. Large fp16/bf16 GEMMs reach 60-80 % of the
# dense rate; norms, activations, the loss and the gaps between kernels take the rest (0.5 of
# the dense rate over the whole step). Once a planned run has measured its step time
# (metrics.json `plan`), `--efficiency` recalibrates it for that GPU.
# CPU: a --gpu_spec whose TFLOPS is the rate a 1024^3 fp32 GEMM reaches on the machine (CPU time
# of one thread; `plancheck.cpu_gpu_spec` measures it): 1.0 of that rate and 5 us per op predict
# every candidate of results/plan-cpu/plan_check.md within 9 % (least-squares fits over six runs
# on this shared machine: 0.88-1.07 of the rate, 3.4-7.3 us per op).
COMPUTE_EFFICIENCY = {"cuda": 0.5, "cpu": 1.0}
BANDWIDTH_EFFICIENCY = 0.8  # of the datasheet memory and link bandwidth (copy/all-reduce kernels)
# The host's share: eager PyTorch dispatches every op (autograd recording, the kernel launch) from
# Python. Ops per decoder block, forward and backward, counted with a TorchDispatchMode on
# transformers' LLaMA and BLOOM blocks with PEFT LoRA on the default targets (gradient
# checkpointing runs the forward's again). Seconds per op: CUDA hosts assumed (eager PyTorch's
# dispatch + launch, typically 3-10 us), CPU calibrated as above.
OPS_PER_BLOCK = {"llama": (149, 111), "bloom": (86, 72)}
HOST_S_PER_OP = {"cuda": 5e-6, "cpu": 5e-6}
MARGIN = 0.10  # of the GPU's memory kept free: the planner's total must stay under the rest
ADAMW_BYTES = 32  # per trainable parameter and step: AdamW reads and writes fp32 weight, grad, m, v
FSDP_LAYER = {"llama": "LlamaDecoderLayer", "bloom": "BloomBlock"}
WRITTEN_BY = "# Written by `ftkit plan`"  # first line of every file --write makes (and may replace)
RECIPE_FILE, ACCELERATE_FILE = "recipe.yaml", "accelerate.yaml"
DEFAULT_DATASET = "tatsu-lab/alpaca"  # the shipped recipes' dataset, for a plan without --dataset


# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Workload:
    """Tokens per sequence: the worst case for memory, the mean for time.

    Memory is planned for micro-batches of sequences that fill ``seq_len``, with the largest
    supervised share any record has, so no batch the run draws can exceed it. Time uses the
    records' mean length, mean squared length (attention) and mean supervised positions; without
    records every sequence fills ``seq_len`` with ``supervised_fraction`` of it supervised.
    """

    seq_len: int
    lengths: tuple[int, ...] = ()  # tokens per record, after truncation to seq_len
    supervised: tuple[int, ...] = ()  # supervised (shifted) positions per record
    supervised_fraction: float = 1.0  # without records
    source: str = ""
    skip_bad_records: bool = False  # as read: the written recipe must skip them too

    def __post_init__(self):
        if self.seq_len < 8:
            raise ConfigError(f"--seq_len must be >= 8, got {self.seq_len}")
        if not 0.0 < self.supervised_fraction <= 1.0:
            raise ConfigError(
                f"--supervised_fraction must be in (0, 1], got {self.supervised_fraction}"
            )

    @property
    def mean_tokens(self) -> float:
        return sum(self.lengths) / len(self.lengths) if self.lengths else float(self.seq_len)

    @property
    def mean_square_tokens(self) -> float:
        if not self.lengths:
            return float(self.seq_len**2)
        return sum(n * n for n in self.lengths) / len(self.lengths)

    @property
    def mean_supervised(self) -> float:
        if not self.supervised:
            return max(1.0, min(self.seq_len - 1, self.supervised_fraction * self.seq_len))
        return sum(self.supervised) / len(self.supervised)

    @property
    def memory_supervised_fraction(self) -> float:
        """The planner's ``supervised_fraction`` for memory: the largest any record has."""
        if not self.supervised:
            return self.supervised_fraction
        return min(1.0, max(1, max(self.supervised)) / self.seq_len)

    def padded_tokens(self, micro: int) -> float:
        """Expected tokens of a right-padded micro-batch: ``micro`` x its longest record."""
        if not self.lengths:
            return float(micro * self.seq_len)
        return micro * _expected_largest(sorted(self.lengths), micro)

    def padded_logit_rows(self, micro: int) -> float:
        """Expected LM-head rows of a right-padded micro-batch: the union of its records'
        supervised columns, from the shortest prompt to the longest record."""
        if not self.lengths:
            return micro * self.mean_supervised
        prompts = sorted(-(n - s) for n, s in zip(self.lengths, self.supervised, strict=True))
        shortest_prompt = -_expected_largest(prompts, micro)
        return micro * max(1.0, _expected_largest(sorted(self.lengths), micro) - shortest_prompt)

    def describe(self) -> str:
        if not self.lengths:
            return (
                f"every sequence {self.seq_len} tokens, {100 * self.supervised_fraction:.0f} % "
                "of positions supervised"
            )
        return (
            f"{self.source}: {len(self.lengths):,} records, mean {self.mean_tokens:.0f} tokens "
            f"(max_length {self.seq_len}), mean {self.mean_supervised:.0f} supervised; memory "
            f"planned for full {self.seq_len}-token sequences, "
            f"{100 * self.memory_supervised_fraction:.0f} % supervised (the largest share of any "
            "record)"
        )


def _expected_largest(ascending: list[float], draws: int) -> float:
    """E[max] of ``draws`` values drawn without replacement from ``ascending``: the k-th
    smallest is the largest with probability C(k-1, draws-1) / C(n, draws)."""
    n = len(ascending)
    draws = min(draws, n)

    def log_comb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    total = log_comb(n, draws)
    return sum(
        value * math.exp(log_comb(k - 1, draws - 1) - total)
        for k, value in enumerate(ascending, start=1)
        if k >= draws
    )


def read_workload(
    dataset: str,
    tokenizer_dir: str,
    seq_len: int,
    num_samples: int = 0,
    skip_bad_records: bool = False,
    seed: int = 42,
) -> Workload:
    """Token lengths and supervised positions of ``dataset`` as training tokenises it."""
    from ftkit.config import DataConfig
    from ftkit.data import IGNORE_INDEX, build_datasets
    from ftkit.modeling import load_tokenizer

    cfg = DataConfig(
        dataset=dataset,
        max_length=seq_len,
        validation_size=0,
        num_samples=num_samples,
        skip_bad_records=skip_bad_records,
    )
    data = build_datasets(cfg, load_tokenizer(tokenizer_dir), seed)
    lengths = tuple(len(ids) for ids in data.train["input_ids"])
    supervised = tuple(
        sum(label != IGNORE_INDEX for label in labels[1:]) for labels in data.train["labels"]
    )
    return Workload(seq_len, lengths, supervised, source=dataset, skip_bad_records=skip_bad_records)


def workload_from_flags(
    model: str,
    seq_len: int,
    dataset: str | None = None,
    tokenizer: str | None = None,
    num_samples: int = 0,
    supervised_fraction: float = 1.0,
    skip_bad_records: bool = False,
) -> Workload:
    """``--dataset`` read with ``--tokenizer`` (default: the model's own directory), or every
    sequence full."""
    if not dataset:
        return Workload(seq_len, supervised_fraction=supervised_fraction)
    if tokenizer is None and model in PRESETS:
        raise ConfigError(
            f"--dataset needs the model's tokenizer and {model} is a stored shape without one: "
            "pass --tokenizer DIR (e.g. a local copy of the model's tokenizer files)"
        )
    return read_workload(dataset, tokenizer or model, seq_len, num_samples, skip_bad_records)


# --------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Hardware:
    """``count`` x ``gpu`` on one machine (``device`` cpu: the CPU proof), a margin kept free."""

    gpu: GPU
    count: int = 1
    device: str = "cuda"
    margin: float = MARGIN
    efficiency: float | None = None  # of the dense rate; None: COMPUTE_EFFICIENCY[device]

    def __post_init__(self):
        if not 0.0 <= self.margin < 1.0:
            raise ConfigError(f"--margin must be in [0, 1), got {self.margin}")
        if self.efficiency is not None and not 0.0 < self.efficiency <= 1.0:
            raise ConfigError(f"--efficiency must be in (0, 1], got {self.efficiency}")
        if self.device == "cpu" and self.count > 1:
            raise ConfigError(
                "--device cpu plans one process (the CPU proof of the planner); give --gpus 1xNAME"
            )

    @property
    def usable(self) -> int:
        return int(self.gpu.memory * (1 - self.margin))

    @property
    def precision(self) -> str:
        """bf16 where the GPU runs it (no grad scaler, no fp16 overflow), else fp16; fp32 on CPU."""
        if self.device == "cpu":
            return "fp32"
        return "bf16" if self.gpu.bf16 else "fp16"

    @property
    def compute_efficiency(self) -> float:
        return self.efficiency or COMPUTE_EFFICIENCY[self.device]

    def describe(self) -> str:
        why = {"fp16": f" (the {self.gpu.name.split()[0]} has no bf16)", "fp32": " (CPU)"}
        unit, scale = ("MiB", MIB) if self.gpu.memory < 4 * GIB else ("GiB", GIB)
        return (
            f"{self.count} x {self.gpu.name}: {self.gpu.memory / scale:.1f} {unit} each, "
            f"{self.usable / scale:.1f} {unit} usable ({100 * self.margin:.0f} % margin); "
            f"{self.precision}{why.get(self.precision, '')}"
        )


# --------------------------------------------------------------------------- step time


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one optimizer step, by what bounds them."""

    gemm_s: float  # matrix multiplies: max(FLOPs / rate, weight bytes / bandwidth) per micro-batch
    elementwise_s: float  # activations written in forward and read back in backward
    host_s: float  # dispatching every op from Python (overlaps the GPU; adds on a CPU)
    optimizer_s: float  # AdamW over the trainable parameters (and clipping)
    comm_s: float  # collectives not hidden behind compute
    total_s: float
    flops: float  # per GPU and step
    tokens: float  # real tokens per step over all GPUs

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s


def step_time(
    arch: Arch,
    memory: MemoryEstimate,
    workload: Workload,
    hardware: Hardware,
    no_gc_activations: int,
) -> StepTime:
    """The step-time model: what a step must compute and move, over what the GPU delivers.

    Per micro-batch of T tokens (K of them at the LM head, attention over sequences of the
    records' lengths), FLOPs are 2 x weights x tokens per matrix multiply pass:
    forward; backward through the frozen weights for the activation gradients only (the same
    FLOPs again); the weight gradients of what trains (LoRA's A and B, or every weight for full
    fine-tuning); gradient checkpointing's recompute of every block's forward (not the head's);
    attention's QK and PV (causal, half the square, per sequence on a padding-free row; the full
    padded square otherwise) with a backward of twice its forward; the LM head at K rows only.
    The GEMM time of a micro-batch is its FLOPs at ``efficiency`` x the dense rate, or reading
    its weights once per pass at ``BANDWIDTH_EFFICIENCY`` x the bandwidth, whichever is longer;
    an 8/4-bit weight adds its dequantisation before every use (read stored, write 16-bit). The
    activations the forward keeps are written and read back once more (twice with checkpointing,
    which writes them again in backward). Then AdamW over the trainable parameters once a step,
    and the collectives: DDP's all-reduce of the fp32 trainable gradients and ZeRO-2's gradient
    reduce-scatter + parameter all-gather are counted in full (an upper bound; DDP overlaps
    part with backward), ZeRO-3's and FSDP's per-micro-batch parameter all-gathers (forward and
    backward) overlap compute (prefetch), so a micro-batch takes the longer of the two.
    The host dispatches every op (:data:`OPS_PER_BLOCK` x :data:`HOST_S_PER_OP`): a GPU
    micro-batch takes the longer of the device's time and the host's, a CPU one the sum.
    Not modelled: data loading, the host reads of a step (4) and fp16's skipped steps.
    """
    plan = memory.plan
    m, L, h, V = plan.micro_batch_size, arch.layers, arch.hidden, arch.vocab
    if plan.padding_free:
        tokens = m * workload.mean_tokens
        square = m * workload.mean_square_tokens
        rows = m * workload.mean_supervised
        attention = 2 * arch.q_width * square  # causal: half of QK^T and of PV, per sequence
    else:
        tokens = workload.padded_tokens(m)
        rows = workload.padded_logit_rows(m)
        attention = 4 * arch.q_width * tokens * (tokens / m)  # the whole padded square
    attention *= L
    gc, full = int(plan.gradient_checkpointing), int(plan.full)
    targets = () if plan.full else (plan.lora_targets or arch.default_targets)
    lora_per_token = 2 * (plan.lora_r or 0) * sum(sum(s) for s in arch.lora_shapes(targets)) * L
    linear = 2 * tokens * L * arch.block_linear_weights
    head = 2 * rows * h * V
    flops = (
        linear * (2 + gc + full)
        + attention * (3 + gc)
        + head * (2 + full)
        + lora_per_token * tokens * (3 + gc)
    )

    half = plan.precision != "fp32"
    weight_elem = 2 if half else 4
    passes = 2 + gc  # forward, activation gradients, recompute
    weight_bytes = (L * arch.block_linear_weights * passes + V * h * (2 + full)) * weight_elem
    if plan.full:  # fp32 master weights: autocast's half copy each forward, the fp32 gradient
        weight_bytes += memory.total_params * ((4 + 2) if half else 0) + 8 * memory.total_params
    # bitsandbytes dequantises a weight before every use, a kernel of its own: read the stored
    # bytes, write the 16-bit copy the GEMM then reads (LLM.int8's outlier split: not modelled).
    stored = {None: 0.0, "8bit": 1.0, "4bit": NF4_BYTES}[plan.quantization]
    dequantize = L * arch.block_linear_weights * passes * (stored + weight_elem) if stored else 0
    gpu, eff = hardware.gpu, hardware.compute_efficiency
    rate = gpu.tflops * 1e12 * eff
    bandwidth = gpu.bandwidth * 1e9 * BANDWIDTH_EFFICIENCY
    link = gpu.link * 1e9 * BANDWIDTH_EFFICIENCY
    gemm = max(flops / rate, weight_bytes / bandwidth) + dequantize / bandwidth
    elementwise = 2 * (1 + gc) * no_gc_activations / bandwidth
    forward_ops, backward_ops = OPS_PER_BLOCK[arch.kind]
    host = L * (forward_ops * (1 + gc) + backward_ops) * HOST_S_PER_OP[hardware.device]
    # A GPU runs while the host queues the next ops; a CPU does both on the same cores.
    device = (
        max(gemm + elementwise, host) if hardware.device == "cuda" else gemm + elementwise + host
    )

    n, steps = plan.world_size, plan.gradient_accumulation_steps
    share = (n - 1) / n
    trainable = memory.trainable_params
    shards = n if plan.strategy != "ddp" else 1
    optimizer = ADAMW_BYTES * trainable / shards / bandwidth
    serial_comm, overlapped = 0.0, 0.0
    if n > 1 and plan.strategy == "ddp":
        serial_comm = 2 * share * 4 * trainable / link
    elif n > 1 and plan.strategy == "zero2":
        serial_comm = share * 2 * trainable * (steps + 1) / link
    elif n > 1:  # zero3, fsdp: every micro-batch gathers the whole model twice
        param_bytes = (memory.total_params - trainable) * weight_elem + trainable * 4
        overlapped = (2 * share * param_bytes + share * 4 * trainable) / link
    micro_batch = max(device, overlapped)
    total = steps * micro_batch + optimizer + serial_comm
    return StepTime(
        gemm_s=steps * gemm,
        elementwise_s=steps * elementwise,
        host_s=steps * host,
        optimizer_s=optimizer,
        comm_s=serial_comm + steps * max(0.0, overlapped - device),
        total_s=total,
        flops=steps * flops,
        tokens=n * steps * m * workload.mean_tokens,
    )


# --------------------------------------------------------------------------- enumeration


@dataclass(frozen=True)
class Method:
    """What trains: LoRA (rank, targets, dropout) or the whole model."""

    lora_r: int | None = 8
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.05


@dataclass(frozen=True)
class Candidate:
    memory: MemoryEstimate
    time: StepTime
    fits: bool

    @property
    def plan(self) -> TrainingPlan:
        return self.memory.plan

    @property
    def base(self) -> str:
        if self.plan.full:
            return "fp32+AMP" if self.plan.precision != "fp32" else "fp32"
        if self.plan.quantization:
            return self.plan.quantization.replace("bit", "-bit")
        return "fp32" if self.plan.precision == "fp32" else "16-bit"

    @property
    def engine(self) -> str:
        if self.plan.world_size == 1:
            return "single"
        return {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP"}[
            self.plan.strategy
        ]

    def describe(self) -> str:
        p = self.plan
        method = "full fine-tune" if p.full else f"LoRA r {p.lora_r}"
        base = {"fp32+AMP": "fp32 weights under AMP", "fp32": "an fp32 base"}.get(
            self.base, f"a {self.base} base"
        )
        return (
            f"{method} on {base} in {p.precision}, gradient checkpointing "
            f"{'on' if p.gradient_checkpointing else 'off'}, micro-batch "
            f"{p.micro_batch_size} x {p.gradient_accumulation_steps} accumulation steps per GPU, "
            f"{self.engine if p.world_size > 1 else 'one process'}"
        )


@dataclass(frozen=True)
class Plan:
    model: str
    config: PretrainedConfig
    hardware: Hardware
    workload: Workload
    method: Method
    global_batch: int
    candidates: tuple[Candidate, ...]  # fitting ones fastest first, then the dropped, fastest first

    @property
    def fitting(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fits]

    @property
    def dropped(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.fits]

    @property
    def best(self) -> Candidate | None:
        return self.fitting[0] if self.fitting else None

    def report(self, top: int = 10) -> str:
        """The ranked table, the faster recipes that do not fit, and the recommendation."""
        hw, arch = self.hardware, Arch.from_config(self.config)
        unit, scale = ("MiB", MIB) if hw.gpu.memory < 4 * GIB else ("GiB", GIB)
        targets = self.method.lora_targets or arch.default_targets
        method = (
            "full fine-tune"
            if self.method.lora_r is None
            else f"LoRA r {self.method.lora_r} on {', '.join(targets)}"
        )
        params = self.candidates[0].memory.total_params if self.candidates else 0
        eff = hw.compute_efficiency
        if hw.efficiency:
            source = "--efficiency"
        else:
            source = "calibrated on CPU" if hw.device == "cpu" else "assumed: not measured on a GPU"
        lines = [
            f"ftkit plan: {self.model} ({arch.kind}, {params / 1e9:.2f} B parameters), {method}",
            f"hardware:   {hw.describe()}",
            f"workload:   global batch {self.global_batch} sequences "
            f"({self.global_batch // hw.count} per GPU); {self.workload.describe()}",
            f"time model: {hw.gpu.tflops:g} TFLOPS x {eff:.2f} ({source}), "
            f"{hw.gpu.bandwidth:g} GB/s x {BANDWIDTH_EFFICIENCY}"
            + (f", link {hw.gpu.link:g} GB/s" if hw.count > 1 else "")
            + f", host {HOST_S_PER_OP[hw.device] * 1e6:.3g} us per op",
            f"candidates: {len(self.candidates)} enumerated, {len(self.fitting)} fit, "
            f"{len(self.dropped)} dropped for memory",
            "",
        ]
        lines.append(
            f"{'#':>3}  {'base':<8} {'GC':<4} {'micro x GA':>10}  {'engine':<7} "
            f"{unit + '/GPU':>8} {'s/step':>8} {'tokens/s':>9}"
        )
        for i, c in enumerate(self.fitting[:top], start=1):
            lines.append(f"{i:>3}  {_row(c, scale)}")
        if len(self.fitting) > top:
            lines.append(f"     ... {len(self.fitting) - top} more that fit (--top N shows them)")
        best = self.best
        if self.dropped:
            # One row per recipe (its fastest engine): a ZeRO-2 copy of a DDP miss says nothing new.
            shown = {}
            for c in self.dropped:
                p = c.plan
                shown.setdefault((p.quantization, p.gradient_checkpointing, p.micro_batch_size), c)
            lines += [
                "",
                f"dropped, more than {hw.usable / scale:.1f} {unit} per GPU (fastest first):",
            ]
            lines += [f"  -  {_row(c, scale)}" for c in list(shown.values())[:5]]
        lines.append("")
        if best is None:
            smallest = min(self.candidates, key=lambda c: c.memory.total)
            lines.append(
                f"nothing fits: the smallest recipe needs {smallest.memory.total / scale:.1f} {unit} per "
                f"GPU ({smallest.describe()}); use more or larger GPUs, a shorter --seq_len or a "
                "smaller --global_batch"
            )
        else:
            lines.append(
                f"recommended: {best.describe()}: {best.memory.total / scale:.1f} {unit} of "
                f"{hw.gpu.memory / scale:.1f} {unit} per GPU, ~{best.time.total_s:.2f} s/step, "
                f"~{best.time.tokens_per_s:,.0f} tokens/s"
            )
            t = best.time
            overlap = " (overlapped)" if hw.device == "cuda" else ""
            lines.append(
                f"  its step: matrix multiplies {_seconds(t.gemm_s)} s, activations "
                f"{_seconds(t.elementwise_s)} s, optimizer {_seconds(t.optimizer_s)} s, "
                f"collectives {_seconds(t.comm_s)} s; host {_seconds(t.host_s)} s{overlap}"
            )
            lines.append(
                "  write it with --write DIR, then: ftkit launch --config DIR/recipe.yaml -- "
                "--config_file DIR/accelerate.yaml"
            )
        return "\n".join(lines)


def _row(c: Candidate, scale: int) -> str:
    p = c.plan
    split = f"{p.micro_batch_size} x {p.gradient_accumulation_steps}"
    return (
        f"{c.base:<8} {'on' if p.gradient_checkpointing else 'off':<4} {split:>10}  "
        f"{c.engine:<7} {c.memory.total / scale:>8.1f} {_seconds(c.time.total_s):>8} "
        f"{c.time.tokens_per_s:>9,.0f}"
    )


def _seconds(t: float) -> str:
    return f"{t:.3f}" if t < 1 else f"{t:.2f}" if t < 100 else f"{t:.0f}"


def make_plan(
    model: str | PretrainedConfig,
    hardware: Hardware,
    workload: Workload,
    method: Method | None = None,
    global_batch: int = 32,
) -> Plan:
    """Every candidate recipe for ``model`` on ``hardware``, ranked (see the module docstring)."""
    method = method or Method()
    cfg = resolve_config(model) if isinstance(model, str) else model
    name = model if isinstance(model, str) else (getattr(cfg, "name_or_path", "") or "model")
    arch = Arch.from_config(cfg)
    n = hardware.count
    if global_batch < 1 or global_batch % n:
        raise ConfigError(
            f"--global_batch {global_batch} cannot be split evenly over {n} GPUs: give a "
            f"multiple of {n}"
        )
    per_gpu = global_batch // n
    full = method.lora_r is None
    cuda = hardware.device == "cuda"
    quantizations = (None,) if full or not cuda else (None, "8bit", "4bit")
    sharded = ("zero2", "zero3") + (("fsdp",) if hardware.precision == "bf16" else ())

    def candidate(**choices) -> Candidate:
        plan = TrainingPlan(
            lora_r=method.lora_r,
            lora_targets=method.lora_targets,
            lora_dropout=method.lora_dropout,
            precision=hardware.precision,
            seq_len=workload.seq_len,
            world_size=n,
            device=hardware.device,
            supervised_logits_only=True,
            supervised_fraction=workload.memory_supervised_fraction,
            **choices,
        )
        memory = estimate(cfg, plan)
        no_gc = memory
        if plan.gradient_checkpointing:
            no_gc = estimate(cfg, dataclasses.replace(plan, gradient_checkpointing=False))
        time = step_time(arch, memory, workload, hardware, no_gc.activations)
        return Candidate(memory, time, memory.total <= hardware.usable)

    found = []
    for quantization in quantizations:
        for gc in (False, True):
            for micro in (d for d in range(1, per_gpu + 1) if per_gpu % d == 0):
                split = dict(
                    quantization=quantization,
                    gradient_checkpointing=gc,
                    micro_batch_size=micro,
                    gradient_accumulation_steps=per_gpu // micro,
                )
                ddp = candidate(**split, strategy="ddp")
                found.append(ddp)
                # Sharding costs a gather of the model per micro-batch: only where DDP cannot
                # hold the recipe, and never for bitsandbytes weights (ftkit refuses them).
                if n > 1 and not ddp.fits and quantization is None:
                    found += [candidate(**split, strategy=s) for s in sharded]
    # Equal predicted times (to 3 significant digits): the recipe with more memory to spare first.
    ranked = sorted(
        found, key=lambda c: (not c.fits, float(f"{c.time.total_s:.3g}"), c.memory.total)
    )
    return Plan(name, cfg, hardware, workload, method, global_batch, tuple(ranked))


def hardware_from_flags(
    gpus: str,
    gpu_specs: list[str] | None = None,
    device: str = "cuda",
    margin: float = MARGIN,
    efficiency: float | None = None,
    link_gbps: float | None = None,
) -> Hardware:
    """``--gpus 2xT4`` (+ ``--gpu_spec`` definitions, ``--link_GBps``) → Hardware."""
    extra = dict(parse_gpu_spec(spec) for spec in gpu_specs or ())
    count, gpu = parse_gpus(gpus, extra)
    if device == "cpu" and gpu not in extra.values():
        raise ConfigError(
            f"--device cpu plans for this CPU, not a {gpu.name}: describe it with --gpu_spec "
            "NAME:MiB:TFLOPS:GBps (its memory budget, fp32 GEMM rate and bandwidth)"
        )
    if link_gbps is not None:
        if link_gbps <= 0:
            raise ConfigError(f"--link_GBps must be > 0, got {link_gbps}")
        gpu = dataclasses.replace(gpu, link=link_gbps)
    return Hardware(gpu, count, device, margin, efficiency)


# --------------------------------------------------------------------------- writing


def recipe_values(
    candidate: Candidate,
    model: str,
    dataset: str,
    output_dir: str,
    skip_bad_records: bool = False,
) -> dict:
    """The recipe fields the plan decides (everything else keeps ftkit's defaults)."""
    p = candidate.plan
    values = {
        "model_name_or_path": model,
        # LoRA loads the frozen base in the compute dtype; full fine-tuning keeps fp32 weights
        # under AMP (ftkit refuses fp16 weights under fp16 AMP: the scaler cannot unscale them).
        "model_dtype": "fp32" if p.full else p.precision,
        "load_in_8bit": p.quantization == "8bit",
        "load_in_4bit": p.quantization == "4bit",
        "gradient_checkpointing": p.gradient_checkpointing,
        "dataset": dataset,
        "max_length": p.seq_len,
        "skip_bad_records": skip_bad_records,
        "padding_free": "true" if p.padding_free else "false",
        "supervised_logits_only": True,
        "lora_impl": "none" if p.full else "peft",
    }
    if not p.full:
        values.update(lora_r=p.lora_r, lora_dropout=p.lora_dropout)
        if p.lora_targets:
            values["lora_target"] = list(p.lora_targets)
    values.update(
        per_device_train_batch_size=p.micro_batch_size,
        gradient_accumulation_steps=p.gradient_accumulation_steps,
        output_dir=output_dir,
        planned_peak_bytes=candidate.memory.total,
        planned_step_time_s=round(candidate.time.total_s, 6),
    )
    return values


def accelerate_config(candidate: Candidate, hardware: Hardware, arch: Arch) -> dict:
    """The Accelerate config that runs ``candidate``: the shipped configs' values, for its
    process count, precision and engine (tests/test_plan.py holds them to the shipped files)."""
    from ftkit.config import ACCELERATE_MIXED_PRECISION

    p = candidate.plan
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "NO",
        "mixed_precision": ACCELERATE_MIXED_PRECISION[p.precision],
        "use_cpu": hardware.device == "cpu",
    }
    if hardware.device == "cuda" and p.world_size == 1:
        config["gpu_ids"] = "0"
    config.update(num_machines=1, num_processes=p.world_size, machine_rank=0)
    if p.world_size > 1 and p.strategy == "ddp":
        config = {**config, "distributed_type": "MULTI_GPU", "gpu_ids": "all"}
        config.update(rdzv_backend="static", same_network=True)
    elif p.strategy in ("zero2", "zero3"):
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": int(p.strategy[-1]),
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": p.strategy == "zero3",
        }
        if p.strategy == "zero3":
            config["deepspeed_config"]["zero3_save_16bit_model"] = True
    elif p.strategy == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": FSDP_LAYER[arch.kind],
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_reshard_after_forward": True,
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_offload_params": False,
        }
    config["main_training_function"] = "main"
    return config


def model_reference(model: str) -> str:
    """What a written recipe loads: a preset's Hub repository, or the local directory given."""
    if model in PRESETS:
        return HUB_IDS[model]
    return str(model)


def write_plan(
    plan: Plan,
    directory: str | Path,
    *,
    dataset: str | None = None,
    output_dir: str | None = None,
    command: str = "",
) -> tuple[Path, Path]:
    """Write the recommended recipe and its Accelerate config into ``directory``.

    Only files this function wrote (their first line says so) are ever replaced.
    """
    import yaml

    from ftkit.config import Recipe
    from ftkit.io import atomic_write_text

    best = plan.best
    if best is None:
        raise ConfigError(
            f"nothing fits {plan.hardware.count} x {plan.hardware.gpu.name}: there is no recipe "
            "to write (see the plan's last line for what would help)"
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--write {directory} is a file, not a directory: give a directory")
    paths = directory / RECIPE_FILE, directory / ACCELERATE_FILE
    for path in paths:
        if path.exists() and not _written_by_plan(path):
            raise ConfigError(
                f"{path} exists and ftkit plan did not write it; ftkit never overwrites it: move "
                "it away or give another --write directory"
            )
    values = recipe_values(
        best,
        model_reference(plan.model),
        dataset or DEFAULT_DATASET,
        output_dir or str(directory / "run"),
        plan.workload.skip_bad_records,
    )
    Recipe.from_dict(values, source="the written recipe")  # a plan that would not parse fails here
    hw = plan.hardware
    summary = (
        f"# Planned for {hw.count} x {hw.gpu.name}: {best.memory.total / GIB:.2f} GiB per GPU "
        f"(planner total), ~{best.time.total_s:.3g} s/step, ~{best.time.tokens_per_s:,.0f} tokens/s"
    )
    launch = f"# Run: ftkit launch --config {paths[0]} -- --config_file {paths[1]}"
    header = "\n".join(
        [f"{WRITTEN_BY}: {best.describe()}.", summary, launch]
        + ([f"# Plan: {command}"] if command else [])
    )
    atomic_write_text(paths[0], header + "\n" + yaml.safe_dump(values, sort_keys=False))
    accelerate = accelerate_config(best, hw, Arch.from_config(plan.config))
    atomic_write_text(
        paths[1],
        f"{WRITTEN_BY}: {best.engine}, {best.plan.precision}, "
        f"{best.plan.world_size} process{'es' if best.plan.world_size > 1 else ''}."
        f"\n{launch}\n" + yaml.safe_dump(accelerate, sort_keys=False),
    )
    return paths


def _written_by_plan(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.readline().startswith(WRITTEN_BY)
