"""Memory figures you can trust: exact tensor accounting, a clean peak meter, and a planner.

Three pieces, meant to be compared with each other category by category:

* :func:`tensor_bytes` counts what the parameters, gradients and optimizer state occupy, from
  the tensors themselves.
* :class:`PeakMemoryMeter` measures the peak of one training run (one fresh process per
  setting); whatever the peak holds beyond the tensors above is the activation *residual*.
* :func:`estimate` predicts the same categories from a config and a :class:`TrainingPlan`,
  before anything is loaded, and :meth:`MemoryEstimate.verdict` says whether a named GPU
  holds it and, if not, the cheapest change that would.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import math
import os
import resource
import sys
from dataclasses import dataclass, field

import psutil
import torch
from transformers import PretrainedConfig

from ftkit.presets import resolve_config

KIB, MIB, GIB = 1024, 1024**2, 1024**3


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes held by the model's and the optimizer's own tensors, counted from the tensors.

    ``grads`` is what backward allocates for the trainable parameters.  When no trainable
    parameter holds a ``.grad`` (before the first backward, or after
    ``zero_grad(set_to_none=True)``) it is the bytes the next backward *will* allocate
    (trainable parameters x their dtype size) and ``grads_materialised`` is False; read it after
    the last optimizer step and before ``zero_grad`` (or use ``set_to_none=False``) to get the
    allocated figure.
    """

    params: int
    grads: int
    optimizer: int
    trainable_params: int
    total_params: int
    grads_materialised: bool

    def __post_init__(self):
        if min(self.params, self.grads, self.optimizer, self.trainable_params) < 0:
            raise ValueError("byte and parameter counts cannot be negative")
        if self.trainable_params > self.total_params:
            raise ValueError("more trainable than total parameters")

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unique(tensors):
    """Each distinct tensor once: tied weights share a data pointer; meta tensors have none."""
    seen = set()
    for t in tensors:
        key = (t.device, t.data_ptr(), t.numel(), t.dtype) if t.data_ptr() else id(t)
        if key not in seen:
            seen.add(key)
            yield t


def tensor_bytes(model: torch.nn.Module, optimizer=None) -> MemoryBreakdown:
    """Exact parameter, gradient and optimizer-state bytes of ``model`` / ``optimizer``.

    Parameters are counted at their own dtype and tied/shared tensors once.  Optimizer state is
    every tensor in ``optimizer.state`` (AdamW: ``exp_avg``, ``exp_avg_sq`` and the 4-byte
    ``step``).
    """
    params = list(_unique(model.parameters()))
    trainable = [p for p in params if p.requires_grad]
    grads = [p.grad for p in trainable if p.grad is not None]
    if grads:
        grad_bytes = sum(_nbytes(g) for g in _unique(grads))
    else:
        grad_bytes = sum(_nbytes(p) for p in trainable)
    state = []
    if optimizer is not None:
        for per_param in optimizer.state.values():
            state.extend(v for v in per_param.values() if torch.is_tensor(v))
    return MemoryBreakdown(
        params=sum(_nbytes(p) for p in params),
        grads=grad_bytes,
        optimizer=sum(_nbytes(t) for t in _unique(state)),
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in params),
        grads_materialised=bool(grads),
    )


@dataclass(frozen=True)
class MeasuredMemory:
    """A measured peak split into the planner's categories (activations are the residual)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    peak: int


@dataclass(frozen=True)
class PeakMemory:
    """One peak reading, in bytes above the meter's start.

    ``reserved`` is the CUDA caching allocator's peak (None on CPU).  ``exact`` is False when a
    CPU high-water mark never rose above the one the process already had at start, so ``peak``
    is only an upper bound (see :class:`PeakMemoryMeter`).
    """

    device: str
    peak: int
    reserved: int | None
    exact: bool

    def split(self, tensors: MemoryBreakdown) -> MeasuredMemory:
        """Activations = peak - params - grads - optimizer, clamped at 0.

        This residual also holds every transient buffer alive at the peak (autocast weight
        copies, loss-gradient buffers, allocator slack), which the planner models explicitly.
        """
        rest = self.peak - tensors.params - tensors.grads - tensors.optimizer
        return MeasuredMemory(
            tensors.params, tensors.grads, tensors.optimizer, max(rest, 0), self.peak
        )


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number


def _pin_glibc_mmap_threshold(threshold: int = 64 * KIB) -> bool:
    """Serve every allocation >= ``threshold`` by its own mmap, returned on free.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    activation-sized buffers come from the heap and freed ones stay resident: on a 106M-parameter
    LLaMA that kept ~850 MB extra resident, 30 % of the peak, and no setting can be compared
    under it.  Setting the threshold explicitly turns that adaptation off.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"
_PROC_SMAPS = "/proc/self/smaps"


def _reset_rss_high_water_mark() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False where unsupported.

    Linux (>= 4.0) resets it on ``echo 5 > /proc/self/clear_refs``.  Without a reset the
    high-water mark includes every earlier spike of the process and, across ``exec``, the
    resident set of the parent that spawned it (a test runner, a launcher), which can mask the
    run's own peak entirely.
    """
    try:
        with open(_PROC_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _resident_bytes() -> tuple[int, int] | None:
    """(peak RSS since the last reset, RSS of shared-library mappings now), from /proc.

    Library pages are code (libtorch alone is ~0.5 GB of it) that the run faults in as it first
    calls a kernel; how many become resident depends on the page cache, not on the run (20-30
    MiB from one run to the next here), and no GPU allocator counts them.  Memory-mapped data
    (safetensors weights) is not a library and stays counted.  None where there is no /proc.
    """
    try:
        with open(_PROC_STATUS) as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        libraries, in_library = 0, False
        with open(_PROC_SMAPS) as f:
            for line in f:
                head = line.split(maxsplit=6)
                if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                    path = head[5].strip() if len(head) > 5 else ""
                    in_library = ".so" in path.rsplit("/", 1)[-1]
                elif in_library and line.startswith("Rss:"):
                    libraries += int(line.split()[1])
    except (OSError, StopIteration):
        return None
    return hwm * KIB, libraries * KIB


class PeakMemoryMeter:
    """Peak memory of one run, started at the process baseline (after imports, before the model).

    CUDA: ``max_memory_allocated`` / ``max_memory_reserved`` after ``reset_peak_memory_stats``.

    CPU: the peak resident set above the one at ``start``, shared-library pages left out on both
    sides (see :func:`_resident_bytes`).  ``start`` resets the kernel's high-water mark
    (:func:`_reset_rss_high_water_mark`) so earlier spikes do not count.  Library pages only
    grow, so the mark minus the library pages at ``read`` is low by at most the code first
    touched after the peak.  Every grid setting still runs in its own process, so allocator
    state left by another setting cannot leak into its figure.  ``start`` also pins glibc's
    mmap threshold (see :func:`_pin_glibc_mmap_threshold`) so that RSS follows live tensors as
    ``max_memory_allocated`` does on CUDA rather than what the allocator kept.
    Without /proc (not Linux) it falls back to ``ru_maxrss`` minus the RSS at start, exact only
    when the peak rose above the mark the process already had.
    """

    def __init__(self, device: str | torch.device | None = None, *, pin_malloc: bool = True):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.pin_malloc = pin_malloc
        self.malloc_pinned = False
        self.mark_reset = False  # CPU: the kernel's high-water mark was reset at start
        self._start: tuple[int, int] | None = None

    def start(self) -> PeakMemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = (
                torch.cuda.memory_allocated(self.device),
                torch.cuda.memory_reserved(self.device),
            )
        else:
            if self.pin_malloc:
                self.malloc_pinned = _pin_glibc_mmap_threshold()
            resident = _reset_rss_high_water_mark() and _resident_bytes()
            self.mark_reset = bool(resident)
            if resident:
                rss, libraries = resident  # the mark was just reset to the current RSS
                self._start = (rss - libraries, 0)
            else:
                self._start = (psutil.Process().memory_info().rss, _ru_maxrss_bytes())
        return self

    def read(self) -> PeakMemory:
        if self._start is None:
            raise RuntimeError("PeakMemoryMeter.read() before start()")
        base, base2 = self._start
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return PeakMemory(
                device=str(self.device),
                peak=torch.cuda.max_memory_allocated(self.device) - base,
                reserved=torch.cuda.max_memory_reserved(self.device) - base2,
                exact=True,
            )
        resident = _resident_bytes() if self.mark_reset else None
        if resident:
            hwm, libraries = resident
            peak = hwm - libraries - base
            return PeakMemory(device="cpu", peak=max(peak, 0), reserved=None, exact=True)
        hwm = _ru_maxrss_bytes()
        return PeakMemory(device="cpu", peak=max(hwm - base, 0), reserved=None, exact=hwm > base2)


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # Linux reports KiB


# --------------------------------------------------------------------------- planning inputs

PRECISIONS = ("fp32", "fp16", "bf16")
QUANTIZATIONS = (None, "8bit", "4bit")
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
DEVICES = ("cuda", "cpu")
BLOOM_QV = "query_key_value:qv"
"""LoRA target for BLOOM's fused projection whose B matrix covers only the q and v rows (2/3)."""

# Bytes per quantized base weight.  LLM.int8: one int8 per weight plus one fp32 scale per output
# row.  NF4 (QLoRA): 4 bits per weight, one 8-bit absmax per 64-weight block and, with double
# quantization, one fp32 second-level scale per 256 blocks: 0.5 + 1/64 + 4/(64*256).
_NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class TrainingPlan:
    """How a model is trained, as far as memory is concerned.

    Precision follows Accelerate's mixed precision.  LoRA with fp16/bf16 loads the frozen base in
    that dtype and keeps the adapters in fp32 (PEFT's default upcast) under autocast.  Full
    fine-tuning with fp16/bf16 is AMP: fp32 master weights, half-precision compute; with
    ``zero2``/``zero3`` it is DeepSpeed's scheme instead: half weights and gradients, fp32 master
    copy inside the optimizer.  ``quantization`` (bitsandbytes, LoRA only) stores the decoder's
    linear weights in 8 or 4 (NF4, blocksize 64, double quant) bits; embeddings, ``lm_head`` and
    norms stay in the precision's dtype.  ``peft.prepare_model_for_kbit_training`` would upcast
    those to fp32; this planner does not assume it.  The optimizer is AdamW with two fp32
    states per trainable parameter.  Gradients are freed after every optimizer step
    (``zero_grad(set_to_none=True)``, as ftkit's Trainer does): without accumulation they do not
    exist yet in forward and only partly in backward; with ``gradient_accumulation_steps`` > 1
    (and under DeepSpeed, whose gradient buffers persist) they are alive throughout the step.
    ``device`` selects the runtime overhead and the few
    kernel differences between CUDA and the CPU used to validate the planner.
    """

    lora_r: int | None = 8
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    precision: str = "bf16"
    quantization: str | None = None
    gradient_checkpointing: bool = False
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seq_len: int = 512
    world_size: int = 1
    strategy: str = "ddp"
    device: str = "cuda"

    def __post_init__(self):
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1 or None (full fine-tune), got {self.lora_r}")
        if self.lora_targets is not None:
            if self.lora_r is None:
                raise ValueError("lora_targets needs lora_r")
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
            if not self.lora_targets:
                raise ValueError("lora_targets must name at least one module")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name, value, valid in (
            ("precision", self.precision, PRECISIONS),
            ("quantization", self.quantization, QUANTIZATIONS),
            ("strategy", self.strategy, STRATEGIES),
            ("device", self.device, DEVICES),
        ):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        if self.quantization is not None and self.lora_r is None:
            raise ValueError("quantized weights cannot be fully fine-tuned; set lora_r")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "seq_len", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def full(self) -> bool:
        return self.lora_r is None

    def describe(self) -> str:
        method = "full FT" if self.full else f"LoRA r={self.lora_r}"
        parts = [method, self.precision]
        if self.quantization:
            parts.append(self.quantization)
        if self.gradient_checkpointing:
            parts.append("GC")
        parts.append(f"micro-batch {self.micro_batch_size} x seq {self.seq_len}")
        if self.gradient_accumulation_steps > 1:
            parts.append(f"GA x{self.gradient_accumulation_steps}")
        if self.world_size > 1:
            parts.append(f"{self.world_size} GPUs {self.strategy}")
        return ", ".join(parts)


@dataclass(frozen=True)
class _Linear:
    name: str
    d_in: int
    d_out: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class _Arch:
    """The shape facts memory depends on, read once from a transformers config."""

    kind: str
    hidden: int
    layers: int
    heads: int
    q_width: int
    kv_width: int
    intermediate: int
    vocab: int
    tied: bool
    linears: tuple[_Linear, ...]  # one decoder block
    block_norm_params: int
    outer_norm_params: int
    block_norm_tensors: int
    outer_norm_tensors: int
    default_targets: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: PretrainedConfig) -> _Arch:
        kind = getattr(cfg, "model_type", None)
        h, v = cfg.hidden_size, cfg.vocab_size
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        if kind == "llama":
            heads = cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or h // heads
            q, kv, i = (
                heads * head_dim,
                (cfg.num_key_value_heads or heads) * head_dim,
                cfg.intermediate_size,
            )
            ab, mb = bool(cfg.attention_bias), bool(cfg.mlp_bias)
            linears = (
                _Linear("q_proj", h, q, ab),
                _Linear("k_proj", h, kv, ab),
                _Linear("v_proj", h, kv, ab),
                _Linear("o_proj", q, h, ab),
                _Linear("gate_proj", h, i, mb),
                _Linear("up_proj", h, i, mb),
                _Linear("down_proj", i, h, mb),
            )
            return cls(
                kind,
                h,
                cfg.num_hidden_layers,
                heads,
                q,
                kv,
                i,
                v,
                tied,
                linears,
                2 * h,
                h,
                2,
                1,
                ("q_proj", "v_proj"),
            )
        if kind == "bloom":
            linears = (
                _Linear("query_key_value", h, 3 * h, True),
                _Linear("dense", h, h, True),
                _Linear("dense_h_to_4h", h, 4 * h, True),
                _Linear("dense_4h_to_h", 4 * h, h, True),
            )
            # LayerNorms carry weight and bias: two per block, embedding LN and ln_f outside.
            return cls(
                kind,
                h,
                cfg.n_layer,
                cfg.n_head,
                h,
                h,
                4 * h,
                v,
                tied,
                linears,
                4 * h,
                4 * h,
                4,
                4,
                ("query_key_value",),
            )
        raise ValueError(f"unsupported model_type {kind!r}; the planner knows llama and bloom")

    def lora_shapes(self, targets: tuple[str, ...]) -> list[tuple[int, int]]:
        """(d_in, d_out) of each adapted linear in one block."""
        names = {lin.name: lin for lin in self.linears}
        shapes = []
        for target in targets:
            if target == BLOOM_QV and self.kind == "bloom":
                shapes.append((self.hidden, 2 * self.hidden))
            elif target in names:
                shapes.append((names[target].d_in, names[target].d_out))
            else:
                valid = list(names) + ([BLOOM_QV] if self.kind == "bloom" else [])
                raise ValueError(f"unknown LoRA target {target!r} for {self.kind}; valid: {valid}")
        return shapes

    @property
    def block_linear_weights(self) -> int:
        return sum(lin.d_in * lin.d_out for lin in self.linears)

    @property
    def block_params(self) -> int:
        return sum(lin.numel for lin in self.linears) + self.block_norm_params

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


# --------------------------------------------------------------------------- activation model


@dataclass(frozen=True)
class _Regime:
    """Dtypes and flags that decide which tensors autograd keeps, from the plan."""

    train_base: bool  # base weights trainable: every linear keeps its input
    c: int  # bytes of a matmul output (compute dtype)
    resid: int  # bytes of the residual stream
    autocast: bool  # half compute over fp32 (AMP) or half (LoRA) weights
    targets: frozenset[str]
    r: int
    dropout: bool
    mask: int  # bytes per dropout-mask element: bool on CUDA, the input's fp32 on CPU
    cuda: bool

    @classmethod
    def from_plan(cls, plan: TrainingPlan, targets: tuple[str, ...]) -> _Regime:
        """Half weights (LoRA base, DeepSpeed) make a half residual stream; only AMP's fp32
        weights under autocast keep it fp32.  DeepSpeed runs the half model without autocast."""
        half = plan.precision != "fp32"
        half_weights = half and (not plan.full or plan.strategy in ("zero2", "zero3"))
        return cls(
            train_base=plan.full,
            c=2 if half else 4,
            resid=2 if half_weights else 4,
            autocast=half and not (plan.full and plan.strategy in ("zero2", "zero3")),
            targets=frozenset(t.split(":")[0] for t in targets),
            r=plan.lora_r or 0,
            dropout=plan.lora_dropout > 0,
            mask=1 if plan.device == "cuda" else 4,
            cuda=plan.device == "cuda",
        )

    def linear_inputs(self, x_bytes: int, width: int, names, *, x_counted=False) -> int:
        """Bytes per token kept for the inputs of the linears ``names`` that all read one tensor x.

        A trainable linear keeps x itself when x is already in the compute dtype and its own
        autocast copy otherwise (AMP: one copy per consumer).  A LoRA branch keeps x (fp32, no
        dropout), or its own half copy (PEFT upcasts x to the fp32 adapter dtype, autocast casts
        it back), plus the dropout mask and the r-wide output of ``lora_A``.
        """
        total, shares_x = 0, False
        for name in names:
            if self.train_base:
                if x_bytes == self.c:
                    shares_x = True
                else:
                    total += self.c * width
            if name in self.targets:
                if self.dropout:
                    total += (self.mask + self.c) * width
                elif x_bytes == self.c == 4:
                    shares_x = True
                else:
                    total += self.c * width
                total += self.c * self.r
        return total + (x_bytes * width if shares_x and not x_counted else 0)

    def norm_input(self) -> int:
        """Bytes of the input a norm keeps (RMSNorm upcasts to fp32; LayerNorm is fp32 on CUDA
        autocast and runs in the input dtype on CPU autocast)."""
        return 4 if self.resid == 4 or (self.autocast and self.cuda) else 2


def _llama_layer(a: _Arch, R: _Regime) -> int:
    """Bytes per token one LLaMA decoder block keeps for backward (SDPA attention).

    Counted from what autograd saves in transformers' LlamaDecoderLayer and checked with
    ``saved_tensors_hooks``.  fp32 full FT gives 40h + 16i bytes, AMP full FT 34h + 8i, bf16 LoRA
    on q/v 20h + 6i (+ small terms).  Korthikanti et al. 2022 count sbh(34 + 5as/h) for GPT
    blocks; SwiGLU's third matrix adds the i terms and SDPA keeps no s x s probabilities.
    """
    h, i = a.hidden, a.intermediate
    rms = 4 * h + 4 + (4 * h if R.train_base else 0)  # fp32 input, rsqrt, normalized (weight grad)
    attn_in = R.linear_inputs(R.resid, h, ("q_proj", "k_proj", "v_proj"))
    sdpa = R.c * (2 * a.q_width + 2 * a.kv_width) + 4 * a.heads  # q, k, v, out + fp32 logsumexp
    o_in = R.linear_inputs(R.c, a.q_width, ("o_proj",), x_counted=True)
    mlp_in = R.linear_inputs(R.resid, h, ("gate_proj", "up_proj"))
    swiglu = 3 * R.c * i  # gate (SiLU input), SiLU output, up
    down_in = R.linear_inputs(R.c, i, ("down_proj",))
    return 2 * rms + attn_in + sdpa + o_in + mlp_in + swiglu + down_in


def _bloom_layer(a: _Arch, R: _Regime, seq: int) -> int:
    """Bytes per token one BLOOM block keeps: eager ALiBi attention keeps s x s probabilities."""
    h = a.hidden
    ln_out = 4 if R.autocast and R.cuda else R.resid
    ln = R.norm_input() * h + 8  # input, mean, rstd
    qkv_in = R.linear_inputs(ln_out, h, ("query_key_value",))
    probs = 4 * a.heads * seq + (R.c * a.heads * seq if R.c == 2 else 0)  # fp32 softmax (+cast)
    attn = 3 * R.c * h + probs  # q and k (baddbmm), v (bmm): reshaped copies
    dense_in = R.linear_inputs(R.c, h, ("dense",))  # merged-heads copy
    mlp_in = R.linear_inputs(ln_out, h, ("dense_h_to_4h",))
    gelu = R.c * 4 * h + R.linear_inputs(R.c, 4 * h, ("dense_4h_to_h",))
    return 2 * ln + qkv_in + attn + dense_in + mlp_in + gelu


def _layer_backward_transient(a: _Arch, R: _Regime, seq: int) -> int:
    """Gradient buffers alive while one block runs backward (per token), on top of what it keeps.

    SwiGLU backward holds grad(prod), grad(SiLU out), grad(up) and grad(gate) around the point
    where the input gradient is summed; BLOOM's attention backward holds grad(probs) and the fp32
    softmax gradient.  Plus the incoming, outgoing and one partial residual gradient.
    """
    if a.kind == "llama":
        inner = 4 * R.c * a.intermediate
    else:
        inner = max(2 * R.c * a.intermediate, (4 + 2 * R.c) * a.heads * seq)
    return inner + 3 * R.resid * a.hidden


def _head(a: _Arch, R: _Regime) -> int:
    """Bytes per token kept after the last block: final norm, lm_head input, fp32 log-softmax.

    transformers' causal-LM loss upcasts the logits to fp32 and cross-entropy keeps the fp32
    log-softmax output; BLOOM's embedding LayerNorm keeps its input when the base trains.
    """
    h = a.hidden
    if a.kind == "llama":
        norm = 4 * h + 4 + (4 * h if R.train_base else 0)
        head_in = R.resid
    else:
        norm = R.norm_input() * h + 8 + (R.resid * h + 8 if R.train_base else 0)
        head_in = 4 if R.autocast and R.cuda else R.resid
    return norm + R.linear_inputs(head_in, h, ("lm_head",)) + 4 * a.vocab


def _activation_phases(
    a: _Arch, plan: TrainingPlan, R: _Regime, opt_temp: int, quantized_weight: int
) -> dict[str, int]:
    """Peak transient bytes of each phase of a step, on top of parameters, optimizer state and
    every gradient; :func:`estimate` then takes off the gradients a phase does not hold yet (see
    :class:`TrainingPlan`) and the activation estimate is the maximum.  Phases:

    * ``loss backward``: everything the forward kept, plus the two fp32 vocab-wide buffers
      cross-entropy backward allocates (grad of the log-probabilities, grad of the logits).
      With gradient checkpointing the blocks keep only their inputs.
    * ``lm_head backward``: the logits gradient and, when the base trains, the fresh V x h
      weight gradient before it is accumulated into ``.grad``.
    * ``block recompute`` (checkpointing) or ``block backward``: one block's kept tensors and
      its backward gradient buffers on top of the other blocks' inputs (or kept tensors).
    * ``forward``: at the loss, the logits and their fp32 upcast beside the log-softmax; under
      AMP autocast also caches a half copy of every trainable weight until the autocast region
      exits (without checkpointing the graph keeps those copies through backward as well).
    * ``optimizer step``: AdamW's temporaries.

    The model must be called as ``loss = model(**batch).loss``: keeping the output object alive
    through backward also keeps the compute-dtype logits (c x V bytes per token).
    """
    T, L, V, h = plan.micro_batch_size * plan.seq_len, a.layers, a.vocab, a.hidden
    layer = _llama_layer(a, R) if a.kind == "llama" else _bloom_layer(a, R, plan.seq_len)
    head = _head(a, R)
    amp = R.autocast and R.train_base
    all_copies = 2 * (L * a.block_linear_weights + V * h) if amp else 0
    lm_copy = 2 * V * h if amp else 0
    block_copies = 2 * a.block_linear_weights if amp else 0
    head_grad = 4 * V * h if R.train_base else 0
    bwd = _layer_backward_transient(a, R, plan.seq_len)
    logits = R.c * V + (4 * V if R.c == 2 else 0)  # lm_head output and its fp32 upcast
    if plan.gradient_checkpointing:
        kept = L * R.resid * h
        graph_copies = lm_copy
        phases = {"block recompute": T * (kept + layer + bwd) + block_copies + quantized_weight}
    else:
        kept = L * layer
        graph_copies = all_copies
        phases = {"block backward": T * (kept + bwd) + all_copies + quantized_weight}
    phases["forward"] = T * (kept + head + logits) + all_copies
    phases["loss backward"] = T * (kept + head + 8 * V) + graph_copies
    phases["lm_head backward"] = (
        T * (kept + head + (2 * V if R.c == 2 else 0)) + graph_copies + head_grad
    )
    phases["optimizer step"] = opt_temp
    return phases


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int  # bytes nvidia-smi reports as "Total"; the CUDA context is taken from it


GPUS = {
    "T4": GPU("T4 16GB", 15360 * MIB),
    "A100-40GB": GPU("A100 40GB", 40960 * MIB),
    "A100-80GB": GPU("A100 80GB", 81920 * MIB),
    "H100-80GB": GPU("H100 80GB", 81559 * MIB),
}

# CUDA: PyTorch's context with lazy module loading plus cuBLAS workspaces (~0.5 GiB), the caching
# allocator's slack over the allocated peak (~5 %), and NCCL buffers when several GPUs talk.
# CPU: what the runtime allocates after imports (thread pools, oneDNN caches; library code pages
# are left out by the meter), measured on this kit: 5-7 MiB for LoRA, 11-13 for full FT.  Half
# precision on a CPU with native bf16 instructions adds oneDNN's JIT-compiled bf16 kernels and
# their scratchpads (~10 MiB more; gone when oneDNN is held to an ISA without bf16, e.g.
# ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI, where bf16 is emulated).
CUDA_CONTEXT, CUDA_ALLOCATOR_SLACK, NCCL_BUFFERS = 512 * MIB, 0.05, 256 * MIB
CPU_RUNTIME, CPU_NATIVE_BF16_KERNELS = 6 * MIB, 10 * MIB


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX), as far as the CPU flags and
    an ``ONEDNN_MAX_CPU_ISA`` cap tell."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if cap != "ALL" and "BF16" not in cap and "AMX" not in cap:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _gib(n: float) -> str:
    return f"{n / GIB:7.2f} GiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per device, by category, for one model and plan."""

    model: str
    plan: TrainingPlan
    params: int
    grads: int
    optimizer: int
    activations: int
    overhead: int
    trainable_params: int
    total_params: int
    phases: tuple[tuple[str, int], ...]
    config: PretrainedConfig = field(repr=False, compare=False)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.overhead

    def table(self) -> str:
        rows = [
            f"{self.model}: {self.plan.describe()}",
            f"  trainable {self.trainable_params:,} of {self.total_params:,} parameters "
            f"({100 * self.trainable_params / self.total_params:.3f} %)",
        ]
        for name in ("params", "grads", "optimizer", "activations", "overhead"):
            rows.append(f"  {name:<12}{_gib(getattr(self, name))}")
        rows.append(f"  {'total':<12}{_gib(self.total)} per device")
        peak_phase = max(self.phases, key=lambda p: p[1])[0]
        rows.append(f"  (activation peak in phase: {peak_phase})")
        return "\n".join(rows)

    def verdict(self, gpu: str | GPU) -> Verdict:
        """Whether this fits ``gpu`` and, if not, the cheapest change found that makes it fit.

        Changes are tried cumulatively in order of what they cost the run: gradient
        checkpointing (~30 % more compute), halving the micro-batch down to 1 with gradient
        accumulation (same effective batch, less throughput), 8-bit then 4-bit base weights
        (LoRA only; small quality cost), then 2, 4 or 8 GPUs sharding everything with FSDP
        (more hardware).  A plan that fits nowhere on 8 GPUs gets no suggestion.
        """
        gpu = _gpu(gpu)
        if self.total <= gpu.memory:
            return Verdict(gpu, self, True, (), None)
        changes: tuple[str, ...] = ()
        for changes, plan in _cheaper_plans(self.plan):
            candidate = estimate(self.config, plan)
            if candidate.total <= gpu.memory:
                return Verdict(gpu, self, False, changes, candidate)
        return Verdict(gpu, self, False, changes, None)


@dataclass(frozen=True)
class Verdict:
    gpu: GPU
    estimate: MemoryEstimate
    fits: bool
    changes: tuple[str, ...]
    suggestion: MemoryEstimate | None

    def __str__(self) -> str:
        head = (
            f"{self.gpu.name:<10} {self.estimate.total / GIB:6.1f} / {self.gpu.memory / GIB:5.1f}"
        )
        if self.fits:
            return f"{head} GiB  fits"
        if self.suggestion is None:
            return f"{head} GiB  does not fit, even with: {'; '.join(self.changes)}"
        return (
            f"{head} GiB  does not fit; fits with {'; '.join(self.changes)} "
            f"({self.suggestion.total / GIB:.1f} GiB)"
        )


def _gpu(gpu: str | GPU) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    for key, value in GPUS.items():
        if gpu.lower() in (key.lower(), value.name.lower()):
            return value
    raise ValueError(f"unknown GPU {gpu!r}; valid: {', '.join(GPUS)}")


def _cheaper_plans(plan: TrainingPlan):
    """(all changes so far, plan) in the order documented in :meth:`MemoryEstimate.verdict`.

    Each step keeps the ones before it, except that 2, 4 and 8 GPUs are alternatives.
    """
    replace, changes = dataclasses.replace, ()
    if not plan.gradient_checkpointing:
        plan, changes = replace(plan, gradient_checkpointing=True), ("gradient checkpointing",)
        yield changes, plan
    batch, steps = plan.micro_batch_size * plan.gradient_accumulation_steps, changes
    while plan.micro_batch_size > 1:
        micro = plan.micro_batch_size // 2
        accumulation = math.ceil(batch / micro)
        plan = replace(plan, micro_batch_size=micro, gradient_accumulation_steps=accumulation)
        changes = (*steps, f"micro-batch {micro} with gradient accumulation x{accumulation}")
        yield changes, plan
    if not plan.full:
        steps = changes
        for bits in ("8bit", "4bit"):
            if QUANTIZATIONS.index(plan.quantization) < QUANTIZATIONS.index(bits):
                plan, changes = replace(plan, quantization=bits), (*steps, f"{bits} base weights")
                yield changes, plan
    for n in (2, 4, 8):
        if n > plan.world_size:
            yield (*changes, f"{n} GPUs with FSDP"), replace(plan, world_size=n, strategy="fsdp")


def estimate(
    model_config: PretrainedConfig | str, plan: TrainingPlan | None = None
) -> MemoryEstimate:
    """Predict per-device training memory of a LLaMA or BLOOM config (or preset name).

    Parameters, gradients and optimizer state are exact for a single process (they match
    :func:`tensor_bytes` byte for byte); activations follow :func:`_activation_phases`.
    Sharding: ``fsdp``/``zero3`` split parameters, gradients and optimizer state over
    ``world_size`` and add two gathered blocks of working parameters; ``zero2`` splits gradients
    and optimizer state; multi-GPU ``ddp`` keeps a second copy of the gradients in its
    communication buckets.
    """
    cfg = resolve_config(model_config) if isinstance(model_config, str) else model_config
    plan = plan or TrainingPlan()
    a = _Arch.from_config(cfg)
    targets = () if plan.full else (plan.lora_targets or a.default_targets)
    lora = a.lora_shapes(targets)
    half = plan.precision != "fp32"
    deepspeed = plan.strategy in ("zero2", "zero3")
    n, L = plan.world_size, a.layers

    base_params = L * a.block_params + a.embedding_params + a.outer_norm_params
    lora_params = L * plan.lora_r * sum(d_in + d_out for d_in, d_out in lora) if lora else 0
    trainable = base_params if plan.full else lora_params
    n_trainable_tensors = (
        (
            L * (len(a.linears) + sum(lin.bias for lin in a.linears) + a.block_norm_tensors)
            + (1 if a.tied else 2)
            + a.outer_norm_tensors
        )
        if plan.full
        else 2 * L * len(lora)
    )

    trained_dtype = 2 if half and deepspeed else 4
    frozen_dtype = 2 if half else 4
    if plan.full:
        param_bytes = base_params * trained_dtype
    else:
        weights = L * a.block_linear_weights
        quantized = {
            None: weights * frozen_dtype,
            "8bit": weights + L * sum(lin.d_out * 4 for lin in a.linears),
            "4bit": math.ceil(weights * _NF4_BYTES),
        }
        param_bytes = (
            quantized[plan.quantization]
            + (base_params - weights) * frozen_dtype
            + lora_params * trained_dtype
        )
    grad_bytes = trainable * trained_dtype
    if deepspeed:
        opt_bytes = trainable * (12 if half else 8)  # fp32 master (when half) + exp_avg, exp_avg_sq
    else:
        opt_bytes = 8 * trainable + 4 * n_trainable_tensors  # + torch's 4-byte step tensors

    # AdamW step temporaries: CUDA's foreach path takes sqrt(exp_avg_sq) of every trainable
    # tensor at once; CPU's per-tensor path holds two temporaries of the largest tensor;
    # DeepSpeed's fused Adam none.
    biggest_linear = max(lin.d_in * lin.d_out for lin in a.linears)
    largest = (
        max(a.vocab * a.hidden, biggest_linear)
        if plan.full
        else max(plan.lora_r * max(d) for d in lora)
    )
    shard = n if plan.strategy != "ddp" else 1
    if deepspeed:
        opt_temp = 0
    elif plan.device == "cuda":
        opt_temp = 4 * math.ceil(trainable / shard)
    else:
        opt_temp = 2 * 4 * largest
    quantized_weight = 2 * biggest_linear if plan.quantization else 0  # one dequantized weight
    phases = _activation_phases(
        a, plan, _Regime.from_plan(plan, targets), opt_temp, quantized_weight
    )

    if n > 1:
        if plan.strategy in ("fsdp", "zero3"):
            param_bytes = math.ceil(param_bytes / n) + 2 * a.block_params * (2 if half else 4)
        if plan.strategy == "ddp":
            grad_bytes *= 2
        else:
            grad_bytes = math.ceil(grad_bytes / n)
            opt_bytes = math.ceil(opt_bytes / n)
    if plan.gradient_accumulation_steps == 1 and not deepspeed:
        # Freed gradients come back only in backward: none before the lm_head's, then the head's
        # and one block's while the first block runs backward.  DDP's bucket copy stays.
        own = grad_bytes // 2 if plan.strategy == "ddp" and n > 1 else grad_bytes
        later = (
            a.vocab * a.hidden + a.outer_norm_params + a.block_params
            if plan.full
            else trainable // L
        )
        block = "block recompute" if plan.gradient_checkpointing else "block backward"
        absent = dict.fromkeys(("forward", "loss backward", "lm_head backward"), own)
        absent[block] = own - min(own, math.ceil(own * later / trainable))
        phases = {name: value - absent.get(name, 0) for name, value in phases.items()}
    activations = max(phases.values())
    allocated = param_bytes + grad_bytes + opt_bytes + activations
    if plan.device == "cuda":
        overhead = (
            CUDA_CONTEXT + int(CUDA_ALLOCATOR_SLACK * allocated) + (NCCL_BUFFERS if n > 1 else 0)
        )
    else:
        native_bf16 = plan.precision != "fp32" and cpu_has_native_bf16()
        overhead = CPU_RUNTIME + (CPU_NATIVE_BF16_KERNELS if native_bf16 else 0)
    return MemoryEstimate(
        model=getattr(cfg, "name_or_path", "") or a.kind,
        plan=plan,
        params=param_bytes,
        grads=grad_bytes,
        optimizer=opt_bytes,
        activations=activations,
        overhead=overhead,
        trainable_params=trainable,
        total_params=base_params + lora_params,
        phases=tuple(phases.items()),
        config=cfg,
    )


# --------------------------------------------------------------------------- command line

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
        return (
            f"{(e.params - adapters) / 1e6:,.0f} MB (NF4 linears, fp16 embeddings/norms; "
            f"+{2 * 2 * 32000 * 4096 / 1e6:,.0f} MB if prepare_model_for_kbit_training "
            "upcasts them to fp32)"
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


def _paper() -> str:
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


def estimate_main(argv: list[str] | None = None) -> int:
    """``ftkit-estimate``: print the per-category estimate and the GPU verdicts."""
    parser = argparse.ArgumentParser(prog="ftkit-estimate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="llama2-7b", help="preset name or a local directory with config.json"
    )
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument(
        "--lora_targets",
        default=None,
        help=f"comma-separated module names (BLOOM q/v rows only: {BLOOM_QV})",
    )
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--quantization", choices=["none", "8bit", "4bit"], default="none")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size per device")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--world_size", type=int, default=1)
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    parser.add_argument("--device", choices=DEVICES, default="cuda")
    parser.add_argument(
        "--gpu",
        action="append",
        choices=list(GPUS),
        help="GPU to judge against (repeatable; default: all)",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="verdicts for the course's settings beside published figures",
    )
    args = parser.parse_args(argv)
    if args.paper:
        print(_paper())
        return 0
    try:
        plan = TrainingPlan(
            lora_r=None if args.full else args.lora_r,
            lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else None,
            lora_dropout=args.lora_dropout,
            precision=args.precision,
            quantization=None if args.quantization == "none" else args.quantization,
            gradient_checkpointing=args.gradient_checkpointing,
            micro_batch_size=args.batch,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            seq_len=args.seq_len,
            world_size=args.world_size,
            strategy=args.strategy,
            device=args.device,
        )
        result = estimate(args.model, plan)
    except ValueError as err:
        print(f"ftkit-estimate: error: {err}", file=sys.stderr)
        return 2
    print(result.table())
    for gpu in args.gpu or GPUS:
        print("  " + str(result.verdict(gpu)))
    return 0


if __name__ == "__main__":
    raise SystemExit(estimate_main())
