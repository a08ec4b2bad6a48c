"""Whether the GPU holds what a tensorrt repository's engines reserve at load, checked before Triton starts.

On a GPU the memory budget is reserved, not granted per request: every TensorRT execution context takes
its activation memory (every profile at its largest shapes and batch) when Triton loads the engine, so no
request within the served sizes takes more, and the repository record says how much the engines hold in
all (`generator/repository.py: device_memory`). A GPU without that much room fails only later, model by
model, while Triton loads. So kandinsky-serve compares the record with every visible GPU's free memory
first (an instance group without `gpus` puts its instances on each of them) and stops with the figures
and what to change. Without nvidia-smi nothing is checked (said in the log).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..generator.repository import REPOSITORY_RECORD
from ..settings import DEFAULTS

logger = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    index: str
    total_bytes: int
    free_bytes: int


def visible_gpus() -> list[Gpu] | None:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES when it lists them), from nvidia-smi; None when
    it cannot tell."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return None
    command = [nvidia_smi, "--query-gpu=index,memory.total,memory.free", "--format=csv,noheader,nounits"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and all(part.strip().isdigit() for part in visible.split(",")):
        command.append(f"--id={visible}")
    try:
        output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout
        rows = [[field.strip() for field in line.split(",")] for line in output.splitlines() if line.strip()]
        return [Gpu(index, int(total) << 20, int(free) << 20) for index, total, free in rows]
    except (OSError, subprocess.SubprocessError, ValueError):
        logger.warning("nvidia-smi did not say how much GPU memory is free", exc_info=True)
        return None


def device_memory_problem(
    repository: Path, find_gpus: Callable[[], list[Gpu] | None] = visible_gpus
) -> str | None:
    """Why the engines of `repository` cannot load on this machine's GPUs (None: they fit, or nothing to
    check: not a tensorrt repository, or no figure of the GPUs' memory)."""
    try:
        record = json.loads((Path(repository) / REPOSITORY_RECORD).read_text())
    except (OSError, ValueError):
        return None
    device = record.get("device_memory") or {}
    reserved = int(device.get("total_bytes", 0))
    if not reserved:
        return None
    gpus = find_gpus()
    if not gpus:
        logger.warning(
            "the engines reserve %.2f GiB of GPU memory at load; no GPU memory figure here to check it against",
            reserved / GIB,
        )
        return None
    needed = reserved + DEFAULTS.device_memory_margin_bytes
    short = [gpu for gpu in gpus if gpu.free_bytes < needed]
    if not short:
        return None
    largest = max(
        device["models"].items(), key=lambda item: item[1]["instances"] * item[1]["activation_bytes"]
    )
    gpu = min(short, key=lambda g: g.free_bytes)
    return (
        f"the TensorRT engines of {repository} reserve {reserved / GIB:.2f} GiB of GPU memory at load (weights "
        f"and the activation memory of every instance and profile; most of it '{largest[0]}', "
        f"{largest[1]['instances']} instance(s)), plus {DEFAULTS.device_memory_margin_bytes / GIB:.1f} GiB for "
        f"CUDA and Triton, and GPU {gpu.index} has {gpu.free_bytes / GIB:.2f} GiB free of "
        f"{gpu.total_bytes / GIB:.2f} GiB: generate the repository with fewer instances "
        "(kandinsky-repository --instances), build engines for fewer sizes (kandinsky-export engines "
        "--max-size or --static; KANDINSKY_MAX_IMAGE_SIZE, KANDINSKY_STATIC_SIZE), or use a GPU with more memory"
    )
