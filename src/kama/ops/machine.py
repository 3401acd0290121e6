"""The machine the kernels run on: CPU model, vendor, cache sizes and SIMD level, as every benchmark records them
and as the CPU kernel's tuning is keyed.

Read from ``/proc/cpuinfo`` and ``/sys/devices/system/cpu`` on Linux (``platform`` elsewhere); fields that cannot
be read are ``None``.

Example:
    >>> m = describe()
    >>> isinstance(m.model, str) and m.simd in ("avx512", "avx2", "avx", "sse", "neon", "unknown")
    True
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Machine", "describe"]


@dataclass(frozen=True)
class Machine:
    """What the CPU kernel's speed depends on.

    Attributes:
        model: CPU model name (``/proc/cpuinfo``'s ``model name``).
        vendor: ``GenuineIntel``, ``AuthenticAMD``, ...
        family, model_id: the CPU family and model numbers (x86), as strings.
        cores: logical CPUs the process may use.
        l1d, l2, l3: per-core L1 data and L2 sizes and the L3 size in bytes (``None`` when unknown).
        simd: the widest vector extension (``avx512`` meaning AVX-512 F, BW, DQ and VL; ``avx2`` with FMA).
        flags: the vector-related CPU flags present (``avx512f``, ``avx512bw``, ``avx2``, ``fma``, ...).
    """

    model: str
    vendor: str
    family: str | None
    model_id: str | None
    cores: int
    l1d: int | None
    l2: int | None
    l3: int | None
    simd: str
    flags: tuple[str, ...]

    def key(self) -> str:
        """A short identity of the core for caches of measured settings (model, caches, SIMD level)."""
        return f"{self.vendor}|{self.model}|{self.family}|{self.model_id}|{self.l1d}|{self.l2}|{self.simd}"

    def summary(self) -> str:
        """One line for benchmark tables: model, caches per core, SIMD level."""
        def size(b: int | None) -> str:
            if b is None:
                return "?"
            return f"{b // 2**20} MiB" if b >= 2**20 and b % 2**20 == 0 else f"{b // 1024} KiB"

        ident = f", family {self.family} model {self.model_id}" if self.family is not None else ""
        return (f"{self.model} ({self.vendor}{ident}; {self.cores} CPUs; L1d {size(self.l1d)}, L2 {size(self.l2)} "
                f"per core, L3 {size(self.l3)}; {self.simd})")

    def slug(self) -> str:
        """A name for this kind of machine in file and section names (letters, digits and dashes)."""
        text = f"{self.vendor}-{self.model}-{self.family}-{self.model_id}"
        return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flags": list(self.flags)}


_VECTOR_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "avx512vnni", "avx512ifma", "avx2",
                 "fma", "avx", "sse4_2", "asimd", "neon")


def _cache_size(text: str) -> int | None:
    text = text.strip().upper()
    try:
        if text.endswith("K"):
            return int(text[:-1]) * 1024
        if text.endswith("M"):
            return int(text[:-1]) * 2**20
        return int(text)
    except ValueError:
        return None


def _sysfs_caches() -> dict[str, int | None]:
    out: dict[str, int | None] = {"l1d": None, "l2": None, "l3": None}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    if not base.exists():
        return out
    for idx in sorted(base.glob("index*")):
        try:
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            size = _cache_size((idx / "size").read_text())
        except OSError:
            continue
        if level == "1" and kind in ("Data", "Unified"):
            out["l1d"] = size
        elif level == "2":
            out["l2"] = size
        elif level == "3":
            out["l3"] = size
    return out


@functools.lru_cache(maxsize=1)
def describe() -> Machine:
    """The :class:`Machine` this process runs on (read once)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU's block
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set((info.get("flags") or info.get("Features") or "").split())
    present = tuple(f for f in _VECTOR_FLAGS if f in flags)
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        simd = "avx512"
    elif {"avx2", "fma"} <= flags:
        simd = "avx2"
    elif "avx" in flags:
        simd = "avx"
    elif "sse4_2" in flags:
        simd = "sse"
    elif "asimd" in flags or "neon" in flags:
        simd = "neon"
    else:
        simd = "unknown"
    caches = _sysfs_caches()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Machine(model=info.get("model name") or platform.processor() or platform.machine() or "unknown",
                   vendor=info.get("vendor_id", "unknown"), family=info.get("cpu family"), model_id=info.get("model"),
                   cores=cores, l1d=caches["l1d"], l2=caches["l2"], l3=caches["l3"], simd=simd, flags=present)
