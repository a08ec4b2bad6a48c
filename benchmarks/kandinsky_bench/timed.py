"""`kandinsky-bench timed`: both loops on the `timed` flavour, a GPU configuration at modelled step times.

    kandinsky-bench timed                                       # the issue's grid (see the cell count)
    kandinsky-bench timed --sizes 768 --concurrency 1 8 --schedules ddpm-25+50 --repeats 4
    kandinsky-bench timed --sizes 768 --loops server --dispatch per-request step-batching
    kandinsky-bench timed --flavour cpu --sizes 512 --schedules dpm-10+20 --dispatch per-request step-batching

The `timed` repository (`kandinsky_repository/generator/timed_flavour.py`) is the tensorrt flavour's configuration
with every network a python model sleeping its modelled GPU time on `--gpu` (`gpu_costs.py`), all of them
sharing one lock: one modelled GPU. The tiny preset's bundle gives the tensors their shapes; the modelled
time is the released architecture's. So every number here is **modelled**, not measured on a GPU: what the
serving (batchers, queues, both loops, transport) costs around the kernels the cost table assumes.

Two repositories from the same bundle:
- `--gpu` (default h100): per (schedule, size, loop, concurrency) a window of generations (`served.run_level`:
  one thread and client per concurrent user, Triton's statistics read around the window);
- `none` (zero modelled time), run first: per (schedule, size, loop) at concurrency 1, the stub hop: the time
  Triton spends in the timed networks' python models (compute_input + compute_infer + compute_output) with
  nothing to sleep, per denoising step. The real flavour's C++ backend has no such hop; subtract it.

`--dispatch`: how the server loop sends its generations' steps (the `kandinsky` model's `step_batching`):
`per-request` (each generation's step is its own BLS request) and/or `step-batching` (one request per
step of every generation in the same loop, `python_models/step_batching.py`). Each mode gets its own
repository and server, all started at once; every cell runs each mode's window in turn (the order
alternating), so both see the same machine. The client loop is measured once. The stub hop is measured
with the first mode (at concurrency 1 both send the same calls).

`--flavour cpu`: the same grid on the CPU flavour, the networks computing with ONNX Runtime on this CPU:
nothing is modelled (no bound, no stub hop); the rows report measured latency, throughput, rows per
execution and the time outside the networks' compute per step.

Per cell: p50/p99 latency; images/s, against the bound the modelled costs allow at that concurrency (every
network batching all running generations' rows up to its batch limit, the GPU never idle); modelled
compute per image (one image alone); the time outside modelled compute per step; the modelled GPU's busy
share of the window (Triton's batch statistics priced by the cost model); UNet and prior rows per execution
against the ideal; Triton's queue time per step (unet and prior). A schedule is `<scheduler>-<prior>+<decoder>`
steps, or `<scheduler>-<decoder>` with DEFAULT_PRIOR_STEPS prior steps; the scheduler is the decoder's (the
prior always runs UnCLIP).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kandinsky_core.components import COMPONENTS
from kandinsky_core.gpu_costs import (
    GPUS,
    NO_GPU,
    load_costs,
    modelled_generation_seconds,
    modelled_seconds,
    text_to_image_rows,
)
from kandinsky_core.profiles import PROFILE_MIN_SIZE, PROFILE_OPT_SIZE
from kandinsky_core.request import GenerationRequest
from kandinsky_repository.python_models.step_batching import DEFAULT_STEP_BATCHING, PER_REQUEST, STEP_BATCHING
from tqdm.auto import tqdm

from .report import TARGET_OUTSIDE_PER_STEP_S, write_json
from .served import LOOPS, PROMPTS, Request, generate_once, open_client, run_level

logger = logging.getLogger(__name__)

# The default grid: DDPM 25 + 50 steps (the released pipeline's) and DPM-Solver++ at 20 decoder
# steps (the prior keeps its 25: only the decoder scheduler changes).
DEFAULT_SCHEDULES = ("ddpm-25+50", "dpm-20")
DEFAULT_PRIOR_STEPS = 25
DEFAULT_SIZES = (512, 768, 1024)
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
DEFAULT_GPU = "h100"
# Generations per cell, at least: every worker runs ceil(repeats / concurrency) (`served.run_level`).
DEFAULT_REPEATS = 8
WARMUP_GENERATIONS = 1  # per (schedule, size, loop) and server, untimed: connections, first-call costs
SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
# The denoising models: each step is one request to one of them (client loop) or one BLS request (server).
STEP_MODELS = ("prior", "unet")
GUIDANCE_SCALE = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}["guidance_scale"]
# The GPU-serving targets, reported (never asserted) for the cells that exist: the timed flavour on H100 at
# 768 px; the server loop at concurrency 1 within modelled compute + TARGET_OUTSIDE_PER_STEP_S per step
# after the stub hop, no step waiting in a batching window; at concurrency 8 rows per execution and
# images/s at least these fractions of the ideal and of the bound.
TARGET_GPU = "h100"
TARGET_SIZE = PROFILE_OPT_SIZE  # the issue's targets are stated at 768 px, the engines' middle optimum
TARGET_CONCURRENCY = 8
TARGET_ROWS_FRACTION = 0.9
TARGET_THROUGHPUT_FRACTION = 0.9
LABEL = "modelled: {gpu} timed flavour, {preset} bundle standing in for the {architecture} architecture"
CPU_LABEL = "measured: cpu flavour on this machine's CPU, {preset} bundle (nothing modelled)"
FLAVOURS = ("timed", "cpu")
# How the server loop dispatches its steps: `--dispatch` names -> the `kandinsky` model's `step_batching`.
DISPATCHES = {"per-request": PER_REQUEST, "step-batching": STEP_BATCHING}
DEFAULT_DISPATCH = next(name for name, value in DISPATCHES.items() if value == DEFAULT_STEP_BATCHING)
# The step-batching targets, reported (never asserted): at every concurrency both per-step models' rows
# per execution at least this share of the ideal; images/s at TARGET_CONCURRENCY at least this many times
# per-request dispatch's; p50 at concurrency 1 no worse than per-request dispatch's beyond this share (noise).
TARGET_STEP_ROWS_FRACTION = 0.95
TARGET_STEP_SPEEDUP = 1.2
TARGET_STEP_P50_NOISE = 0.03


@dataclass(frozen=True)
class Schedule:
    """One denoising schedule of the grid: the decoder scheduler and both loops' step counts."""

    name: str  # as given on the command line, e.g. "ddpm-25+50"
    scheduler: str  # diffusers class name of the decoder scheduler
    prior_steps: int
    steps: int  # decoder (UNet) steps

    @property
    def total_steps(self) -> int:
        return self.prior_steps + self.steps

    def describe(self) -> str:
        return f"{self.scheduler}: {self.prior_steps} prior (UnCLIP) + {self.steps} decoder steps"


def parse_schedule(text: str) -> Schedule:
    """`ddpm-25+50` or `dpm-20` (prior DEFAULT_PRIOR_STEPS) -> Schedule; ValueError names what is wrong."""
    short, _, counts = text.rpartition("-")
    if short not in SCHEDULERS:
        raise ValueError(f"schedule '{text}': scheduler '{short}' is not one of {sorted(SCHEDULERS)}")
    prior, _, decoder = counts.rpartition("+")
    try:
        prior_steps = int(prior) if prior else DEFAULT_PRIOR_STEPS
        steps = int(decoder)
    except ValueError:
        raise ValueError(f"schedule '{text}': steps are '<prior>+<decoder>' or '<decoder>'") from None
    if prior_steps < 1 or steps < 1:
        raise ValueError(f"schedule '{text}': steps must be >= 1")
    return Schedule(text, SCHEDULERS[short], prior_steps, steps)


def request_for(schedule: Schedule, size: int) -> Request:
    return Request(
        height=size,
        width=size,
        prior_num_inference_steps=schedule.prior_steps,
        num_inference_steps=schedule.steps,
        guidance_scale=GUIDANCE_SCALE,
        scheduler=schedule.scheduler,
    )


@dataclass(frozen=True)
class TimedPlan:
    """What one `kandinsky-bench timed` run measures."""

    gpu: str
    schedules: tuple[Schedule, ...]
    sizes: tuple[int, ...]
    concurrency: tuple[int, ...]
    loops: tuple[str, ...]
    repeats: int
    protocol: str
    preset: str
    gpu_costs: str
    architecture: str
    dispatches: tuple[str, ...] = (DEFAULT_DISPATCH,)
    flavour: str = "timed"

    @property
    def max_image_size(self) -> int:
        return max(self.sizes)

    @property
    def modelled(self) -> bool:
        return self.flavour == "timed"

    def variants(self) -> list[tuple[str, str | None]]:
        """(loop, dispatch) of every window of a cell: the client loop once, the server loop per dispatch."""
        return [
            (loop, None) if loop == "client" else (loop, dispatch)
            for loop in self.loops
            for dispatch in ((None,) if loop == "client" else self.dispatches)
        ]

    def cells(self) -> int:
        return len(self.schedules) * len(self.sizes) * len(self.variants()) * len(self.concurrency)

    def generations(self, concurrency: int) -> int:
        """Generations of one window (`served.requests_per_worker` x workers)."""
        return concurrency * math.ceil(self.repeats / concurrency)

    def estimate(self, costs: Mapping[str, Any]) -> dict[str, float]:
        """Cells, generations and the modelled GPU time the measured windows need at least (their bound)."""
        generations = seconds = 0.0
        for schedule in self.schedules:
            for size in self.sizes:
                for concurrency in self.concurrency:
                    count = self.generations(concurrency) * len(self.variants())
                    generations += count
                    if self.modelled:
                        seconds += count * modelled_bound(self.gpu, size, schedule, concurrency, costs)
        return {"cells": self.cells(), "generations": generations, "modelled_gpu_s": seconds}


# -- what the modelled costs allow --------------------------------------------------------------------


def ideal_rows(component: str, concurrency: int) -> int:
    """Rows per execution if every running generation's step were in each batch, up to the batch limit."""
    return min(concurrency * text_to_image_rows(component), COMPONENTS[component].max_batch_size)


def modelled_alone(gpu: str, size: int, schedule: Schedule, costs: Mapping[str, Any]) -> float:
    """Modelled GPU seconds of one generation of one image with nothing batched with it."""
    cost = modelled_generation_seconds(
        gpu,
        size,
        size,
        prior_steps=schedule.prior_steps,
        steps=schedule.steps,
        images_per_execution=1,
        data=costs,
    )
    return cost.seconds_per_image


def modelled_bound(
    gpu: str, size: int, schedule: Schedule, concurrency: int, costs: Mapping[str, Any]
) -> float:
    """Modelled GPU seconds per image at ideal batching: each network's calls carrying all `concurrency`
    generations' rows up to its batch limit, shared by their images. 1 / this is the images/s bound."""
    total = 0.0
    for component in ("text_encoder", "prior", "unet", "movq_decoder"):
        together = max(1, ideal_rows(component, concurrency) // text_to_image_rows(component))
        cost = modelled_generation_seconds(
            gpu,
            size,
            size,
            prior_steps=schedule.prior_steps,
            steps=schedule.steps,
            images_per_execution=together,
            data=costs,
        )
        total += cost.seconds[component]
    return total


def modelled_busy(
    models: Mapping[str, Mapping[str, Any]], gpu: str, size: int, costs: Mapping[str, Any]
) -> float:
    """Modelled GPU seconds of the executions a window ran: each network's batches (Triton's batch
    statistics) priced by the cost model; the timed models sleep exactly this, one at a time."""
    busy = 0.0
    for model, stats in models.items():
        if model not in COMPONENTS:
            continue
        for rows, executions in stats.get("executions_by_batch", {}).items():
            busy += executions * modelled_seconds(model, int(rows), size, size, gpu, data=costs)
    return busy


# -- one window's numbers --------------------------------------------------------------------------------


def _network_models(level: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {model: stats for model, stats in level["models"].items() if model in COMPONENTS}


def stub_hop(level: Mapping[str, Any], schedule: Schedule) -> dict[str, float]:
    """The time Triton spent in the timed networks' python models at zero modelled time, per step and per
    network call; and the whole p50 per step at zero time (everything but the GPU, for reference)."""
    networks = _network_models(level)
    seconds = sum(
        s["compute_input_s"] + s["compute_infer_s"] + s["compute_output_s"] for s in networks.values()
    )
    calls = sum(s["requests"] for s in networks.values())
    generations = level["requests"]
    return {
        "stub_hop_per_step_s": seconds / (generations * schedule.total_steps),
        "stub_hop_per_call_s": seconds / max(1, calls),
        "zero_time_p50_per_step_s": level["latency"]["p50"] / schedule.total_steps,
    }


def cell_row(
    level: Mapping[str, Any],
    *,
    schedule: Schedule,
    size: int,
    gpu: str,
    costs: Mapping[str, Any] | None,
    hop: Mapping[str, float] | None,
    dispatch: str | None = None,
) -> dict[str, Any]:
    """Every number of one (schedule, size, loop, dispatch, concurrency) window, from `served.run_level`'s
    summary. `costs` None: the cpu flavour, where nothing is modelled (those numbers are None)."""
    concurrency, generations = level["concurrency"], level["requests"]
    steps = schedule.total_steps
    wall = level["wall_s"]
    per_worker = generations / concurrency  # every worker ran the same number (run_level)
    step_models = {m: level["models"].get(m, {}) for m in STEP_MODELS}
    step_requests = sum(s.get("requests", 0) for s in step_models.values())
    row: dict[str, Any] = {
        "schedule": schedule.name,
        "scheduler": schedule.scheduler,
        "prior_steps": schedule.prior_steps,
        "steps": schedule.steps,
        "size": size,
        "loop": level["loop"],
        "dispatch": dispatch,  # the server loop's (None: the client loop)
        "concurrency": concurrency,
        "generations": generations,
        "wall_s": wall,
        "latency": level["latency"],
        "images_per_s": level["images_per_s"],
        # Concurrency 1 only: (wall - the networks' compute in Triton) / steps (`served.summarize_level`);
        # on the timed flavour the compute is the modelled sleep plus the stub hop.
        "outside_compute_per_step_s": level["overhead"]["outside_per_step_s"] if concurrency == 1 else None,
        # Triton's queue time per prior/UNet request (one per step per generation under per-request
        # dispatch; one per loop iteration under step batching).
        "queue_per_step_s": sum(s.get("queue_s", 0.0) for s in step_models.values()) / max(1, step_requests),
        "stub_hop": dict(hop) if hop else None,
        "models": level["models"],
        "samples_s": level["samples_s"],
    }
    if costs is not None:
        alone = modelled_alone(gpu, size, schedule, costs)
        bound_s = modelled_bound(gpu, size, schedule, concurrency, costs)
        busy = modelled_busy(level["models"], gpu, size, costs)
        row.update(
            {
                # Modelled GPU time of one image alone (nothing batched with it), and at ideal batching.
                "modelled_compute_per_image_s": alone,
                "modelled_bound_per_image_s": bound_s,
                "bound_images_per_s": math.inf if bound_s == 0 else 1.0 / bound_s,
                "of_bound": level["images_per_s"] * bound_s,
                # Sum of the modelled time of the executions the window ran, over its wall time.
                "modelled_busy_s": busy,
                "gpu_busy_share": busy / wall,
                # Concurrency 1 only: the measure, (p50 latency - modelled compute of the
                # generation) / steps. Above 1 a latency also holds the other generations' GPU time: None.
                "outside_modelled_per_step_s": (level["latency"]["p50"] - alone) / steps
                if concurrency == 1
                else None,
                # Any concurrency: the modelled GPU's idle time per step of a worker's back-to-back generations.
                "gpu_idle_per_step_s": (wall - busy) / (per_worker * steps),
            }
        )
    else:
        for key in (
            "modelled_compute_per_image_s",
            "modelled_bound_per_image_s",
            "bound_images_per_s",
            "of_bound",
            "modelled_busy_s",
            "gpu_busy_share",
            "outside_modelled_per_step_s",
            "gpu_idle_per_step_s",
        ):
            row[key] = None
    for model in STEP_MODELS:
        stats = step_models[model]
        ideal = ideal_rows(model, concurrency)
        rows = stats.get("inferences_per_execution", 0.0)
        row[f"{model}_rows_per_execution"] = rows
        row[f"{model}_ideal_rows"] = ideal
        row[f"{model}_rows_of_ideal"] = rows / ideal
    outside = row["outside_modelled_per_step_s"]
    row["outside_modelled_per_step_less_hop_s"] = (
        outside - hop["stub_hop_per_step_s"] if hop and outside is not None else None
    )
    return row


# -- running it ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(repository: Path, log_dir: Path) -> Iterator[Any]:
    """A Triton server on free loopback ports for `repository`, ready, stopped on exit."""
    from kandinsky_repository.serving.triton import TritonServer, free_port

    with TritonServer(
        repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_file=log_dir / f"triton-{repository.name}.log",
    ) as server:
        yield server


def warm_up(url: str, protocol: str, request: Request, loops: Sequence[str]) -> None:
    """Untimed generations per loop: the client's configs, the server's first call at this size."""
    for loop in loops:
        with open_client(url, protocol, loop) as client:
            for k in range(WARMUP_GENERATIONS):
                generate_once(client, request, PROMPTS[0], seed=k)


def measure_stub_hops(
    url: str, plan: TimedPlan, progress: bool
) -> dict[tuple[str, int, str], dict[str, float]]:
    """On the zero-time repository: per (schedule, size, loop), concurrency 1, the stub hop."""
    hops = {}
    combos = [(s, size, loop) for s in plan.schedules for size in plan.sizes for loop in plan.loops]
    with open_client(url, plan.protocol, plan.loops[0]) as stats_client:
        for schedule, size, loop in tqdm(
            combos, desc="stub hop (gpu none)", unit="run", disable=not progress
        ):
            request = request_for(schedule, size)
            warm_up(url, plan.protocol, request, [loop])
            level = run_level(
                url,
                plan.protocol,
                request,
                loop=loop,
                concurrency=1,
                repeats=plan.repeats,
                stats_client=stats_client,
                progress=progress,
            )
            hops[(schedule.name, size, loop)] = stub_hop(level, schedule)
            logger.info(
                "stub hop, %s %dpx %s loop: %.3f ms/step",
                schedule.name,
                size,
                loop,
                1e3 * hops[(schedule.name, size, loop)]["stub_hop_per_step_s"],
            )
    return hops


def measure_cells(
    urls: Mapping[str, str],
    plan: TimedPlan,
    hops: Mapping[tuple[str, int, str], Mapping[str, float]],
    costs: Mapping[str, Any] | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """Every (schedule, size, loop, dispatch, concurrency) window; `urls`: each dispatch's server (the
    client loop runs on the first's). `costs` None: the cpu flavour."""
    rows = []
    first = urls[plan.dispatches[0]]
    variants = plan.variants()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(total=plan.cells(), desc=f"{plan.flavour} {plan.gpu}", unit="cell", disable=not progress)
        )
        stats_clients = {
            url: stack.enter_context(open_client(url, plan.protocol, "client")) for url in urls.values()
        }
        for schedule in plan.schedules:
            for size in plan.sizes:
                request = request_for(schedule, size)
                for loop, dispatch in variants:
                    warm_up(urls[dispatch] if dispatch else first, plan.protocol, request, [loop])
                for index, concurrency in enumerate(plan.concurrency):
                    # The windows' order alternates from level to level, as in `served.run_served`.
                    turn = variants if index % 2 == 0 else list(reversed(variants))
                    for loop, dispatch in turn:
                        url = urls[dispatch] if dispatch else first
                        level = run_level(
                            url,
                            plan.protocol,
                            request,
                            loop=loop,
                            concurrency=concurrency,
                            repeats=plan.repeats,
                            stats_client=stats_clients[url],
                            progress=progress,
                        )
                        row = cell_row(
                            level,
                            schedule=schedule,
                            size=size,
                            gpu=plan.gpu,
                            costs=costs,
                            hop=hops.get((schedule.name, size, loop)),
                            dispatch=dispatch,
                        )
                        rows.append(row)
                        bar.update(1)
                        logger.info(
                            "%s %dpx %s c=%d: p50 %.3fs, %.3f images/s, UNet %.0f%% / prior %.0f%% of the "
                            "ideal rows",
                            schedule.name,
                            size,
                            loop_label(row),
                            concurrency,
                            row["latency"]["p50"],
                            row["images_per_s"],
                            100 * row["unet_rows_of_ideal"],
                            100 * row["prior_rows_of_ideal"],
                        )
    schedules = {schedule.name: i for i, schedule in enumerate(plan.schedules)}
    order = {variant: i for i, variant in enumerate(variants)}
    return sorted(
        rows,
        key=lambda r: (
            schedules[r["schedule"]],
            r["size"],
            order[(r["loop"], r["dispatch"])],
            r["concurrency"],
        ),
    )


def loop_label(row: Mapping[str, Any]) -> str:
    """The loop as the tables name it: the server loop with its dispatch unless it is the default's."""
    dispatch = row.get("dispatch")
    return row["loop"] if dispatch in (None, DEFAULT_DISPATCH) else f"{row['loop']}, {dispatch}"


def run_timed(plan: TimedPlan, artifacts_dir: Path, output: Path, progress: bool = True) -> dict[str, Any]:
    """Build (or reuse) the bundle, write the repositories (timed: the zero-time one and one per dispatch;
    cpu: one per dispatch), measure the stub hop (timed), then every cell with every dispatch's server
    running."""
    from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository

    from .artifacts import ensure_artifacts
    from .machine import load_average, machine, versions

    costs = load_costs(plan.gpu_costs or None) if plan.modelled else None
    estimate = plan.estimate(costs or {})
    logger.info(
        "%d cells, %d timed generations: at least %.0f s of modelled GPU time, plus warm-ups and the stub-hop runs",
        estimate["cells"],
        estimate["generations"],
        estimate["modelled_gpu_s"],
    )
    bundle = ensure_artifacts(
        artifacts_dir, preset=plan.preset, checkpoint_root=None, repository_options=None
    ).bundle
    output.mkdir(parents=True, exist_ok=True)

    def repository(gpu: str, dispatch: str) -> Path:
        options = RepositoryOptions(
            flavour=plan.flavour,
            gpu=gpu,
            gpu_costs=plan.gpu_costs,
            architecture=plan.architecture,
            max_image_size=plan.max_image_size,
            max_concurrent_generations=max(plan.concurrency),
            step_batching=DISPATCHES[dispatch],
        )
        name = f"timed-{gpu}-{dispatch}" if plan.modelled else f"cpu-{dispatch}"
        generate_repository(bundle, artifacts_dir / name, options)
        return artifacts_dir / name

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    described = machine()
    hops: dict[tuple[str, int, str], dict[str, float]] = {}
    if plan.modelled:
        with serving(repository(NO_GPU, plan.dispatches[0]), output) as server:
            hops = measure_stub_hops(url_of(server, plan.protocol), plan, progress)
    with contextlib.ExitStack() as stack:
        urls = {
            dispatch: url_of(
                stack.enter_context(serving(repository(plan.gpu, dispatch), output)), plan.protocol
            )
            for dispatch in plan.dispatches
        }
        rows = measure_cells(urls, plan, hops, costs, progress)
    described["load_average_end"] = load_average()
    label = (
        LABEL.format(gpu=plan.gpu, preset=plan.preset, architecture=plan.architecture)
        if plan.modelled
        else CPU_LABEL.format(preset=plan.preset)
    )
    return {
        "label": label,
        "date": started,
        "machine": described,
        "versions": versions(),
        "settings": {
            **{k: v for k, v in dataclasses.asdict(plan).items() if k != "schedules"},
            "schedules": [dataclasses.asdict(s) for s in plan.schedules],
            "guidance_scale": GUIDANCE_SCALE,
            "max_image_size": plan.max_image_size,
            "max_concurrent_generations": max(plan.concurrency),
            "warmup_generations": WARMUP_GENERATIONS,
        },
        "estimate": estimate,
        "stub_hop": [
            {"schedule": name, "size": size, "loop": loop, **hop} for (name, size, loop), hop in hops.items()
        ],
        "rows": rows,
        "dispatch_comparison": dispatch_comparison(rows),
    }


def url_of(server: Any, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


# -- the report ----------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f}"


def _rows_cell(row: Mapping[str, Any], model: str) -> str:
    rows, ideal = row[f"{model}_rows_per_execution"], row[f"{model}_ideal_rows"]
    return f"{rows:.2f} / {ideal} ({100 * rows / ideal:.0f}%)"


def table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One markdown row per cell (rows of one schedule), timed flavour: the modelled columns too."""
    lines = [
        "| size | loop | concurrency | generations | p50 s | p99 s | images/s | bound images/s | of bound "
        "| modelled GPU busy | modelled compute ms/image | outside modelled compute ms/step (c=1) "
        "| modelled GPU idle ms/step | stub hop ms/step | queue ms/step | UNet rows/execution (ideal) "
        "| prior rows/execution (ideal) |",
        "|" + "---|" * 17,
    ]
    for row in rows:
        hop = row["stub_hop"]["stub_hop_per_step_s"] if row["stub_hop"] else None
        outside = row["outside_modelled_per_step_s"]
        outside = "–" if outside is None else _ms(outside)
        lines.append(
            f"| {row['size']} | {loop_label(row)} | {row['concurrency']} | {row['generations']} | "
            f"{row['latency']['p50']:.3f} | {row['latency']['p99']:.3f} | {row['images_per_s']:.3f} | "
            f"{row['bound_images_per_s']:.3f} | {100 * row['of_bound']:.0f}% | {100 * row['gpu_busy_share']:.0f}% | "
            f"{_ms(row['modelled_compute_per_image_s'])} | {outside} | {_ms(row['gpu_idle_per_step_s'])} | "
            f"{'n/a' if hop is None else _ms(hop)} | {1e3 * row['queue_per_step_s']:.3f} | "
            f"{_rows_cell(row, 'unet')} | {_rows_cell(row, 'prior')} |"
        )
    return lines


def cpu_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One markdown row per cell (rows of one schedule), cpu flavour: measured numbers only."""
    lines = [
        "| size | loop | concurrency | generations | p50 s | p99 s | images/s | outside compute ms/step (c=1) "
        "| queue ms/step | UNet rows/execution (ideal) | prior rows/execution (ideal) |",
        "|" + "---|" * 11,
    ]
    for row in rows:
        outside = row["outside_compute_per_step_s"]
        lines.append(
            f"| {row['size']} | {loop_label(row)} | {row['concurrency']} | {row['generations']} | "
            f"{row['latency']['p50']:.3f} | {row['latency']['p99']:.3f} | {row['images_per_s']:.3f} | "
            f"{'–' if outside is None else _ms(outside)} | {1e3 * row['queue_per_step_s']:.3f} | "
            f"{_rows_cell(row, 'unet')} | {_rows_cell(row, 'prior')} |"
        )
    return lines


def target_lines(result: Mapping[str, Any]) -> list[str]:
    """The GPU-serving targets on this run's cells (absent cells: nothing said)."""
    gpu = result["settings"]["gpu"]
    lines = []
    for row in result["rows"]:
        if row["size"] != TARGET_SIZE or row["loop"] != "server":
            continue
        where = f"{row['schedule']}, {gpu}, {TARGET_SIZE} px, {loop_label(row)} loop, concurrency {row['concurrency']}"
        net = row["outside_modelled_per_step_less_hop_s"]
        if net is not None:
            lines.append(
                f"- {where}: outside modelled compute {_ms(row['outside_modelled_per_step_s'])} ms/step; after "
                f"subtracting the stub hop ({_ms(row['stub_hop']['stub_hop_per_step_s'])}) {_ms(net)} ms/step "
                f"(target <= {_ms(TARGET_OUTSIDE_PER_STEP_S)}: "
                f"{'met' if net <= TARGET_OUTSIDE_PER_STEP_S else '**not met**'}); Triton queue "
                f"{1e3 * row['queue_per_step_s']:.3f} ms/step (target: no step waits in a batching window)"
            )
        if row["concurrency"] == TARGET_CONCURRENCY:
            fractions = {m: row[f"{m}_rows_of_ideal"] for m in STEP_MODELS}
            rows_met = all(f >= TARGET_ROWS_FRACTION for f in fractions.values())
            throughput_met = row["of_bound"] >= TARGET_THROUGHPUT_FRACTION
            lines.append(
                f"- {where}: rows per execution of the ideal "
                + ", ".join(f"{m} {100 * f:.0f}%" for m, f in fractions.items())
                + f" (target >= {100 * TARGET_ROWS_FRACTION:.0f}%: {'met' if rows_met else '**not met**'}); "
                f"images/s {100 * row['of_bound']:.0f}% of the modelled bound (target >= "
                f"{100 * TARGET_THROUGHPUT_FRACTION:.0f}%: {'met' if throughput_met else '**not met**'})"
            )
    if lines and gpu != TARGET_GPU:
        lines.insert(0, f"- (the targets are set for {TARGET_GPU}; this run models {gpu})")
    return lines


def dispatch_comparison(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (schedule, size): step batching against per-request dispatch on the server loop, and the
    step-batching targets (rows at every concurrency, images/s at TARGET_CONCURRENCY, p50 at 1)."""
    server = {
        (r["schedule"], r["size"], r["dispatch"], r["concurrency"]): r for r in rows if r["loop"] == "server"
    }
    groups = sorted({(schedule, size) for schedule, size, _, _ in server}, key=lambda g: (g[1], g[0]))
    comparisons = []
    for schedule, size in groups:
        levels = sorted({c for s, z, d, c in server if (s, z, d) == (schedule, size, "step-batching")})
        pairs = [
            (server[(schedule, size, "per-request", c)], server[(schedule, size, "step-batching", c)])
            for c in levels
            if (schedule, size, "per-request", c) in server
        ]
        if not pairs:
            continue
        by_concurrency = {step["concurrency"]: (base, step) for base, step in pairs}
        worst_rows = min(step[f"{m}_rows_of_ideal"] for _, step in pairs for m in STEP_MODELS)
        speedup = p50_ratio = None
        if TARGET_CONCURRENCY in by_concurrency:
            base, step = by_concurrency[TARGET_CONCURRENCY]
            speedup = step["images_per_s"] / base["images_per_s"]
        if 1 in by_concurrency:
            base, step = by_concurrency[1]
            p50_ratio = step["latency"]["p50"] / base["latency"]["p50"]
        comparisons.append(
            {
                "schedule": schedule,
                "size": size,
                "concurrency": [c for c, _ in sorted(by_concurrency.items())],
                "speedup": {
                    c: step["images_per_s"] / base["images_per_s"]
                    for c, (base, step) in by_concurrency.items()
                },
                "worst_rows_of_ideal": worst_rows,
                "rows_met": worst_rows >= TARGET_STEP_ROWS_FRACTION,
                "speedup_at_target": speedup,
                "speedup_met": None if speedup is None else speedup >= TARGET_STEP_SPEEDUP,
                "p50_ratio_at_1": p50_ratio,
                "p50_met": None if p50_ratio is None else p50_ratio <= 1 + TARGET_STEP_P50_NOISE,
            }
        )
    return comparisons


def dispatch_lines(result: Mapping[str, Any]) -> list[str]:
    """The comparison of both dispatches, one line per (schedule, size), with the targets' verdicts."""

    def verdict(met: bool | None) -> str:
        return "not measured" if met is None else ("met" if met else "**not met**")

    lines = []
    for c in result.get("dispatch_comparison", []):
        # (JSON keys are strings: sorted as numbers)
        speedups = ", ".join(
            f"c={k} {v:.2f}x" for k, v in sorted(c["speedup"].items(), key=lambda kv: int(kv[0]))
        )
        at_target = c["speedup_at_target"]
        p50 = c["p50_ratio_at_1"]
        lines.append(
            f"- {c['schedule']}, {c['size']} px: images/s of step batching over per-request dispatch {speedups}; "
            f"rows per execution at least {100 * c['worst_rows_of_ideal']:.0f}% of the ideal at every "
            f"concurrency (target >= {100 * TARGET_STEP_ROWS_FRACTION:.0f}%: {verdict(c['rows_met'])}); "
            f"at concurrency {TARGET_CONCURRENCY} "
            + ("–" if at_target is None else f"{at_target:.2f}x")
            + f" (target >= {TARGET_STEP_SPEEDUP}x: {verdict(c['speedup_met'])}); p50 at concurrency 1 "
            + ("–" if p50 is None else f"{100 * (p50 - 1):+.1f}%")
            + f" (target <= +{100 * TARGET_STEP_P50_NOISE:.0f}%: {verdict(c['p50_met'])})"
        )
    return lines


def markdown(result: Mapping[str, Any]) -> str:
    settings, machine = result["settings"], result["machine"]
    modelled = settings.get("flavour", "timed") == "timed"
    lines = [
        f"# {'Timed' if modelled else 'CPU'} flavour ({result['label']})",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM; load average "
        f"at start {machine['load_average_start']}, at end {machine['load_average_end']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
    ]
    if modelled:
        lines += [
            f"- **modelled**: every network sleeps its modelled time on {settings['gpu']} "
            f"(`gpu_costs.json`, architecture '{settings['architecture']}'), one network at a time; pre/post-"
            "processing, both loops, Triton and transport are real, on this CPU",
        ]
    else:
        lines += ["- **measured**: the cpu flavour, every network computing with ONNX Runtime on this CPU"]
    lines += [
        f"- {settings['protocol']}, guidance {settings['guidance_scale']}, one image per generation, "
        f"{settings['repeats']}+ generations per cell (p99 of few samples is close to their maximum), "
        f"repository: {'tensorrt configuration' if modelled else 'cpu flavour'}, max_concurrent_generations "
        f"{settings['max_concurrent_generations']}",
        "- server loop dispatch: "
        + ", ".join(settings.get("dispatches", [DEFAULT_DISPATCH]))
        + f" (the loop column names it unless it is the default, {DEFAULT_DISPATCH}); each dispatch its own "
        "repository and server, every cell's windows in turn",
    ]
    if modelled:
        lines += [
            "- bound images/s: the modelled costs with every network batching all running generations' rows (up "
            "to its batch limit) and the GPU never idle; ideal rows per execution: the same batching, "
            "min(concurrency x 2 rows, batch limit), as the GPU-serving targets define it: a generation in its "
            "UNet phase cannot join a prior batch, so the prior reaches it only while the running generations' "
            "priors line up",
            "- outside modelled compute (c=1): (p50 latency - modelled compute of the generation) / steps; "
            "modelled GPU idle per step (every concurrency): (wall - modelled busy time) / steps of one worker's "
            "generations, where busy = every execution's batch (Triton's batch statistics) priced by the cost model",
            "- stub hop: Triton's compute_input + compute_infer + compute_output of the timed networks per step, "
            "measured on the zero-time repository (`--gpu none`) at concurrency 1, same schedule, size and loop: "
            "what a C++ backend would not spend; subtract it",
        ]
    else:
        lines += [
            "- ideal rows per execution: min(concurrency x 2 rows, batch limit); outside compute (c=1): (wall "
            "time - the networks' compute in Triton) / steps",
        ]
    lines += ["- queue: Triton's queue time per prior/UNet request (per step under per-request dispatch)"]
    targets = target_lines(result) if modelled else []
    if targets:
        lines += ["", "## GPU-serving targets (reported, not asserted)", "", *targets]
    compared = dispatch_lines(result)
    if compared:
        lines += [
            "",
            "## Step batching against per-request dispatch (targets reported, not asserted)",
            "",
            *compared,
        ]
    for schedule in settings["schedules"]:
        mine = [row for row in result["rows"] if row["schedule"] == schedule["name"]]
        if not mine:
            continue
        described = Schedule(**schedule).describe()
        lines += [
            "",
            f"## {schedule['name']} ({described})",
            "",
            *(table(mine) if modelled else cpu_table(mine)),
        ]
    return "\n".join(lines) + "\n"


# -- the command ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kandinsky-bench timed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpu", choices=GPUS, default=DEFAULT_GPU, help="modelled GPU (gpu_costs.json)")
    parser.add_argument("--gpu-costs", default="", help="an edited copy of gpu_costs.json")
    parser.add_argument("--architecture", default="released", help="whose costs are modelled (cost table)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="square image sides"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY))
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=list(DEFAULT_SCHEDULES),
        help=f"<scheduler>-<prior>+<decoder> or <scheduler>-<decoder> (prior {DEFAULT_PRIOR_STEPS}); "
        f"schedulers: {', '.join(f'{k} ({v})' for k, v in SCHEDULERS.items())}",
    )
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help="generations per cell, at least (default 8)"
    )
    parser.add_argument(
        "--dispatch",
        nargs="+",
        choices=list(DISPATCHES),
        default=[DEFAULT_DISPATCH],
        help="how the server loop sends its steps (the kandinsky model's step_batching): per-request and/or "
        f"step-batching, each on its own server, measured side by side (default: {DEFAULT_DISPATCH})",
    )
    parser.add_argument(
        "--flavour",
        choices=FLAVOURS,
        default="timed",
        help="timed: the GPU configuration at modelled step times (default); cpu: the cpu flavour, computed",
    )
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument(
        "--preset", default="tiny", help="the bundle giving the tensors shapes (default: tiny)"
    )
    parser.add_argument("--artifacts", type=Path, help="default: artifacts/<preset>")
    parser.add_argument(
        "--output", type=Path, help="default: benchmarks/results/timed-<gpu>-<timestamp> (cpu-<timestamp>)"
    )
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        args.schedules = [parse_schedule(text) for text in args.schedules]
    except ValueError as error:
        parser.error(str(error))
    if args.repeats < 1 or any(c < 1 for c in args.concurrency):
        parser.error("--repeats and concurrency levels must be >= 1")
    largest = max(args.sizes)
    smallest = min(PROFILE_MIN_SIZE, largest)  # the engine profiles' floor (`ProfileSettings.for_max_size`)
    if args.flavour == "timed" and any(size < smallest for size in args.sizes):
        parser.error(
            f"with {largest} px the largest size, the timed repository serves sides >= {smallest} px"
        )
    args.sizes = sorted(set(args.sizes))
    args.concurrency = sorted(set(args.concurrency))
    args.loops = list(dict.fromkeys(args.loops))
    args.dispatch = list(dict.fromkeys(args.dispatch))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kandinsky_bench").setLevel(logging.INFO)
    plan = TimedPlan(
        gpu=args.gpu,
        schedules=tuple(args.schedules),
        sizes=tuple(args.sizes),
        concurrency=tuple(args.concurrency),
        loops=tuple(args.loops),
        repeats=args.repeats,
        protocol=args.protocol,
        preset=args.preset,
        gpu_costs=args.gpu_costs,
        architecture=args.architecture,
        dispatches=tuple(args.dispatch),
        flavour=args.flavour,
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"timed-{args.gpu}-{stamp}" if args.flavour == "timed" else f"cpu-{stamp}"
    output = args.output or Path("benchmarks") / "results" / name
    result = run_timed(
        plan, args.artifacts or Path("artifacts") / args.preset, output, progress=not args.no_progress
    )
    result["command"] = "kandinsky-bench timed " + shlex.join(sys.argv[2:] if argv is None else argv)
    text = markdown(result)
    write_json(result, output / "results.json")
    (output / "results.md").write_text(text)
    if args.json:
        write_json(result, args.json)
    print(text)
    print(f"wrote {output / 'results.json'}, {output / 'results.md'}")
    return 0
