"""Repeat a callable after warm-up and keep every duration: the one timing loop of the benchmarks and
the GPU check (scripts/gpu_check.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from tqdm.auto import tqdm


def time_calls(
    call: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    desc: str = "",
    progress: bool = True,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Run `call` `warmup` times untimed, then `repeats` times; returns the timed durations (seconds).

    Warm-up absorbs one-off costs (ONNX Runtime's first-run allocations, oneDNN primitive creation,
    lazy imports) that a served model pays once and a user never sees again. `sync` (e.g.
    `torch.cuda.synchronize`) runs after every call, inside the timed span: GPU work is asynchronous.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    finish = sync or (lambda: None)
    for _ in range(warmup):
        call()
    finish()
    durations = []
    for _ in tqdm(range(repeats), desc=desc, unit="run", leave=False, disable=not progress):
        start = time.perf_counter()
        call()
        finish()
        durations.append(time.perf_counter() - start)
    return durations


def median_seconds(call: Callable[[], object], **options: object) -> float:
    """The median of `time_calls(call, **options)`: the one number a per-call comparison reports."""
    return statistics.median(time_calls(call, **options))  # type: ignore[arg-type]


def time_alternating(
    calls: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    desc: str = "",
    progress: bool = True,
) -> dict[str, list[float]]:
    """Like `time_calls` for several callables that take turns: one call of each per round.

    Timing runtimes one after the other on a shared machine compares the load of two moments; taking
    turns spreads any change of load over all of them. The order reverses every round, so no runner
    always follows the same neighbour.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        for call in calls.values():
            call()
    durations: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for round_index in tqdm(range(repeats), desc=desc, unit="round", leave=False, disable=not progress):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            calls[name]()
            durations[name].append(time.perf_counter() - start)
    return durations
