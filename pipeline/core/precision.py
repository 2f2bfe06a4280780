"""Which arithmetic inference runs in (``predict.precision``), from the hardware found.

``auto`` picks bfloat16 on a CPU that computes it natively (AMX-BF16 tiles or
AVX-512-BF16; measured 1.9x faster than float32 on a 2-core Xeon with AMX for U-Net /
EfficientNet-B2, and predict 1.51x faster end to end on a 2-core AMD EPYC with
AVX-512-BF16 and no AMX), float16 on a GPU with tensor cores (compute capability 7.0 or more),
and float32 everywhere else, since emulated 16-bit arithmetic is slower, not faster.
Weights stay float32 (a Keras mixed policy) and probabilities leave the model as
float32. CPU features are read from ``/proc/cpuinfo``, never assumed. TensorFlow-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

Precision = Literal["auto", "float32", "bfloat16", "float16"]
# Which runtime runs the networks (``predict.engine``, the bundle runner's --engine): auto
# takes the one measured fastest at the precision (``run.runtime_engines.choose_engine``).
Engine = Literal["auto", "openvino", "onnxruntime", "tensorflow"]
ENGINE_CHOICES: tuple[str, ...] = get_args(Engine)
PRECISIONS: tuple[str, ...] = get_args(Precision)
# Keras mixed-precision policy per precision.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# /proc/cpuinfo flags of native bfloat16 arithmetic.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
TENSOR_CORE_CAPABILITY = (7, 0)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty when the file is missing or unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def choose_precision(
    requested: str, flags: Iterable[str], gpu_capabilities: Iterable[tuple[int, int]] = ()
) -> str:
    """``requested`` unless it is ``auto``; then the fastest exact-enough precision."""
    if requested not in PRECISIONS:
        raise ValueError(f"predict.precision must be one of {list(PRECISIONS)}; got {requested!r}")
    if requested != "auto":
        return requested
    capabilities = list(gpu_capabilities)
    if capabilities:
        return "float16" if min(capabilities) >= TENSOR_CORE_CAPABILITY else "float32"
    return "bfloat16" if BF16_CPU_FLAGS & set(flags) else "float32"
