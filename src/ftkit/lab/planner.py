"""The memory planner: per-device training memory by category, before anything is loaded.

:func:`estimate` predicts parameters, gradients, optimizer state, activations (per phase of a
step) and runtime overhead from a config and a :class:`TrainingPlan`;
:meth:`MemoryEstimate.verdict` says whether a named GPU holds it and, if not, the cheapest change
that would.  The categories are the ones ``ftkit.meter`` measures, so each can be checked.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import PretrainedConfig

from ftkit.batching import padding_free_problem
from ftkit.config import PRECISIONS
from ftkit.errors import ConfigError
from ftkit.lab.gpus import GPU, find_gpu
from ftkit.lab.presets import resolve_config
from ftkit.meter import GIB, MIB, cpu_has_native_bf16

QUANTIZATIONS = (None, "8bit", "4bit")
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
DEVICES = ("cuda", "cpu")
BLOOM_QV = "query_key_value:qv"
"""LoRA target for BLOOM's fused projection whose B matrix covers only the q and v rows (2/3)."""

# Bytes per quantized base weight.  LLM.int8: one int8 per weight plus one fp32 scale per output
# row.  NF4 (QLoRA): 4 bits per weight, one 8-bit absmax per 64-weight block and, with double
# quantization, one fp32 second-level scale per 256 blocks: 0.5 + 1/64 + 4/(64*256).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class TrainingPlan:
    """How a model is trained, as far as memory is concerned.

    Precision follows Accelerate's mixed precision.  LoRA with fp16/bf16 loads the frozen base in
    that dtype and keeps the adapters in fp32 (PEFT's default upcast) under autocast.  Full
    fine-tuning with fp16/bf16 is AMP: fp32 master weights, half-precision compute; with
    ``zero2``/``zero3`` it is DeepSpeed's scheme instead: half weights and gradients, fp32 master
    copy inside the optimizer.  ``quantization`` (bitsandbytes, LoRA only) stores the decoder's
    linear weights in 8 or 4 (NF4, blocksize 64, double quant) bits; embeddings, ``lm_head`` and
    norms are upcast to fp32 by ``peft.prepare_model_for_kbit_training``, which ftkit calls on a
    quantized base (counted so here; the activations are not re-derived for it).  The optimizer
    is AdamW with two fp32 states per trainable parameter.  Gradients are freed after every optimizer step
    (``zero_grad(set_to_none=True)``, as ftkit's Trainer does): without accumulation they do not
    exist yet in forward and only partly in backward; with ``gradient_accumulation_steps`` > 1
    (and under DeepSpeed, whose gradient buffers persist) they are alive throughout the step.
    ``device`` selects the runtime overhead and the few
    kernel differences between CUDA and the CPU used to validate the planner.

    Batching follows training's defaults.  ``padding_free`` (None = auto: on where
    ``ftkit.batching`` proves it exact, as training's ``padding_free: auto``) flattens each
    micro-batch into one row, for which transformers builds a dense block-diagonal T x T
    boolean mask once per forward.  ``attn_implementation`` follows training's field: under
    ``auto``/``sdpa_varlen`` (ftkit's per-sequence SDPA, the padding-free default) that mask is
    all; under ``sdpa`` SDPA also converts it to the compute dtype and saves it in every block.
    ``supervised_logits_only`` computes the LM head only at positions whose shifted target is
    supervised, ``supervised_fraction`` of each sequence (1.0, the worst case, when prompts are
    not masked or short); a padded batch keeps the union of its rows' supervised columns, so give
    the fraction of the row with the shortest prompt.  Sequences are assumed to fill ``seq_len``.
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
    padding_free: bool | None = None
    attn_implementation: str = "auto"
    supervised_logits_only: bool = True
    supervised_fraction: float = 1.0

    def __post_init__(self):
        if self.lora_r is not None and self.lora_r < 1:
            raise ConfigError(f"lora_r must be >= 1 or None (full fine-tune), got {self.lora_r}")
        if self.lora_targets is not None:
            if self.lora_r is None:
                raise ConfigError("lora_targets needs lora_r")
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
            if not self.lora_targets:
                raise ConfigError("lora_targets must name at least one module")
        if not 0.0 < self.supervised_fraction <= 1.0:
            raise ConfigError(
                f"supervised_fraction must be in (0, 1], got {self.supervised_fraction}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name, value, valid in (
            ("attn_implementation", self.attn_implementation, ("auto", "sdpa", "sdpa_varlen")),
            ("precision", self.precision, PRECISIONS),
            ("quantization", self.quantization, QUANTIZATIONS),
            ("strategy", self.strategy, STRATEGIES),
            ("device", self.device, DEVICES),
        ):
            if value not in valid:
                raise ConfigError(f"{name} must be one of {valid}, got {value!r}")
        if self.quantization is not None and self.lora_r is None:
            raise ConfigError("quantized weights cannot be fully fine-tuned; set lora_r")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "seq_len", "world_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def full(self) -> bool:
        return self.lora_r is None

    @property
    def tokens(self) -> int:
        """Tokens the blocks run on per micro-batch (a flattened row holds the same tokens)."""
        return self.micro_batch_size * self.seq_len

    @property
    def logit_rows(self) -> int:
        """Positions the LM head computes per micro-batch: all of them, or with
        ``supervised_logits_only`` those whose shifted target is supervised (at most seq - 1 per
        sequence)."""
        if not self.supervised_logits_only:
            return self.tokens
        per_sequence = min(self.seq_len - 1, round(self.supervised_fraction * self.seq_len))
        return self.micro_batch_size * max(1, per_sequence)

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
        if self.padding_free:
            parts.append(
                "padding-free" + (" (sdpa mask)" if self.attn_implementation == "sdpa" else "")
            )
        if self.supervised_logits_only:
            parts.append(f"logits at {self.supervised_fraction:.0%} of positions")
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
class Arch:
    """The shape facts memory and step time depend on, read once from a transformers config."""

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
    def from_config(cls, cfg: PretrainedConfig) -> Arch:
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
        raise ConfigError(f"unsupported model_type {kind!r}; the planner knows llama and bloom")

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
                raise ConfigError(f"unknown LoRA target {target!r} for {self.kind}; valid: {valid}")
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


def _llama_layer(a: Arch, R: _Regime) -> int:
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


def _bloom_layer(a: Arch, R: _Regime, seq: int) -> int:
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


def _layer_backward_transient(a: Arch, R: _Regime, seq: int) -> int:
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


def _head(a: Arch, R: _Regime) -> tuple[int, int]:
    """Bytes kept after the last block: (per token, per logit row).

    Per token: the final norm's saved tensors (BLOOM's embedding LayerNorm too, when the base
    trains).  Per row the LM head computes: its input when the base trains, and the fp32
    log-softmax output cross-entropy keeps for backward (transformers' ``ForCausalLMLoss`` and
    ftkit's supervised-logits loss both upcast the logits to fp32 first).
    """
    h = a.hidden
    if a.kind == "llama":
        norm = 4 * h + 4 + (4 * h if R.train_base else 0)
        head_in = R.resid
    else:
        norm = R.norm_input() * h + 8 + (R.resid * h + 8 if R.train_base else 0)
        head_in = 4 if R.autocast and R.cuda else R.resid
    return norm, R.linear_inputs(head_in, h, ("lm_head",)) + 4 * a.vocab


def _activation_phases(
    a: Arch, plan: TrainingPlan, R: _Regime, opt_temp: int, quantized_weight: int
) -> dict[str, int]:
    """Peak transient bytes of each phase of a step, on top of parameters, optimizer state and
    every gradient; :func:`estimate` then takes off the gradients a phase does not hold yet (see
    :class:`TrainingPlan`) and the activation estimate is the maximum.  Phases:

    * ``loss backward``: everything the forward kept, plus the two fp32 vocab-wide buffers
      cross-entropy backward allocates per logit row (grad of the log-probabilities, grad of the
      logits): 12 bytes x vocabulary per row with the saved log-softmax output.  With gradient
      checkpointing the blocks keep only their inputs.
    * ``lm_head backward``: the logits gradient and, when the base trains, the fresh V x h
      weight gradient before it is accumulated into ``.grad``.
    * ``block recompute`` (checkpointing) or ``block backward``: one block's kept tensors and
      its backward gradient buffers on top of the other blocks' inputs (or kept tensors).
    * ``forward``: at the loss, the logits and their fp32 upcast beside the log-softmax; under
      AMP autocast also caches a half copy of every trainable weight until the autocast region
      exits (without checkpointing the graph keeps those copies through backward as well).
    * ``optimizer step``: AdamW's temporaries.

    Blocks run on every token; the vocabulary-wide buffers exist per logit row
    (:attr:`TrainingPlan.logit_rows`: every token, or only the supervised positions).  The
    model is called as ``loss = model(**batch).loss`` (ftkit's Trainer does): keeping the
    output object alive through backward would also keep the compute-dtype logits.
    """
    T, K, L, V, h = plan.tokens, plan.logit_rows, a.layers, a.vocab, a.hidden
    layer = _llama_layer(a, R) if a.kind == "llama" else _bloom_layer(a, R, plan.seq_len)
    head_token, head_row = _head(a, R)
    amp = R.autocast and R.train_base
    all_copies = 2 * (L * a.block_linear_weights + V * h) if amp else 0
    lm_copy = 2 * V * h if amp else 0
    block_copies = 2 * a.block_linear_weights if amp else 0
    head_grad = 4 * V * h if R.train_base else 0
    bwd = _layer_backward_transient(a, R, plan.seq_len)
    logits = R.c * V + (4 * V if R.c == 2 else 0)  # lm_head output and its fp32 upcast
    # A flattened row gets a dense block-diagonal T x T boolean mask from transformers; plain
    # SDPA converts it to the query's dtype and saves it for backward in every block it runs,
    # sdpa_varlen (the padding-free default) attends per sequence without it.
    bool_mask = T * T if plan.padding_free else 0
    layer_mask = R.c * T * T if plan.padding_free and plan.attn_implementation == "sdpa" else 0
    if plan.gradient_checkpointing:
        kept = L * R.resid * h
        graph_copies = lm_copy
        masks = bool_mask  # a checkpointed block's input, recomputed one block at a time
        phases = {
            "block recompute": T * (kept + layer + bwd)
            + masks
            + layer_mask
            + block_copies
            + quantized_weight
        }
    else:
        kept = L * layer
        graph_copies = all_copies
        masks = L * layer_mask
        phases = {"block backward": T * (kept + bwd) + masks + all_copies + quantized_weight}
    after_blocks = T * (kept + head_token) + masks
    phases["forward"] = after_blocks + K * (head_row + logits) + all_copies
    phases["loss backward"] = after_blocks + K * (head_row + 8 * V) + graph_copies
    phases["lm_head backward"] = (
        after_blocks + K * (head_row + (2 * V if R.c == 2 else 0)) + graph_copies + head_grad
    )
    phases["optimizer step"] = opt_temp
    return phases


# --------------------------------------------------------------------------- the estimate


# CUDA: PyTorch's context with lazy module loading plus cuBLAS workspaces (~0.5 GiB), the caching
# allocator's slack over the allocated peak (~5 %), and NCCL buffers when several GPUs talk.
# CPU: what the runtime allocates after imports (thread pools, oneDNN caches; library code pages
# are left out by the meter), measured on this kit: 5-7 MiB for LoRA, 11-13 for full FT.  Half
# precision on a CPU with native bf16 instructions adds oneDNN's JIT-compiled bf16 kernels and
# their scratchpads (~10 MiB more; gone when oneDNN is held to an ISA without bf16, e.g.
# ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI, where bf16 is emulated).  On CPU the run's fast tokenizer
# lives in the same memory: LLaMA-2's 32,000-piece BPE (vocabulary, merges) holds 35 MiB
# (tokenizers.Tokenizer alone, 1,150 bytes a piece), the embedded 640-piece one ~0.  Per piece
# of the model's vocabulary the planner adds the mean residual of the four calibration cells of
# lab/grids/planner-32k.yaml (1,040 bytes; results/planner-cpu/).
CUDA_CONTEXT, CUDA_ALLOCATOR_SLACK, NCCL_BUFFERS = 512 * MIB, 0.05, 256 * MIB
CPU_RUNTIME, CPU_NATIVE_BF16_KERNELS = 6 * MIB, 10 * MIB
CPU_TOKENIZER_PER_PIECE = 1040


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
        gpu = find_gpu(gpu)
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
    a = Arch.from_config(cfg)
    problem = padding_free_problem(cfg)
    if plan.padding_free and problem:
        raise ConfigError(problem)
    if plan.padding_free is None:
        plan = dataclasses.replace(plan, padding_free=problem is None)
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
            "4bit": math.ceil(weights * NF4_BYTES),
        }
        # A quantized base's embeddings, head and norms are fp32 (prepare_model_for_kbit_training).
        outer_dtype = 4 if plan.quantization else frozen_dtype
        param_bytes = (
            quantized[plan.quantization]
            + (base_params - weights) * outer_dtype
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
        overhead = (
            CPU_RUNTIME
            + CPU_TOKENIZER_PER_PIECE * a.vocab
            + (CPU_NATIVE_BF16_KERNELS if native_bf16 else 0)
        )
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
