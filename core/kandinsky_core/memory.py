"""The memory budget: how much host memory a network call takes, and how much the server may hand out.

Why: one allowed request could take the machine (four 1024 px images on the tiny preset peaked at 23 GB of
23.5 GB in the UNet and MoVQ decoder stubs, and the next large decode got a stub OOM-killed). Every
network call's peak is estimated before it runs, from the checkpoint's own graphs, and checked against a
budget.

The estimate. ONNX Runtime's activation memory for one call grows with the batch rows and, for the
networks with image axes, with the pixels: linearly in the convolutions, quadratically in the attention
layers (tokens x tokens per head). `kandinsky-export` measures each component's peak at a few sizes
(`measurement_points`, export/kandinsky_export/memory.py: rows 1 at a quarter, half and three quarters
of MAX_IMAGE_SIZE, and 2 rows at the half) on the session the CPU flavour serves (`onnx_cpu.CpuSession`),
and records the fit `rows x (a + b P + c P^2)` (P = height x width) in the bundle manifest, scaled up so
that it covers every measured point, and by ESTIMATE_MARGIN (`MemoryFit`). Components without image axes get `rows x a`.

The budget (`MemoryPlan`, written by the repository generator): `--memory-budget-gib`, or by default
BUDGET_FRACTION of what the machine has (`machine_memory_bytes`: RAM, or the cgroup's limit when lower)
after the served networks' weights. Each network model instance gets a share of it (`fair_shares`: the
models whose largest call, max batch at the largest side, is small get all of it, the others equal parts
of the rest), so that all of them at their share at once stay within the budget: a call over its model's
share can never run and is refused (invalid argument, naming the limit), a merged batch over it is
split. The server-side loop also holds, per running generation, its largest call's estimate
(`generation_peak`), and waits (FIFO) while the running ones leave no room (`GenerationBudget`).
The estimates carry ESTIMATE_MARGIN; not counted: the stubs' own memory (~0.1 GB each), the python
models' tensors and the `kandinsky` stub's decoded images (tens of MB at four 1024 px images).

Returning memory: a call whose estimate exceeds its model's `retain` (one generation's step at the
default image side) runs with ONNX Runtime's arena shrinkage, so the stub gives that memory back after
the call instead of keeping its high-water mark (onnx_cpu.py).

GPU flavours: the networks' activation memory lives on the device and is reserved at load (TensorRT: per
execution context, `profiles.instance_activation_memory`; ONNX Runtime CUDA: warmed up at the largest
batch and side), so their calls need no host estimate; the generator records the device memory the
TensorRT engines hold in the repository record.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .components import (
    BATCH,
    COMPONENTS,
    MAX_IMAGE_SIZE,
    SERVED_MODELS,
    ComponentSpec,
    ModelDims,
    call_symbols,
)
from .errors import InvalidRequest
from .profiles import has_spatial_axes
from .request import DEFAULT_IMAGE_SIDE

logger = logging.getLogger(__name__)

GIB = 2**30

# The default budget: this share of the machine's memory left after the networks' weights. The rest is
# for the python stubs themselves (~0.1 GB each), Triton, /dev/shm, the page cache and the estimate's error.
BUDGET_FRACTION = 0.75

# Where a component's memory is measured, as fractions of MAX_IMAGE_SIZE (snapped down to the checkpoint's
# size unit): three sides at one row determine the quadratic, the middle side again at MEASURED_ROWS rows
# checks that memory grows with the rows.
MEASURED_SIDE_FRACTIONS = (0.25, 0.5, 0.75)
MEASURED_ROWS = 2

# The fit is exact at the measured sizes, not between them: on the tiny preset a fresh measurement at
# sizes it was not fitted on came out up to 7% above it (the MoVQ encoder at 2 x 640 px: 989 MiB measured,
# 916 MiB fitted). Every estimate carries this margin.
ESTIMATE_MARGIN = 1.15

# How long a waiting generation sleeps between checks of its cancellation and deadline.
WAIT_POLL_S = 0.2


def format_gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


@dataclass(frozen=True)
class MemoryFit:
    """Peak bytes of one call of a component: `rows x (a + b P + c P^2)`, P = height x width pixels.

    Fitted from measured peaks (`fit_measurements`), scaled by `coverage` (>= 1) so that it is at least
    every measured point and by ESTIMATE_MARGIN for the sizes between them;
    every measured point; `spatial` False: the component has no image axes (P is ignored).
    """

    per_row: float  # a: bytes per row
    per_row_pixel: float  # b: bytes per row and pixel
    per_row_pixel2: float  # c: bytes per row and pixel squared (attention)
    spatial: bool
    coverage: float = 1.0  # already applied to a, b, c (with the margin); how far the fit was off

    def estimate(self, rows: int, height: int = 0, width: int = 0) -> int:
        """Estimated peak bytes of one call of `rows` rows at height x width (ignored without image axes)."""
        pixels = float(height * width) if self.spatial else 0.0
        per_row = self.per_row + self.per_row_pixel * pixels + self.per_row_pixel2 * pixels * pixels
        return int(math.ceil(max(per_row, 0.0) * rows))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MemoryFit:
        return cls(
            per_row=float(values["per_row"]),
            per_row_pixel=float(values["per_row_pixel"]),
            per_row_pixel2=float(values["per_row_pixel2"]),
            spatial=bool(values["spatial"]),
            coverage=float(values.get("coverage", 1.0)),
        )


def measurement_points(
    spec: ComponentSpec, dims: ModelDims, max_side: int = MAX_IMAGE_SIZE
) -> list[tuple[int, int, int]]:
    """(rows, height, width) at which `kandinsky-export` measures a component's peak memory.

    With image axes: rows 1 at MEASURED_SIDE_FRACTIONS of `max_side` (distinct multiples of the
    checkpoint's size unit) and MEASURED_ROWS rows at the middle one; without: 1 row and the model's
    `max_batch_size` (its sides are 0).
    """
    if not has_spatial_axes(spec):
        return [(1, 0, 0), (spec.max_batch_size, 0, 0)]
    unit = dims.size_multiple
    sides = sorted({max(unit, int(max_side * f) // unit * unit) for f in MEASURED_SIDE_FRACTIONS})
    points = [(1, side, side) for side in sides]
    middle = sides[len(sides) // 2]
    return [*points, (MEASURED_ROWS, middle, middle)]


def fit_measurements(points: Sequence[Sequence[int]], spatial: bool) -> MemoryFit:
    """The fit of measured (rows, height, width, peak bytes), scaled to cover every point.

    Per-row peaks are fitted by least squares in P (a quadratic with three or more distinct sizes, a line
    with two, a constant with one); then a, b and c are multiplied by the largest measured/fitted ratio,
    so the estimate is never below what was measured, and by ESTIMATE_MARGIN.
    """
    import numpy as np

    rows = np.array([float(p[0]) for p in points])
    pixels = np.array([float(p[1]) * float(p[2]) for p in points]) if spatial else np.zeros(len(points))
    per_row = np.array([max(float(p[3]), 0.0) for p in points]) / rows
    degree = min(len(set(pixels.tolist())) - 1, 2) if spatial else 0
    scale = max(float(pixels.max()), 1.0)  # fit in P / scale: a well-conditioned system
    basis = np.stack([(pixels / scale) ** k for k in range(degree + 1)], axis=1)
    coefficients = np.linalg.lstsq(basis, per_row, rcond=None)[0].tolist() + [0.0] * (2 - degree)
    fit = MemoryFit(
        coefficients[0], coefficients[1] / scale, coefficients[2] / scale**2, spatial=spatial, coverage=1.0
    )
    ratios = [
        float(p[3]) / max(fit.estimate(int(p[0]), int(p[1]), int(p[2])), 1) for p in points if float(p[3]) > 0
    ]
    coverage = max([1.0, *ratios])
    scale_up = coverage * ESTIMATE_MARGIN
    return MemoryFit(
        fit.per_row * scale_up,
        fit.per_row_pixel * scale_up,
        fit.per_row_pixel2 * scale_up,
        spatial=spatial,
        coverage=coverage,
    )


def call_size(
    spec: ComponentSpec, shapes: Mapping[str, Sequence[int]], dims: ModelDims
) -> tuple[int, int, int]:
    """(rows, height, width) in pixels of one call with these input shapes (sides 0 without image axes)."""
    symbols = call_symbols(spec, dims, shapes)
    return symbols[BATCH], symbols.get("height", 0), symbols.get("width", 0)


def machine_memory_bytes() -> int:
    """The memory this machine (or container) has: MemTotal, or the cgroup's limit when that is lower."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or int(text) + 1):
            total = int(text)
    if total <= 0:
        raise RuntimeError("cannot read this machine's memory (/proc/meminfo): give --memory-budget-gib")
    return total


def default_budget_bytes(machine_bytes: int, held_bytes: int) -> int:
    """BUDGET_FRACTION of the machine's memory left after what the loaded models hold."""
    return int(BUDGET_FRACTION * max(machine_bytes - held_bytes, 0))


@dataclass(frozen=True)
class ModelMemory:
    """One network model's part of the budget."""

    fit: MemoryFit
    limit_bytes: int  # the largest call one instance may run: its share of the budget / instances
    retain_bytes: int  # calls up to this keep ONNX Runtime's arena; larger ones give it back afterwards
    budget_bytes: int  # the whole budget (for messages)

    def as_parameters(self) -> dict[str, object]:
        return {
            "memory_fit": self.fit.as_dict(),
            "memory_limit_bytes": str(self.limit_bytes),
            "memory_retain_bytes": str(self.retain_bytes),
            "memory_budget_bytes": str(self.budget_bytes),
        }

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> ModelMemory | None:
        """From a model's config parameters (JSON already decoded or not); None when it has none."""
        fit = parameters.get("memory_fit")
        if not fit:
            return None
        fit = json.loads(fit) if isinstance(fit, str) else fit
        return cls(
            MemoryFit.from_dict(fit),
            int(parameters["memory_limit_bytes"]),
            int(parameters["memory_retain_bytes"]),
            int(parameters["memory_budget_bytes"]),
        )

    def rows_per_call(self, rows: int, height: int = 0, width: int = 0) -> int:
        """How many of a call's `rows` run at once: all of them when they fit the limit, else the most
        that do (the network runs the call in parts of that many rows: rows are independent); 0 when not
        even one row fits."""
        one = self.fit.estimate(1, height, width)
        if self.fit.estimate(rows, height, width) <= self.limit_bytes:
            return rows
        return min(rows, self.limit_bytes // one) if one > 0 else rows

    def excess(self, rows: int, height: int = 0, width: int = 0) -> int:
        """The estimated bytes of one row of the call when even that exceeds the limit (the call can
        never run here), else 0. Larger calls run in parts (`rows_per_call`)."""
        needed = self.fit.estimate(1 if rows else 0, height, width)
        return needed if needed > self.limit_bytes else 0

    def call_peak(self, rows: int, height: int = 0, width: int = 0) -> int:
        """The estimated peak of a call of `rows` rows, run in parts when it does not fit at once."""
        return self.fit.estimate(max(self.rows_per_call(rows, height, width), 1), height, width)

    def limit_text(self, model: str) -> str:
        return (
            f"'{model}' may take {format_gib(self.limit_bytes)} per call (its share of the server's "
            f"{format_gib(self.budget_bytes)} memory budget, kandinsky-repository --memory-budget-gib)"
        )


@dataclass(frozen=True)
class MemoryPlan:
    """The budget of a repository and every network model's part of it (written by the generator)."""

    budget_bytes: int
    machine_bytes: int  # 0 when the budget was given
    held_bytes: int  # the served networks' weights
    models: dict[str, ModelMemory]

    @classmethod
    def build(
        cls,
        fits: Mapping[str, MemoryFit],
        weights_bytes: Mapping[str, int],
        instances: int,
        max_image_size: int,
        budget_bytes: int = 0,
    ) -> MemoryPlan:
        """Each instance's limit is its model's `fair_shares` part of the budget (demand: its largest call,
        max batch at `max_image_size`, per instance), divided by the instances.

        `budget_bytes` 0: the default, from this machine (`default_budget_bytes`).
        """
        held = sum(weights_bytes.values()) * instances
        machine = 0
        if budget_bytes <= 0:
            machine = machine_memory_bytes()
            budget_bytes = default_budget_bytes(machine, held)
        instances = max(instances, 1)
        demands = {
            name: instances * fit.estimate(COMPONENTS[name].max_batch_size, max_image_size, max_image_size)
            for name, fit in fits.items()
        }
        shares = fair_shares(budget_bytes, demands)
        models = {}
        for name, fit in fits.items():
            spec = COMPONENTS[name]
            limit = shares[name] // instances
            typical = fit.estimate(spec.rows_per_image, DEFAULT_IMAGE_SIDE, DEFAULT_IMAGE_SIDE)
            models[name] = ModelMemory(fit, limit, min(typical, limit), budget_bytes)
        return cls(budget_bytes, machine, held, models)

    def record(self) -> dict[str, Any]:
        """What the repository record says about the budget (bytes)."""
        return {
            "budget_bytes": self.budget_bytes,
            "machine_bytes": self.machine_bytes,
            "held_bytes": self.held_bytes,
            "budget_fraction": BUDGET_FRACTION if self.machine_bytes else None,
            "models": {
                name: {"limit_bytes": m.limit_bytes, "retain_bytes": m.retain_bytes, "fit": m.fit.as_dict()}
                for name, m in self.models.items()
            },
        }


def fair_shares(budget_bytes: int, demands: Mapping[str, int]) -> dict[str, int]:
    """Split the budget max-min fairly: in order of demand, each gets its demand or an equal part of what
    is left, whichever is less. The shares sum to at most the budget; a model that needs little (the
    prompt and prior models: megabytes) is never cut to a fraction of its largest batch."""
    shares: dict[str, int] = {}
    remaining = budget_bytes
    ordered = sorted(demands, key=lambda name: demands[name])
    for index, name in enumerate(ordered):
        share = min(demands[name], remaining // (len(ordered) - index))
        shares[name] = share
        remaining -= share
    return shares


def generation_calls(
    models: Sequence[str], images: int, guided: bool, height: int, width: int
) -> list[tuple[str, int, int, int]]:
    """(component, rows, height, width) of the network calls a generation makes at its largest.

    `models` are the served models its mode needs (`Generator.required_models`; ensembles stand for their
    steps). Rows as the generation core sends them: the UNets [uncond, cond] per image under guidance,
    the MoVQ encoders the one input picture, the MoVQ decoders one row per image, the prompt and prior
    models their registry bound (`rows_per_image` per image: small, they have no image axes).
    """
    calls = []
    for served in models:
        steps = SERVED_MODELS[served].steps if served in SERVED_MODELS else (served,)
        for name in steps:
            spec = COMPONENTS.get(name)
            if spec is None:
                continue
            if spec.row_group == 2 and has_spatial_axes(spec):  # a UNet
                rows = images * (2 if guided else 1)
            elif "latents" in {t.name for t in spec.outputs}:  # a MoVQ encoder: the one input picture
                rows = 1
            else:
                rows = spec.rows_per_image * images
            calls.append((name, rows, height, width))
    return calls


def generation_peak(
    calls: Sequence[tuple[str, int, int, int]], models: Mapping[str, ModelMemory], images: int
) -> int:
    """The largest estimate of `calls` (a generation has one call in flight at a time), or InvalidRequest
    naming the model and its limit when one of them can never run."""
    peak = 0
    for name, rows, height, width in calls:
        memory = models.get(name)
        if memory is None:
            continue
        needed = memory.excess(rows, height, width)
        if needed:
            raise InvalidRequest(
                "height, width",
                f"one image at {height}x{width} needs an estimated {format_gib(needed)} per row in "
                f"'{name}'; {memory.limit_text(name)}: ask for a smaller size",
            )
        peak = max(peak, memory.call_peak(rows, height, width))
    return peak


def request_peak(request: Any, required_models: Sequence[str], models: Mapping[str, ModelMemory]) -> int:
    """The estimated peak of a checked generation request (`generation_peak` of its calls): its images are
    its prompts x `num_images_per_prompt`, guided when `guidance_scale` > 1, at its height x width."""
    prompts = len(request.prompt) if request.prompt else 1
    images = prompts * int(request.num_images_per_prompt)
    calls = generation_calls(
        required_models, images, float(request.guidance_scale) > 1.0, int(request.height), int(request.width)
    )
    return generation_peak(calls, models, images)


class GenerationBudget:
    """The budget the running server-side generations share: each holds its peak while it runs.

    A generation whose peak does not fit beside the running ones waits, in arrival order (a large one is
    not overtaken for ever by small ones), checking `should_stop` (cancellation, deadline) while it waits.
    Peaks are at most the budget (`generation_peak` refuses larger calls), so every waiter runs once the
    ones before it finished.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.held_bytes = 0
        self._condition = threading.Condition()
        self._waiting: deque[object] = deque()

    @contextmanager
    def hold(self, peak: int, should_stop: Callable[[], None]) -> Iterator[float]:
        """Hold `peak` bytes while the block runs; yields the seconds it waited for them."""
        waited = self.acquire(peak, should_stop)
        try:
            yield waited
        finally:
            self.release(peak)

    def acquire(self, peak: int, should_stop: Callable[[], None]) -> float:
        """Wait until `peak` bytes fit beside the held ones and it is this caller's turn, then hold them;
        returns the seconds waited. `should_stop` may raise to give up (nothing is held then)."""
        if peak <= 0:
            return 0.0
        peak = min(peak, self.budget_bytes)
        ticket = object()
        started = time.monotonic()
        with self._condition:
            self._waiting.append(ticket)
            try:
                logged = False
                while self._waiting[0] is not ticket or self.held_bytes + peak > self.budget_bytes:
                    if not logged:
                        logger.info(
                            "a generation needing %s waits: %s of the %s memory budget held",
                            format_gib(peak),
                            format_gib(self.held_bytes),
                            format_gib(self.budget_bytes),
                        )
                        logged = True
                    self._condition.wait(WAIT_POLL_S)
                    should_stop()
                self.held_bytes += peak
            finally:
                self._waiting.remove(ticket)
                self._condition.notify_all()
        return time.monotonic() - started

    def release(self, peak: int) -> None:
        """Give back what `acquire(peak)` held."""
        if peak <= 0:
            return
        with self._condition:
            self.held_bytes -= min(peak, self.budget_bytes)
            self._condition.notify_all()
