"""Which dtype and device the forward passes run on, decided once and recorded with every result.

`compute.dtype: auto` is bfloat16 where it is native (a GPU, or a CPU with AVX512-BF16 / AMX) and float32
elsewhere; `compute.device: auto` is the first CUDA device where torch sees one, else the CPU, so the same params.yaml can run in different precisions on different machines: every stage output
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


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' where a GPU is visible, else 'cpu'; 'cuda...' on a machine without one is an error."""
    from evopress.config import check_device
    from evopress.errors import require

    check_device(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        require(torch.cuda.is_available(), f"compute.device {name!r}, but torch sees no CUDA device here")
        index = int(name[5:]) if ":" in name else 0
        count = torch.cuda.device_count()
        require(index < count, f"compute.device {name!r}, but this machine has {count} CUDA device(s)")
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


def describe(dtype: str, device: str = "cpu") -> dict[str, str]:
    """The facts a result depends on besides its inputs: dtype, device, CPU, torch version and threads."""
    device = resolve_device(device)
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "dtype": resolve_dtype(dtype),
        "device": device,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
    }
