"""The machine a run is on: the instruction sets behind PyTorch's kernels, read once a process.

The machines slmops runs on differ by an order of magnitude in bf16: Intel CPUs with AMX tiles, AMD Zen 4
with AVX-512-BF16, and AVX2-only CPUs where bf16 is emulated (~100x slower than fp32). The precision a
run trains in follows from these flags, and the manifest records them with the choice.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

# the flags (as /proc/cpuinfo spells them) that decide which matmul kernels oneDNN and MKL can use
MATMUL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@lru_cache(maxsize=1)
def cpu_features() -> dict[str, Any]:
    """The CPU's model name, its matmul instruction sets, and the kernel level PyTorch's own operators
    picked (`torch.backends.cpu.get_cpu_capability()`); the first two are empty off Linux."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "instructions": [f for f in MATMUL_FLAGS if f in flags],
            "aten_kernels": torch.backends.cpu.get_cpu_capability()}


def native_bf16() -> bool:
    """Native bf16 matmuls (AVX-512-BF16 or AMX); without them bf16 on a CPU is emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_features()["instructions"]))


def bf16_kernels() -> str:
    """Which of oneDNN's bf16 kernels this CPU runs, in words for the manifest."""
    instructions = cpu_features()["instructions"]
    if "amx_bf16" in instructions:
        return "oneDNN's AMX bf16 kernels"
    if "avx512_bf16" in instructions:
        return "oneDNN's AVX-512-BF16 kernels"
    return "no native bf16 (emulated)"
