"""What a benchmark's figures depend on, recorded in every benchmark JSON (``machine``).

The hardware changes between runs of the same kind of machine (CPU model, caches), and a
speed-up measured on one may vanish on the next: every figure carries where it came from.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["describe", "simd"]


def simd() -> str | None:
    """Instruction set the native kernels dispatched to (None without the native backend)."""
    try:
        from pccl import _native
    except ImportError:
        return None
    return getattr(_native, "SIMD", None)


def describe() -> dict[str, Any]:
    """CPU model, cache sizes (cpu0), cores, kernel, Python, kernel backend and SIMD level, and
    the load average when the figures were taken (other work skews them)."""
    import pccl

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    caches: dict[str, str] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.exists() else ():
        with contextlib.suppress(OSError):
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            tag = f"L{level}" + ("d" if kind == "Data" else "i" if kind == "Instruction" else "")
            caches[tag] = (idx / "size").read_text().strip()
    return {
        "cpu_model": model or platform.processor(),
        "caches": caches,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "backend": pccl.BACKEND,
        "simd": simd() if pccl.BACKEND == "native" else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
