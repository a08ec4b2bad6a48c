"""One way to run an exported network on ONNX Runtime's CPU provider: what the CPU flavour serves
(`python_models/onnx_runner.py`) and what `kandinsky-export` measures the memory of
(export/kandinsky_export/memory.py), so the recorded estimate is the served session's.

Why not `session.run`: ONNX Runtime's CPU arena keeps its high-water mark for the life of the session, and
the outputs `run` returns live in that arena, so even a shrink after the call keeps the region holding them
(measured on the tiny MoVQ decoder: 64-474 MB left after each shrinking call). Here the outputs are bound
to numpy buffers (IO binding; their shapes come from the registry), so after a call the arena holds only
freed intermediates, and a call with `shrink=True` runs with `memory.enable_memory_arena_shrinkage`,
which releases them, then trims glibc's heap. Calls without it keep the arena for the next one (faster:
the next step of the same size reuses the memory instead of faulting it in again).

onnxruntime is imported when a session is made, so the core stays importable without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .components import ComponentSpec, ModelDims, call_symbols

logger = logging.getLogger(__name__)

ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"  # ONNX Runtime run option
CPU_ARENA = "cpu:0"


def release_free_heap() -> None:
    """Give glibc's free heap memory back to the system (malloc_trim); nothing elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CpuSession:
    """A component's ONNX file on the CPU provider, run with its outputs in numpy buffers."""

    def __init__(self, path: Path, spec: ComponentSpec, dims: ModelDims, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.spec = spec
        self.dims = dims
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._keep = ort.RunOptions()
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry(ARENA_SHRINKAGE, CPU_ARENA)

    def run(self, inputs: Mapping[str, np.ndarray], *, shrink: bool = False) -> dict[str, np.ndarray]:
        """Every output of one call; with `shrink`, the memory it took is given back afterwards."""
        arrays = {t.name: np.ascontiguousarray(inputs[t.name]) for t in self.spec.inputs}
        symbols = call_symbols(self.spec, self.dims, {k: v.shape for k, v in arrays.items()})
        binding: Any = self.session.io_binding()
        for name, value in arrays.items():
            binding.bind_cpu_input(name, value)
        outputs = {}
        for tensor in self.spec.outputs:
            array = np.empty(tensor.resolve(symbols, keep_dynamic=False), dtype=tensor.dtype)
            binding.bind_output(tensor.name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            outputs[tensor.name] = array
        self.session.run_with_iobinding(binding, self._shrink if shrink else self._keep)
        del binding
        if shrink:
            release_free_heap()
        return outputs
