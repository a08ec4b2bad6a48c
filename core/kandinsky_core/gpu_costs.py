"""The GPU cost model of the `timed` flavour: how long one network call would take on a named GPU.

A CPU cannot run the GPU flavours' kernels, but it can run their configuration (batchers, preferred
sizes, instance groups, queue policies, ensembles) with every network replaced by a python model that
sleeps for the call's modelled GPU time (`python_models/timed.py`). The model is a roofline with a floor:

    seconds = max(flop / (peak_flops * efficiency), weight_bytes / bandwidth) + floor_seconds
    flop    = rows * (c0 + c1 * P + c2 * P**2),  P = height * width of the image, in pixels

Convolutions cost FLOPs linear in P and attention over latent tokens quadratic; the text encoder, image
encoder and prior do not depend on the image size (c1 = c2 = 0). Weights are read once per call, which is
what makes small batches of the prior and text encoder memory-bound. Activation traffic is not modelled
(`gpu_costs.json` says why). Every number lives in `gpu_costs.json` (the one data file, with its sources):
datasheet peaks and bandwidths, efficiencies calibrated from published end-to-end runs, the per-call
floor, and per architecture the FLOP coefficients and weight bytes counted by `kandinsky-bench flops`.
A user may pass an edited copy (`load_costs(path)`).

The modelled time is the released architecture's (or another named architecture's) at the request's rows
and size, whatever bundle gives the outputs their shapes: the `tiny` preset can stand in for the full
model. Pure Python + numpy: it runs inside Triton's python backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from kandinsky_core.components import COMPONENTS

# The packaged data file (package data of kandinsky_repository; see pyproject.toml).
COSTS_FILE = Path(__file__).with_name("gpu_costs.json")
COSTS_FORMAT = 1
DEFAULT_ARCHITECTURE = "released"
# The GPU name of "no GPU cost": every call takes 0 s. Measures the python-stub hop a timed model adds
# where the real flavour has a C++ backend, so that it can be subtracted from a timed result.
NO_GPU = "none"


@cache
def _packaged_costs() -> dict[str, Any]:
    return _checked(json.loads(COSTS_FILE.read_text()), COSTS_FILE)


def load_costs(path: str | Path | None = None) -> dict[str, Any]:
    """The cost table: the packaged `gpu_costs.json`, or a user's edited copy at `path`."""
    if path is None:
        return _packaged_costs()
    path = Path(path)
    return _checked(json.loads(path.read_text()), path)


def _checked(data: dict[str, Any], source: Path) -> dict[str, Any]:
    if data.get("format") != COSTS_FORMAT:
        raise ValueError(f"{source}: format is {data.get('format')!r}; this code reads format {COSTS_FORMAT}")
    for section in ("gpus", "architectures"):
        if not isinstance(data.get(section), dict) or not data[section]:
            raise ValueError(f"{source}: no '{section}' table")
    if NO_GPU in data["gpus"]:
        raise ValueError(f"{source}: '{NO_GPU}' is reserved for 'no GPU cost'")
    return data


def gpu_names(data: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The GPUs the table models (keys such as "h100"), without `NO_GPU`."""
    return tuple((data or load_costs())["gpus"])


GPUS: tuple[str, ...] = gpu_names()


def component_costs(
    component: str, architecture: str = DEFAULT_ARCHITECTURE, data: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One component's counted costs (FLOP coefficients, weight bytes) in one architecture."""
    data = data or load_costs()
    try:
        arch = data["architectures"][architecture]
    except KeyError:
        raise KeyError(
            f"architecture '{architecture}' is not in the cost table; known: {sorted(data['architectures'])}"
        ) from None
    name = arch.get("aliases", {}).get(component, component)
    try:
        return dict(arch["components"][name])
    except KeyError:
        raise KeyError(
            f"component '{component}' has no cost in architecture '{architecture}'; "
            f"known: {sorted(arch['components']) + sorted(arch.get('aliases', {}))}"
        ) from None


def cost_record(
    component: str,
    gpu: str,
    architecture: str = DEFAULT_ARCHITECTURE,
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything `seconds_from_record` needs for one component on one GPU, as a small JSON-able dict.

    The generator writes it into each timed model's config (`modelled_cost`), so the python model needs
    nothing but its config. `gpu=NO_GPU` gives the zero record (every call 0 s).
    """
    if gpu == NO_GPU:
        return {"component": component, "gpu": NO_GPU}
    data = data or load_costs()
    if gpu not in data["gpus"]:
        raise KeyError(f"GPU '{gpu}' is not in the cost table; known: {list(data['gpus'])} or '{NO_GPU}'")
    device = data["gpus"][gpu]
    costs = component_costs(component, architecture, data)
    return {
        "component": component,
        "architecture": architecture,
        "gpu": gpu,
        "flop_per_row": [float(c) for c in costs["flop_per_row"]],
        "weight_bytes": float(costs["weight_bytes"]),
        "peak_flops": float(device["peak_flops"]),
        "efficiency": float(device["efficiency"]),
        "bandwidth_bytes_per_s": float(device["bandwidth_bytes_per_s"]),
        "floor_seconds": float(device["floor_seconds"]),
    }


def flop(record: Mapping[str, Any], rows: int, height: int, width: int) -> float:
    """FLOP of one call of `rows` rows at a `height` x `width` pixel image (0 for the zero record)."""
    if record.get("gpu") == NO_GPU:
        return 0.0
    c0, c1, c2 = record["flop_per_row"]
    pixels = float(height) * float(width)
    return rows * (c0 + c1 * pixels + c2 * pixels * pixels)


def seconds_from_record(record: Mapping[str, Any], rows: int, height: int = 0, width: int = 0) -> float:
    """The modelled GPU seconds of one call: the one implementation of the formula (module docstring).

    `height`/`width` are the image's pixels (0 where the component has no spatial input).
    """
    if record.get("gpu") == NO_GPU or rows <= 0:
        return 0.0
    compute = flop(record, rows, height, width) / (record["peak_flops"] * record["efficiency"])
    memory = record["weight_bytes"] / record["bandwidth_bytes_per_s"]
    return max(compute, memory) + record["floor_seconds"]


def modelled_seconds(
    component: str,
    rows: int,
    height: int,
    width: int,
    gpu: str,
    architecture: str = DEFAULT_ARCHITECTURE,
    data: Mapping[str, Any] | None = None,
) -> float:
    """The modelled GPU time of one call of `component` with `rows` batch rows at `height` x `width` px."""
    return seconds_from_record(cost_record(component, gpu, architecture, data), rows, height, width)


def efficiency_from_run(
    component: str,
    rows: int,
    height: int,
    width: int,
    seconds: float,
    gpu: str,
    architecture: str = DEFAULT_ARCHITECTURE,
    data: Mapping[str, Any] | None = None,
) -> float:
    """The efficiency a measured call implies: FLOP / ((seconds - floor) * peak).

    Calibrate from a real run: time one compute-bound call (e.g. the UNet at 768 px, 2 rows) on the GPU,
    and write the result as that GPU's `efficiency` in a copy of `gpu_costs.json`.
    """
    record = cost_record(component, gpu, architecture, data)
    busy = seconds - record["floor_seconds"]
    if busy <= 0:
        raise ValueError(f"{seconds} s is not above the per-call floor of {record['floor_seconds']} s")
    return flop(record, rows, height, width) / (busy * record["peak_flops"])


def run_flop(run: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> float:
    """The counted FLOP of one published run (`calibration.runs[*]`): the sum of its `work` items.

    Each item is {architecture, component, rows, calls, height, width}: `calls` calls of `rows` rows.
    """
    data = data or load_costs()
    total = 0.0
    for item in run["work"]:
        costs = component_costs(item["component"], item["architecture"], data)
        record = {"flop_per_row": costs["flop_per_row"]}
        total += item["calls"] * flop(record, item["rows"], item["height"], item["width"])
    return total


def run_fraction_of_peak(run: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> float:
    """The fraction of its GPU's dense FP16 peak a published run reached: FLOP / (seconds * peak)."""
    return run_flop(run, data) / (run["seconds"] * run["peak_flops"])


def calibrated_efficiencies(data: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Each GPU's efficiency by the rule of `calibration.rule`.

    A GPU with runs of its own (`gpu_key`) takes the mean of their fractions of peak; a GPU without
    any takes the mean over every run.
    """
    data = data or load_costs()
    runs = data["calibration"]["runs"]
    fractions = {run["name"]: run_fraction_of_peak(run, data) for run in runs}
    every = sum(fractions.values()) / len(fractions)
    result = {}
    for gpu in data["gpus"]:
        own = [fractions[run["name"]] for run in runs if run.get("gpu_key") == gpu]
        result[gpu] = sum(own) / len(own) if own else every
    return result


@dataclass(frozen=True)
class GenerationCost:
    """The modelled GPU time of one text-to-image generation, per network and in total."""

    gpu: str
    images: int
    images_per_execution: int
    seconds: dict[str, float] = field(default_factory=dict)  # component -> seconds for this generation

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def seconds_per_image(self) -> float:
        return self.total_seconds / self.images

    @property
    def images_per_second(self) -> float:
        """What the modelled GPU allows when it is never idle and batches as assumed."""
        return math.inf if self.total_seconds == 0 else self.images / self.total_seconds


def text_to_image_rows(component: str, *, negative_prompt: bool = False) -> int:
    """Rows one image puts in a text-to-image call of `component`, from the registry's row counts.

    Under classifier-free guidance the text encoder, prior and UNet run [uncond, cond] pairs
    (`row_group`); with a negative prompt the text encoder and prior also run the negative prompt
    (`rows_per_image`, their most rows); the MoVQ decoder runs one row per image.
    """
    spec = COMPONENTS[component]
    return spec.rows_per_image if negative_prompt else spec.row_group


def modelled_generation_seconds(
    gpu: str,
    height: int,
    width: int,
    *,
    prior_steps: int = 25,
    steps: int = 50,
    images: int = 1,
    images_per_execution: int | None = None,
    negative_prompt: bool = False,
    architecture: str = DEFAULT_ARCHITECTURE,
    data: Mapping[str, Any] | None = None,
) -> GenerationCost:
    """The modelled GPU time of one text-to-image generation of `images` images.

    Text encoder once, `prior_steps` prior calls, `steps` UNet calls, one MoVQ decode (the negative image
    embedding is a constant of the checkpoint). `images_per_execution` is the batching assumed: how many
    images' rows each network call carries (the dynamic batcher merging generations); the default is this
    generation's own `images`. A call's time is shared by its images, so with `images_per_execution` = the
    models' largest batch, `images_per_second` is the throughput the modelled costs allow at ideal batching,
    and `seconds_per_image` the modelled compute per image.
    """
    if images < 1 or prior_steps < 0 or steps < 0:
        raise ValueError("images must be >= 1 and steps >= 0")
    together = images if images_per_execution is None else images_per_execution
    if together < 1:
        raise ValueError("images_per_execution must be >= 1")
    calls = {"text_encoder": 1, "prior": prior_steps, "unet": steps, "movq_decoder": 1}
    seconds = {}
    for component, count in calls.items():
        rows = text_to_image_rows(component, negative_prompt=negative_prompt) * together
        one_call = modelled_seconds(component, rows, height, width, gpu, architecture, data)
        seconds[component] = count * one_call * images / together
    return GenerationCost(gpu=gpu, images=images, images_per_execution=together, seconds=seconds)


__all__ = [
    "COSTS_FILE",
    "DEFAULT_ARCHITECTURE",
    "GPUS",
    "NO_GPU",
    "GenerationCost",
    "calibrated_efficiencies",
    "component_costs",
    "cost_record",
    "efficiency_from_run",
    "flop",
    "gpu_names",
    "load_costs",
    "modelled_generation_seconds",
    "modelled_seconds",
    "run_flop",
    "run_fraction_of_peak",
    "seconds_from_record",
    "text_to_image_rows",
]
