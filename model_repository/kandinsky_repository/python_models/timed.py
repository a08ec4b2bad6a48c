"""A network replaced by its modelled GPU time: every network model of the `timed` flavour.

The timed flavour is a GPU flavour's configuration (batchers, preferred sizes, delays, instance groups,
queue policies, ensembles) served on a CPU: each network is this python model, which sleeps for the
modelled GPU time of the batch Triton hands it (`gpu_costs.py`) and answers outputs of the registry's
shapes and dtypes (zeros). Sleeping costs no CPU, so what is measured around it is the serving overhead.

One GPU runs one model's kernels at a time (to first order), so every timed model of a repository holds
one exclusive lock file (`fcntl.flock`) while it sleeps: the prior and UNet calls of different generations
queue for the modelled GPU instead of overlapping, which would overstate throughput. Time spent waiting for
the lock is queueing on the GPU.

Config parameters (strings) the generator writes:
  component        the registry name of the network (default: the model's name)
  modelled_cost    JSON from `gpu_costs.cost_record(component, gpu)`: the whole cost model of this network
                   on one GPU; {"gpu": "none"} (or absent) sleeps 0 s (the stub-hop measurement)
  kandinsky_dims   JSON of the bundle's `ModelDims` (as the `unet` config carries it): resolves the
                   output shapes; its `movq_scale_factor` turns latent sides into image pixels
  gpu_lock         path of the lock file every timed model of the repository shares (relative paths are
                   relative to the repository root); absent: no shared GPU (each model sleeps on its own)
  spatial_limits   optional JSON {input: [multiple, max]} on the last two axes, as the other flavours check

The modelled time is that of the cost record's architecture at the request's rows and size, whatever
bundle supplies the output shapes (the tiny preset can stand in for the released model).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from kandinsky_core.components import BATCH, COMPONENTS, ModelDims, call_symbols
from kandinsky_core.gpu_costs import NO_GPU, seconds_from_record

from .base import BatchingModel, InvalidInput

logger = logging.getLogger("kandinsky_repository")

COMPONENT_PARAMETER = "component"
COST_PARAMETER = "modelled_cost"
DIMS_PARAMETER = "kandinsky_dims"
LOCK_PARAMETER = "gpu_lock"
SPATIAL_LIMITS_PARAMETER = "spatial_limits"
# How many recent (start, end) intervals of modelled GPU work a model keeps, for tests and debugging.
KEPT_INTERVALS = 1000


class GpuLock:
    """An exclusive lock on a file shared by processes (and by threads: each instance opens its own)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)

    def __enter__(self) -> GpuLock:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class TimedNetwork(BatchingModel):
    """Sleeps the modelled GPU time of each batch while holding the repository's GPU lock; returns zeros."""

    def setup(self, parameters: Mapping[str, str]) -> None:
        component = parameters.get(COMPONENT_PARAMETER) or self.name
        if component not in COMPONENTS:
            raise ValueError(f"{self.name}: component '{component}' is not a registry network")
        self.spec = COMPONENTS[component]
        self.cost = json.loads(parameters.get(COST_PARAMETER) or "{}") or {"gpu": NO_GPU}
        if DIMS_PARAMETER not in parameters:
            raise ValueError(f"{self.name}: parameter '{DIMS_PARAMETER}' is required (the output shapes)")
        self.dims = ModelDims.from_dict(json.loads(parameters[DIMS_PARAMETER]))
        self.spatial_limits = json.loads(parameters.get(SPATIAL_LIMITS_PARAMETER) or "{}")
        lock = parameters.get(LOCK_PARAMETER)
        repository = self.version_dir.parent.parent
        self.lock = GpuLock(repository / lock if lock else None)
        self.intervals: deque[tuple[float, float]] = deque(maxlen=KEPT_INTERVALS)
        logger.info(
            "%s: timed %s on %s (%s), GPU lock %s",
            self.name,
            component,
            self.cost.get("gpu"),
            self.cost.get("architecture", "no cost"),
            self.lock.path or "none",
        )

    def validate_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name, (multiple, largest) in self.spatial_limits.items():
            for axis, size in zip(("height", "width"), shapes[name][-2:], strict=True):
                if size % multiple or not multiple <= size <= largest:
                    raise InvalidInput(
                        f"input '{name}' {axis} is {size}; it must be a multiple of {multiple} "
                        f"in [{multiple}, {largest}]"
                    )

    def symbols(self, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Every shape symbol: the bundle's dims, then the batch and sizes read off the inputs' shapes."""
        return call_symbols(self.spec, self.dims, {name: value.shape for name, value in inputs.items()})

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        symbols = self.symbols(inputs)
        rows = symbols[BATCH]
        height, width = symbols.get("height", 0), symbols.get("width", 0)
        seconds = seconds_from_record(self.cost, rows, height, width)
        if seconds > 0:
            self.occupy_gpu(seconds)
        logger.debug("%s: %d rows at %dx%d: modelled %.3f ms", self.name, rows, height, width, 1e3 * seconds)
        return {
            t.name: np.zeros(t.resolve(symbols, keep_dynamic=False), dtype=self.output_dtypes[t.name])
            for t in self.spec.outputs
        }

    def occupy_gpu(self, seconds: float) -> None:
        """Hold the modelled GPU for `seconds`; the wait for it first is queueing on the GPU."""
        asked = time.perf_counter()
        with self.lock:
            start = time.perf_counter()
            time.sleep(seconds)
            end = time.perf_counter()
        self.intervals.append((start, end))
        logger.debug("%s: waited %.3f ms for the GPU", self.name, 1e3 * (start - asked))

    def finalize(self) -> None:
        self.lock.close()


__all__ = [
    "COMPONENT_PARAMETER",
    "COST_PARAMETER",
    "DIMS_PARAMETER",
    "LOCK_PARAMETER",
    "SPATIAL_LIMITS_PARAMETER",
    "GpuLock",
    "TimedNetwork",
]
