"""Which integer arithmetic ONNX Runtime's int8 kernels use on this CPU, and what it means for weights.

On x86-64, ONNX Runtime's u8×s8 GEMM and convolution kernels (MLAS) multiply uint8 activations by
int8 weights with ``VPMADDUBSW`` unless the CPU has a VNNI dot-product instruction
(``VPDPBUSD``: AVX512-VNNI, AVX-VNNI, or AMX). ``VPMADDUBSW`` adds each *pair* of adjacent products
in saturating 16-bit arithmetic: with activation codes up to 255 and weight codes up to ±127 a pair
reaches 255·127·2 = 64770, beyond 32767, so the kernel silently clips partial sums and computes
something other than the quantized model. ONNX Runtime's own documentation advises quantizing
weights to 7 bits ("reduce_range") on such CPUs: with weight codes in ±63 a pair is at most
255·63·2 = 32130, which always fits, and the kernel is exact again.

Measured here (AMD EPYC, AVX2 without VNNI): a small CIFAR-10 ResNet with 8-bit weights agreed
with its own fake-quantized PyTorch model on 77.9% of top-1 predictions (max |diff| 2.29); the
same model with 7-bit weight codes agreed on 100.0% (max |diff| 0.0).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal

from fxsculpt.hardware.targets import Target

#: CPU flags (as /proc/cpuinfo spells them) of an int8 dot product that accumulates in 32 bits.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"})
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first processor's flags from ``cpuinfo``; ``None`` where the file cannot be read."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def u8s8_saturates(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's u8×s8 kernels add product pairs in saturating 16 bits on this CPU.

    True on x86 without a VNNI flag, and on x86 whose flags cannot be read (the safe side: 7-bit
    weight codes cost a little accuracy, saturation costs correctness). Other architectures
    (ARM's NEON kernels widen before adding) do not saturate.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in X86_MACHINES:
        return False
    flags = cpu_flags() if flags is None else flags
    return flags is None or not (flags & VNNI_FLAGS)


def resolve_reduce_range(setting: Literal["auto", "on", "off"], target: Target) -> bool:
    """The ``quantize.reduce_range`` setting as a decision: ``auto`` asks the target."""
    if setting == "auto":
        return target.int8_dot_saturates()
    return setting == "on"
