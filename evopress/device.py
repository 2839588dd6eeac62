"""Which dtype and device the forward passes run on, decided once and recorded with every result.

`compute.dtype: auto` is bfloat16 where it is native (a GPU, or a CPU with AVX512-BF16 / AMX) and float32
elsewhere, so the same params.yaml can run in different precisions on different machines: every stage output
and MLflow run records the resolved dtype, the device and the CPU it ran on.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

from evopress.models import DTYPES, has_fast_bfloat16


def resolve_dtype(name: str) -> str:
    """'auto' -> 'bfloat16' or 'float32' on this machine; other names as they are (checked)."""
    from evopress.errors import require

    if name == "auto":
        return "bfloat16" if has_fast_bfloat16() else "float32"
    require(name in DTYPES, f"unknown dtype {name!r}; allowed: auto, {', '.join(DTYPES)}")
    return name


@cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(dtype: str) -> dict[str, str]:
    """The facts a result depends on besides its inputs: dtype, device, CPU, torch version and threads."""
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {
        "dtype": resolve_dtype(dtype),
        "device": device,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
    }
