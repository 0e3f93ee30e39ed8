"""What a benchmark ran on: the CPU model, the ISA features that change which kernels run, the
cores this process may use. Every table prints it (machines differ between sessions)."""
from __future__ import annotations

import os
import platform

FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def describe() -> dict:
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu": name, "isa": [f for f in FEATURES if f in flags], "cores": len(os.sched_getaffinity(0))}


def line() -> str:
    d = describe()
    return f"{d['cpu']} ({', '.join(d['isa']) or 'no AVX2'}), {d['cores']} cores"
