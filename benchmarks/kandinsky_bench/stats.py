"""The arithmetic of the benchmark: percentiles, Triton statistics deltas, and the overhead share.

Kept free of I/O so that unit tests can check every number the report prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
# Triton's per-request durations (inference_stats); "success" is the whole request inside the server.
TRITON_DURATIONS = ("success", "queue", "compute_input", "compute_infer", "compute_output")
# Parsed counter of the executions at one batch size: f"{BATCH_EXECUTIONS_PREFIX}{rows}".
BATCH_EXECUTIONS_PREFIX = "executions_at_batch_"


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default), so p50 of [1, 2] is 1.5."""
    if not len(samples):
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99, mean, min, max and the count of a list of durations (seconds).

    With few samples p99 is close to the maximum: the count is kept so a reader can tell.
    """
    values = [float(s) for s in samples]
    summary = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    summary.update(
        mean=float(np.mean(values)),
        min=float(np.min(values)),
        max=float(np.max(values)),
        n=len(values),
    )
    return summary


def _as_int(value: Any) -> int:
    """gRPC's JSON renders uint64 counters as strings; HTTP as numbers; absent means zero."""
    return int(value) if value not in (None, "") else 0


def parse_model_stats(raw: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Triton's statistics JSON -> {model: {"<duration>_ns", "<duration>_count", "inference_count",
    "execution_count", "executions_at_batch_<rows>"}} with integers, summed over versions."""
    parsed: dict[str, dict[str, int]] = {}
    for model in raw.get("model_stats", []):
        out = parsed.setdefault(model["name"], {})
        stats = model.get("inference_stats", {})
        for key in TRITON_DURATIONS:
            entry = stats.get(key, {})
            out[f"{key}_ns"] = out.get(f"{key}_ns", 0) + _as_int(entry.get("ns"))
            out[f"{key}_count"] = out.get(f"{key}_count", 0) + _as_int(entry.get("count"))
        for key in ("inference_count", "execution_count"):
            out[key] = out.get(key, 0) + _as_int(model.get(key))
        for batch in model.get("batch_stats", []):
            key = f"{BATCH_EXECUTIONS_PREFIX}{_as_int(batch.get('batch_size'))}"
            out[key] = out.get(key, 0) + _as_int(batch.get("compute_infer", {}).get("count"))
    return parsed


def executions_by_batch(counters: Mapping[str, int]) -> dict[int, int]:
    """{batch rows: executions} from parsed counters (or their delta): the batches a model really ran.

    Triton counts each execution under its total batch (`batch_stats`), so the mean rows per execution
    hides nothing here: e.g. what a cost that is not linear in the rows adds up to.
    """
    found = {
        int(key[len(BATCH_EXECUTIONS_PREFIX) :]): value
        for key, value in counters.items()
        if key.startswith(BATCH_EXECUTIONS_PREFIX) and value
    }
    return dict(sorted(found.items()))


def stats_delta(
    before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    """Counters accumulated between two snapshots, per model (a model absent before starts at zero)."""
    delta: dict[str, dict[str, int]] = {}
    for model, counters in after.items():
        base = before.get(model, {})
        delta[model] = {key: value - base.get(key, 0) for key, value in counters.items()}
        if any(v < 0 for v in delta[model].values()):
            raise ValueError(f"statistics of '{model}' went backwards: was the server restarted?")
    return delta


def server_time(delta: Mapping[str, Mapping[str, int]], models: Iterable[str]) -> dict[str, float]:
    """Seconds of each Triton duration summed over `models` (leaf models only: an ensemble's own
    statistics repeat its steps' time and would count it twice)."""
    totals = dict.fromkeys(TRITON_DURATIONS, 0.0)
    for model in models:
        counters = delta.get(model, {})
        for key in TRITON_DURATIONS:
            totals[key] += counters.get(f"{key}_ns", 0) / 1e9
    return totals


def overhead(end_to_end_s: float, compute_s: float) -> dict[str, float]:
    """Time outside model compute and its share of the end-to-end time.

    `end_to_end_s`: client wall time summed over the requests of the window; `compute_s`: Triton's
    compute_infer summed over the same window (the network's run, plus the python model's glue around
    it). Everything else is client work, serialization, transport, queueing and tensor copies.
    """
    if end_to_end_s <= 0 or not math.isfinite(end_to_end_s):
        raise ValueError(f"end-to-end time must be positive, got {end_to_end_s}")
    outside = end_to_end_s - compute_s
    return {
        "end_to_end_s": end_to_end_s,
        "compute_s": compute_s,
        "outside_s": outside,
        "share": outside / end_to_end_s,
    }


def speedup(baseline_s: float, candidate_s: float) -> float:
    """How many times faster the candidate is (> 1: faster than the baseline)."""
    if candidate_s <= 0:
        raise ValueError(f"candidate time must be positive, got {candidate_s}")
    return baseline_s / candidate_s


def per_execution(counters: Mapping[str, int]) -> dict[str, float]:
    """How many requests, and how many batch items, one execution of a model served (deltas).

    `requests_per_execution` = successful requests / executions: above 1, the dynamic batcher merged
    requests. `inferences_per_execution` = Triton's inference_count / execution_count: inference_count
    counts batch items (a request of batch 2, as classifier-free guidance sends, counts 2), so it is the
    mean batch an execution ran. Both are 0 for a model that did not run.
    """
    executions = counters.get("execution_count", 0)
    if not executions:
        return {"requests_per_execution": 0.0, "inferences_per_execution": 0.0}
    return {
        "requests_per_execution": counters.get("success_count", 0) / executions,
        "inferences_per_execution": counters.get("inference_count", 0) / executions,
    }
