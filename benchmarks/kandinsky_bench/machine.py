"""What ran the benchmark: CPU, cores, memory, GPU, load, and the versions of every moving part.

Numbers without their machine are not comparable; the load average says whether others shared it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = (
    "torch",
    "onnxruntime",
    "onnxruntime-gpu",
    "diffusers",
    "transformers",
    "tritonclient",
    "nvidia-pytriton",
    "numpy",
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else whatever platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_line() -> str:
    """One line for a printed table's header: CPU model, cores and the load of the moment."""
    load = ", ".join(f"{x:.1f}" for x in load_average())
    return f"{cpu_model()}, {os.cpu_count()} cores, load {load}"


def memory_gib() -> float:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def gpus() -> list[str]:
    """GPU names from nvidia-smi; empty where there is none."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def load_average() -> list[float]:
    """1, 5 and 15-minute load: above the core count means other work competed for the CPU."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def machine() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "memory_gib": memory_gib(),
        "gpus": gpus(),
        "load_average_start": load_average(),
    }
