"""Memory figures you can trust: exact tensor accounting and a clean peak meter.

* :func:`tensor_bytes` counts what the parameters, gradients and optimizer state occupy, from
  the tensors themselves; :func:`parameter_counts` is the one place parameters are counted.
* :class:`PeakMemoryMeter` measures the peak of one training run; whatever the peak holds
  beyond the tensors above is the activation *residual*.

The planner (``ftkit.lab.planner``) predicts the same categories before anything is loaded.
"""

from __future__ import annotations

import ctypes
import os
import resource
from dataclasses import dataclass

import psutil
import torch

KIB, MIB, GIB = 1024, 1024**2, 1024**3


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


def _numel(param: torch.Tensor) -> int:
    """Elements a parameter stands for: a packed 4-bit weight holds two per stored byte (as PEFT
    counts them), and a ZeRO-3 partitioned one reports 0 locally but keeps its size in
    ``ds_numel``."""
    count = getattr(param, "ds_numel", None) or param.numel()
    if type(param).__name__ == "Params4bit":
        count *= 2 * param.element_size()
    return count


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied tensors once: the one count every report prints."""
    params = list(_unique(model.parameters()))
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def trainable_parameters_line(trainable: int, total: int) -> str:
    """PEFT's ``print_trainable_parameters`` line."""
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


def tensor_bytes(model: torch.nn.Module, optimizer=None) -> MemoryBreakdown:
    """Exact parameter, gradient and optimizer-state bytes of ``model`` / ``optimizer``.

    Parameters are counted at their own dtype and tied/shared tensors once.  Optimizer state is
    every tensor in ``optimizer.state`` (AdamW: ``exp_avg``, ``exp_avg_sq`` and the 4-byte
    ``step``).
    """
    params = list(_unique(model.parameters()))
    trainable = [p for p in params if p.requires_grad]
    trainable_count, total_count = parameter_counts(model)
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
        trainable_params=trainable_count,
        total_params=total_count,
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
    is only an upper bound (see :class:`PeakMemoryMeter`).  ``device_used`` is what the GPU
    itself reports in use now minus at start (NVML): the process's whole footprint, CUDA context,
    library workspaces and everything the caching allocator holds (None on CPU or without NVML).
    """

    device: str
    peak: int
    reserved: int | None
    exact: bool
    device_used: int | None = None

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
    state left by another setting cannot leak into its figure.  With ``pin_malloc`` ``start``
    also pins glibc's mmap threshold (see :func:`_pin_glibc_mmap_threshold`) so that RSS follows
    live tensors as ``max_memory_allocated`` does on CUDA rather than what the allocator kept;
    that costs ~25 % of a training step's time on CPU, so training asks for it only with
    ``exact_peak_memory`` (the lab's grid and benchmarks do) and otherwise reports the plain
    high-water mark.
    Without /proc (not Linux) it falls back to ``ru_maxrss`` minus the RSS at start, exact only
    when the peak rose above the mark the process already had.
    """

    def __init__(self, device: str | torch.device | None = None, *, pin_malloc: bool = True):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.pin_malloc = pin_malloc
        self.pinned = False  # CPU: glibc's mmap threshold was pinned at start
        self.mark_reset = False  # CPU: the kernel's high-water mark was reset at start
        self._start: tuple[int, int] | None = None
        self._device_start: int | None = None

    def start(self) -> PeakMemoryMeter:
        if self.device.type == "cuda":
            self._device_start = _device_used(self.device)  # before this process's CUDA context
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = (
                torch.cuda.memory_allocated(self.device),
                torch.cuda.memory_reserved(self.device),
            )
        else:
            if self.pin_malloc:
                self.pinned = _pin_glibc_mmap_threshold()
            resident = _reset_rss_high_water_mark() and _resident_bytes()
            self.mark_reset = bool(resident)
            if resident:
                rss, libraries = resident  # the mark was just reset to the current RSS
                self._start = (rss - libraries, 0)
            else:
                self._start = (psutil.Process().memory_info().rss, _ru_maxrss_bytes())
        return self

    def make_resident(self, tensors) -> None:
        """In the exact CPU mode, fault in every page of ``tensors`` (the model's parameters).

        A CPU model loaded from a same-dtype safetensors file keeps its weights memory-mapped,
        and pages the run never reads (embedding rows no batch looks up, in a frozen base) never
        become resident: a 32k-vocabulary LoRA run read ~30 MiB low, below its own tensors.  A
        GPU allocator holds every weight, so the exact mode reads one element per page.
        """
        if self.device.type != "cpu" or not self.pin_malloc:
            return
        with torch.no_grad():
            for t in _unique(tensors):
                if t.numel():
                    t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()

    @property
    def kind(self) -> str:
        """What the peak figure is, for ``metrics.json`` (``peak_kind``)."""
        if self.device.type == "cuda":
            return "cuda max_memory_allocated"
        if self.pinned:
            return "cpu peak RSS above process baseline, exact: glibc mmap threshold pinned"
        return (
            "cpu peak RSS above process baseline (allocator-dependent: memory glibc keeps "
            "after frees counts; exact_peak_memory true pins it)"
        )

    def read(self) -> PeakMemory:
        if self._start is None:
            raise RuntimeError("PeakMemoryMeter.read() before start()")
        base, base2 = self._start
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            used = _device_used(self.device)
            return PeakMemory(
                device=str(self.device),
                peak=torch.cuda.max_memory_allocated(self.device) - base,
                reserved=torch.cuda.max_memory_reserved(self.device) - base2,
                exact=True,
                device_used=None
                if None in (used, self._device_start)
                else used - self._device_start,
            )
        resident = _resident_bytes() if self.mark_reset else None
        if resident:
            hwm, libraries = resident
            peak = hwm - libraries - base
            return PeakMemory(device="cpu", peak=max(peak, 0), reserved=None, exact=True)
        hwm = _ru_maxrss_bytes()
        return PeakMemory(device="cpu", peak=max(hwm - base, 0), reserved=None, exact=hwm > base2)


def _device_used(device: torch.device) -> int | None:
    """Bytes in use on the GPU as NVML reports them (every process's; without creating a CUDA
    context), or None where NVML (the nvidia-ml-py package) is not available."""
    index = device.index if device.index is not None else 0
    try:
        return int(torch.cuda.device_memory_used(index))
    except Exception:  # no pynvml, an NVML error (its own class), a torch without the call
        return None


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # Linux reports KiB


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
