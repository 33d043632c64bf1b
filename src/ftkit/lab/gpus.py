"""The GPUs ftkit plans for: memory, dense 16-bit rate, memory bandwidth and the link between two.

Rates are the vendors' datasheet figures for *dense* tensor-core math (the 2:4-sparse figures are
twice these and no training step gets them); memory is what ``nvidia-smi`` reports as "Total";
the link is the one-way bandwidth between two GPUs of one machine (NVLink on SXM boards, PCIe
otherwise). Every figure is a peak: the step-time model (``ftkit.lab.plan``) says how much of it a
training step gets.

    T4         65 TFLOPS fp16, 320 GB/s, PCIe 3.0 x16; no bf16 (Turing)     NVIDIA T4 datasheet
    L4        121 TFLOPS fp16/bf16 (242 sparse), 300 GB/s, PCIe 4.0 x16     NVIDIA L4 datasheet
    A10G       70 TFLOPS fp16/bf16, 600 GB/s, PCIe 4.0 x16   (AWS publishes no sheet; Baseten's
               "NVIDIA A10 vs A10G" comparison, baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-
               inference; the A10 itself is 125)
    A100      312 TFLOPS fp16/bf16, 1,555 GB/s (40 GB) or 2,039 GB/s (80 GB), SXM: NVLink 3,
               600 GB/s both ways                                           NVIDIA A100 datasheet
    H100      989 TFLOPS fp16/bf16 (SXM), 3.35 TB/s, NVLink 4, 900 GB/s both ways   H100 datasheet
    H200      989 TFLOPS fp16/bf16 (SXM), 4.8 TB/s, 141 GB, NVLink 4               H200 datasheet
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ftkit.errors import ConfigError
from ftkit.meter import MIB


@dataclass(frozen=True)
class GPU:
    """One accelerator as far as planning goes (a ``--gpu_spec`` may describe a CPU for tests)."""

    name: str
    memory: int  # bytes nvidia-smi reports as "Total"; the CUDA context is taken from it
    tflops: float  # dense fp16/bf16 tensor-core TFLOPS (a CPU spec: its fp32 GEMM rate)
    bandwidth: float  # GB/s of device memory
    link: float  # GB/s one way to another GPU of the same machine
    bf16: bool  # runs bf16 natively (Ampere and newer)


PCIE3, PCIE4, NVLINK3, NVLINK4 = 16.0, 32.0, 300.0, 450.0  # GB/s one way (x16 lanes)

GPUS: dict[str, GPU] = {
    "T4": GPU("T4 16GB", 15360 * MIB, 65.0, 320.0, PCIE3, bf16=False),
    "L4": GPU("L4 24GB", 23034 * MIB, 121.0, 300.0, PCIE4, bf16=True),
    "A10G": GPU("A10G 24GB", 23028 * MIB, 70.0, 600.0, PCIE4, bf16=True),
    "A100-40GB": GPU("A100 40GB", 40960 * MIB, 312.0, 1555.0, NVLINK3, bf16=True),
    "A100-80GB": GPU("A100 80GB", 81920 * MIB, 312.0, 2039.0, NVLINK3, bf16=True),
    "H100": GPU("H100 80GB", 81559 * MIB, 989.0, 3350.0, NVLINK4, bf16=True),
    "H200": GPU("H200 141GB", 143771 * MIB, 989.0, 4800.0, NVLINK4, bf16=True),
}
ALIASES = {
    "H100-80GB": "H100",
    "H200-141GB": "H200",
}  # `ftkit estimate --gpu H100-80GB` still works


def find_gpu(name: str | GPU, extra: dict[str, GPU] | None = None) -> GPU:
    """A GPU by its key (``T4``, ``A100-40GB``), alias or full name, case-insensitive; ``extra``
    holds the ``--gpu_spec`` ones."""
    if isinstance(name, GPU):
        return name
    table = {**GPUS, **(extra or {})}
    wanted = ALIASES.get(name.upper(), name).lower()
    for key, gpu in table.items():
        if wanted in (key.lower(), gpu.name.lower()):
            return gpu
    raise ConfigError(
        f"unknown GPU {name!r}; known: {', '.join(table)} (describe another with --gpu_spec "
        "NAME:MiB:TFLOPS:GBps)"
    )


def parse_gpu_spec(text: str) -> tuple[str, GPU]:
    """``NAME:MiB:TFLOPS:GBps[:bf16]`` → (NAME, GPU): memory in MiB as nvidia-smi prints it,
    dense 16-bit TFLOPS, memory GB/s, and ``bf16`` when it runs bf16. Its link to a second one is
    PCIe 3.0 x16 (``ftkit plan --link_GBps`` says otherwise)."""
    parts = text.split(":")
    usage = (
        f"--gpu_spec {text!r}: expected NAME:MiB:TFLOPS:GBps[:bf16], e.g. myGPU:24576:120:900:bf16"
    )
    if len(parts) not in (4, 5) or not parts[0] or (len(parts) == 5 and parts[4] != "bf16"):
        raise ConfigError(usage)
    try:
        mib, tflops, bandwidth = int(parts[1]), float(parts[2]), float(parts[3])
    except ValueError as err:
        raise ConfigError(usage) from err
    if min(mib, tflops, bandwidth) <= 0:
        raise ConfigError(f"{usage}; every figure must be > 0")
    return parts[0], GPU(parts[0], mib * MIB, tflops, bandwidth, PCIE3, bf16=len(parts) == 5)


def parse_gpus(text: str, extra: dict[str, GPU] | None = None) -> tuple[int, GPU]:
    """``2xT4`` (or ``T4``, ``1xA100-40GB``) → (count, GPU)."""
    match = re.fullmatch(r"\s*(?:(\d+)\s*[x×*]\s*)?(\S+)\s*", text)
    if not match:
        raise ConfigError(f"--gpus {text!r}: expected COUNTxNAME, e.g. 2xT4 or 1xA100-40GB")
    count = int(match.group(1) or 1)
    if not 1 <= count <= 16:
        raise ConfigError(f"--gpus {text!r}: the count must be 1 to 16 GPUs of one machine")
    return count, find_gpu(match.group(2), extra)
