"""Measure each exported component's peak memory on the session the CPU flavour serves, and fit it.

Why at export: the estimate must come from the checkpoint's own graphs (no released-model numbers), and
running a network at several sizes takes seconds to minutes, too long for every repository generation
(the repository is regenerated on every start). `export_bundle` records one entry per component in the
manifest (`memory`: the fit, the measured points, the ONNX Runtime version); `python -m
kandinsky_export.memory --bundle B` adds them to a bundle exported before this step existed.

How: a child process per component (only numpy, onnxruntime and the core imported: the exporter's torch
and its allocations stay out of the numbers) loads the FP32 ONNX file into `onnx_cpu.CpuSession`, runs
once to warm up, then for each point of `memory.measurement_points`: trims the heap, resets the process'
peak RSS (`/proc/self/clear_refs` 5: VmHWM := VmRSS), runs the call with the arena shrinkage the served
model uses for large calls, and records VmHWM minus the RSS before the call. The inputs exist before the
baseline; the outputs (bound numpy buffers) are allocated inside it, as in the served model.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from kandinsky_core import bundle as layout
from kandinsky_core.components import COMPONENTS, ComponentSpec, ModelDims
from kandinsky_core.memory import fit_measurements, measurement_points
from kandinsky_core.onnx_cpu import CpuSession, release_free_heap
from kandinsky_core.profiles import has_spatial_axes, input_shapes

logger = logging.getLogger(__name__)

MEASURE_TIMEOUT_S = 3600  # one component's measurement (the released UNet at three sizes on a CPU)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as error:
        raise RuntimeError(
            f"measuring memory needs Linux's /proc/self/clear_refs (peak RSS reset): {error}"
        ) from None


def sample_inputs(
    spec: ComponentSpec, dims: ModelDims, rows: int, height: int, width: int
) -> dict[str, np.ndarray]:
    """Inputs of one call at this size (values do not change the memory: zeros, ones for masks)."""
    shapes = input_shapes(spec, dims, rows, height, width)
    return {
        t.name: (np.ones if t.dtype == "bool" else np.zeros)(shapes[t.name], dtype=t.dtype)
        for t in spec.inputs
    }


def measure_in_process(
    path: Path, spec: ComponentSpec, dims: ModelDims, points: Sequence[tuple[int, int, int]], threads: int = 0
) -> list[list[int]]:
    """[rows, height, width, peak bytes] per point, measured in this process (run it in a clean one)."""
    session = CpuSession(path, spec, dims, threads)
    unit = dims.size_multiple if has_spatial_axes(spec) else 0
    session.run(sample_inputs(spec, dims, 1, unit, unit), shrink=True)  # first-call set-up, not the model's
    measured = []
    for rows, height, width in points:
        inputs = sample_inputs(spec, dims, rows, height, width)
        release_free_heap()
        _reset_peak()
        before = _status_bytes("VmRSS")
        outputs = session.run(inputs, shrink=True)
        peak = _status_bytes("VmHWM")
        del outputs
        measured.append([rows, height, width, max(peak - before, 0)])
    return measured


def measure_component(bundle: Path, name: str, dims: ModelDims, threads: int = 0) -> dict[str, Any]:
    """The manifest's `memory` entry of one component, measured in a child process."""
    spec = COMPONENTS[name]
    points = measurement_points(spec, dims)
    request = {
        "path": str(Path(bundle) / name / layout.ONNX_FILE),
        "component": name,
        "dims": dims.as_symbols(),
        "points": points,
        "threads": threads,
    }
    done = subprocess.run(
        [sys.executable, "-m", "kandinsky_export.memory", "--child", json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=MEASURE_TIMEOUT_S,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring the memory of {name} failed:\n{done.stderr[-4000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    fit = fit_measurements(measured, has_spatial_axes(spec))

    logger.info(
        "%s memory: %s (fit covers the points x%.2f)",
        name,
        ", ".join(f"{r} rows {h}x{w}: {b / 2**20:.0f} MiB" for r, h, w, b in measured),
        fit.coverage,
    )
    return {"fit": fit.as_dict(), "points": measured, "onnxruntime": _onnxruntime_version()}


def _onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def measure_bundle(bundle: Path, components: Sequence[str], dims: ModelDims) -> dict[str, dict[str, Any]]:
    """The `memory` entry of each of `components` (exported FP32 files in `bundle`)."""
    return {name: measure_component(bundle, name, dims) for name in components}


def record_in_manifest(bundle: Path) -> None:
    """Measure every component of an exported bundle and add the entries to its manifest."""
    manifest = layout.read_manifest(bundle)
    dims = ModelDims.from_dict(manifest["dims"])
    for name, entry in measure_bundle(bundle, list(manifest["components"]), dims).items():
        layout.update_component(bundle, name, memory=entry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="measure the bundle's components' peak memory (CPU)")
    parser.add_argument("--bundle", type=Path, help="export bundle: add the memory entries to its manifest")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one component, in a clean process
    args = parser.parse_args(argv)
    if args.child:
        request = json.loads(args.child)
        measured = measure_in_process(
            Path(request["path"]),
            COMPONENTS[request["component"]],
            ModelDims.from_dict(request["dims"]),
            [tuple(p) for p in request["points"]],
            int(request["threads"]),
        )
        print(json.dumps(measured))
        return 0
    if args.bundle is None:
        parser.error("--bundle is required")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    record_in_manifest(args.bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
