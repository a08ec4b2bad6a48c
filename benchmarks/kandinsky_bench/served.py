"""Text-to-image through Triton on both loops, at several concurrencies and added round trips.

- *client loop* (`KandinskyClient(url, protocol, loop="client")`): the denoising loops run in this
  process, one Triton request per network evaluation;
- *server loop* (`loop="server"`): one streamed request per generation to the `kandinsky` model, which
  runs the same generation core next to the models (BLS requests).

Each concurrent worker is a thread with its own `KandinskyClient` (its own connection), running requests
back to back, as independent users would. Latency is the wall time of `text_to_image` as a caller sees
it; the generation's own timings (measured where the loop ran) split it into stages. Triton's cumulative
statistics are read before and after each measured window; their difference says how much of the window
the network models computed, how much went to queueing and tensor copies, and how many requests each
model execution served (dynamic batching).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kandinsky_client.pipeline import KandinskyClient
from kandinsky_core.components import SERVED_MODELS
from kandinsky_core.wire import MODEL_NAME as GENERATION_MODEL
from tqdm.auto import tqdm

from .proxy import proxy_process
from .stats import (
    executions_by_batch,
    overhead,
    parse_model_stats,
    per_execution,
    server_time,
    stats_delta,
    summarize,
)

logger = logging.getLogger(__name__)

LOOPS = ("client", "server")
STAGES = ("encode_prompt", "prior", "decoder", "decode_image")
# The served models each stage calls (leaf models; encode_prompt and decode_image are ensembles).
STAGE_MODELS = {
    "encode_prompt": ("tokenizer", "text_encoder"),
    "prior": ("prior", "prior_postprocess"),
    "decoder": ("unet",),
    "decode_image": ("movq_decoder", "postprocess_image"),
}
# Models whose statistics are not model compute: ensembles repeat their steps' time, and the server
# loop's `kandinsky` model is the loop itself (its requests last the whole generation).
ENSEMBLES = frozenset(name for name, spec in SERVED_MODELS.items() if spec.steps)
NOT_COMPUTE = ENSEMBLES | {GENERATION_MODEL}
PROMPTS = (
    "a photograph of a red fox in the snow, highly detailed",
    "a lighthouse on a cliff at sunset, oil painting",
    "a bowl of ramen on a wooden table, studio lighting",
    "an astronaut riding a horse on the moon, digital art",
)
Snapshot = dict[str, dict[str, int]]


@dataclass(frozen=True)
class Request:
    """What every benchmark request asks for (the seed varies per request); diffusers' names."""

    height: int
    width: int
    prior_num_inference_steps: int
    num_inference_steps: int
    guidance_scale: float
    prior_guidance_scale: float | None = None  # None: guidance_scale
    num_images_per_prompt: int = 1
    scheduler: str | None = None  # decoder scheduler, a diffusers class name; None: the checkpoint's

    @property
    def steps(self) -> int:
        """Denoising steps of one text-to-image generation (one prior run: no negative prompt)."""
        return self.prior_num_inference_steps + self.num_inference_steps

    def expected_requests(self, generations: int) -> dict[str, int]:
        """Requests the network models receive for `generations` text-to-image generations."""
        return {
            "prior": self.prior_num_inference_steps * generations,
            "unet": self.num_inference_steps * generations,
            "postprocess_image": generations,
        }

    def expected_rows(self, generations: int) -> dict[str, int]:
        """Batch rows the network models compute for `generations` text-to-image generations (Triton's
        `inference_count`): the same whether each step is its own request or steps travel together (the
        server loop's step batching merges requests, so their count is not known in advance)."""
        prior_guidance = (
            self.guidance_scale if self.prior_guidance_scale is None else self.prior_guidance_scale
        )
        images = self.num_images_per_prompt * generations
        return {
            "prior": self.prior_num_inference_steps * images * (2 if prior_guidance > 1 else 1),
            "unet": self.num_inference_steps * images * (2 if self.guidance_scale > 1 else 1),
            "postprocess_image": images,
        }

    def options(self) -> dict[str, Any]:
        """The request's keywords for `KandinskyClient.text_to_image` (GenerationRequest fields)."""
        prior_guidance = (
            self.guidance_scale if self.prior_guidance_scale is None else self.prior_guidance_scale
        )
        options: dict[str, Any] = {
            "num_images_per_prompt": self.num_images_per_prompt,
            "height": self.height,
            "width": self.width,
            "prior_num_inference_steps": self.prior_num_inference_steps,
            "num_inference_steps": self.num_inference_steps,
            "prior_guidance_scale": prior_guidance,
            "guidance_scale": self.guidance_scale,
        }
        if self.scheduler is not None:
            options["scheduler"] = self.scheduler
        return options


def add_subcommand_arguments(parser: argparse.ArgumentParser, *, size: int, num_inference_steps: int) -> None:
    """What every `kandinsky-bench <subcommand>` asks: the model, the loops and protocol, one request's shape."""
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--artifacts", type=Path, help="default: artifacts/<preset>")
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--height", type=int, default=size)
    parser.add_argument("--width", type=int, default=size)
    parser.add_argument("--prior-num-inference-steps", type=int, default=2)
    parser.add_argument("--num-inference-steps", type=int, default=num_inference_steps)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")


def server_version(url: str, protocol: str) -> str:
    if protocol == "grpc":
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(url)
        try:
            return str(client.get_server_metadata(as_json=True).get("version", "unknown"))
        finally:
            client.close()
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url)
    try:
        return str(client.get_server_metadata().get("version", "unknown"))
    finally:
        client.close()


def open_client(url: str, protocol: str, loop: str) -> KandinskyClient:
    """A client on `loop` that has read the served configs (outside any measured window)."""
    client = KandinskyClient(url, protocol=protocol, loop=loop)
    _ = client.info
    return client


def generate_once(client: KandinskyClient, request: Request, prompt: str, seed: int) -> dict[str, float]:
    """One text-to-image call; its wall latency and the generation's timings (seconds per stage, where
    the loop ran; `total` is the generation core's own time)."""
    start = time.perf_counter()
    generation = client.text_to_image(prompt, seed=seed, **request.options())
    latency = time.perf_counter() - start
    if len(generation.images) != request.num_images_per_prompt:
        raise RuntimeError(f"asked for {request.num_images_per_prompt} images, got {len(generation.images)}")
    record = {"latency": latency, **{k: float(v) for k, v in generation.timings.items()}}
    for stage in (*STAGES, "total"):
        record.setdefault(stage, 0.0)
    return record


def snapshot(client: KandinskyClient) -> Snapshot:
    return parse_model_stats(client.transport.inference_statistics())


def settled_delta(
    client: KandinskyClient,
    before: Snapshot,
    expected: Mapping[str, int],
    timeout_s: float = 2.0,
    counter: str = "success_count",
) -> dict[str, dict[str, int]]:
    """Statistics accumulated since `before`, read once every expected request (or, with `counter`
    "inference_count", every expected batch row) is counted.

    Triton records a request's statistics when the backend releases it, which can come a moment after
    the client has its response; reading at once could miss the window's last requests.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        delta = stats_delta(before, snapshot(client))
        missing = {
            model: (delta[model].get(counter, 0), count)
            for model, count in expected.items()
            if model in delta and delta[model].get(counter, 0) < count
        }
        if not missing or time.monotonic() > deadline:
            if missing:
                logger.warning("statistics still miss requests after %.1fs: %s", timeout_s, missing)
            return delta
        time.sleep(0.005)


def requests_per_worker(concurrency: int, repeats: int) -> int:
    """Every worker runs the same number of requests, and the window holds at least `repeats`."""
    return max(1, math.ceil(repeats / concurrency))


def run_level(
    url: str,
    protocol: str,
    request: Request,
    *,
    loop: str,
    concurrency: int,
    repeats: int,
    stats_client: KandinskyClient,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure one loop at one concurrency: `concurrency` workers, each running its share of requests."""
    per_worker = requests_per_worker(concurrency, repeats)
    clients = [open_client(url, protocol, loop) for _ in range(concurrency)]
    records: list[dict[str, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)
    bar = tqdm(
        total=per_worker * concurrency,
        desc=f"{loop} loop, concurrency {concurrency}",
        unit="request",
        leave=False,
        disable=not progress,
    )

    def worker(index: int, client: KandinskyClient) -> None:
        barrier.wait()
        try:
            for k in range(per_worker):
                prompt = PROMPTS[(index + k) % len(PROMPTS)]
                record = generate_once(client, request, prompt, seed=10_000 * concurrency + 100 * index + k)
                with lock:
                    records.append(record)
                    bar.update(1)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    before = snapshot(stats_client)
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    bar.close()
    for client in clients:
        client.close()
    if errors:
        raise RuntimeError(f"a worker failed ({loop} loop, concurrency {concurrency})") from errors[0]
    # Rows, not requests: the server loop's step batching sends fewer requests than there are steps.
    delta = settled_delta(
        stats_client, before, request.expected_rows(len(records)), counter="inference_count"
    )
    return summarize_level(concurrency, request, records, wall, delta, loop=loop)


def summarize_level(
    concurrency: int,
    request: Request,
    records: list[dict[str, float]],
    wall_s: float,
    delta: Mapping[str, Mapping[str, int]],
    *,
    loop: str = "client",
) -> dict[str, Any]:
    """Latency percentiles, throughput, server time per stage, the time outside model compute (also per
    denoising step) and requests per execution of one window."""
    count = len(records)
    compute_models = sorted(m for m in delta if m not in NOT_COMPUTE)
    end_to_end = sum(r["latency"] for r in records)
    generator = sum(r["total"] for r in records)
    server = server_time(delta, compute_models)
    stages: dict[str, Any] = {}
    for stage in STAGES:
        compute = server_time(delta, STAGE_MODELS[stage])
        stages[stage] = {
            **summarize([r[stage] for r in records]),
            "server_compute_per_request_s": compute["compute_infer"] / count,
            "server_request_per_request_s": compute["success"] / count,
        }
    per_model = {}
    for model in sorted(m for m in delta if m not in ENSEMBLES):
        counters = delta[model]
        times = server_time(delta, [model])
        per_model[model] = {
            "requests": counters.get("success_count", 0),
            "inferences": counters.get("inference_count", 0),
            "executions": counters.get("execution_count", 0),
            **per_execution(counters),
            # {rows: executions}: what the dynamic batcher formed (Triton's batch statistics).
            "executions_by_batch": executions_by_batch(counters),
            **{
                f"{k}_s": times[k]
                for k in ("queue", "compute_input", "compute_infer", "compute_output", "success")
            },
        }
    steps = request.steps * count
    base = overhead(end_to_end, server["compute_infer"])
    return {
        "loop": loop,
        "concurrency": concurrency,
        "requests": count,
        "images": count * request.num_images_per_prompt,
        "denoising_steps_per_request": request.steps,
        "wall_s": wall_s,
        "images_per_s": count * request.num_images_per_prompt / wall_s,
        "latency": summarize([r["latency"] for r in records]),
        "samples_s": [r["latency"] for r in records],  # in the order they ran (pairs at concurrency 1)
        "generation_total": summarize([r["total"] for r in records]),
        "stages": stages,
        "server_s": server,
        "overhead": {
            **base,
            # Per request and denoising step: the measure of what each step costs beyond compute.
            "outside_per_step_s": base["outside_s"] / steps,
            # Where the loop ran, outside the models: scheduler steps, guidance, per-step requests (their
            # serialization, transport or BLS, Triton queueing and tensor copies).
            "loop_outside_compute_s": generator - server["compute_infer"],
            # Outside the generation core: request checks, readiness, the generation request's encoding
            # and transport, PNG encoding and decoding (server loop), PIL conversion.
            "outside_loop_s": end_to_end - generator,
            # Inside Triton, around the network models: queueing and copies in and out of their stubs.
            "queue_s": server["queue"],
            "compute_io_s": server["compute_input"] + server["compute_output"],
            "client_and_transport_s": end_to_end - server["success"],
        },
        "models": per_model,
    }


def run_paired_level(
    request: Request,
    *,
    loops: list[str],
    repeats: int,
    clients: Mapping[str, KandinskyClient],
    stats_client: KandinskyClient,
    baseline_generate: Callable[[int], dict[str, float]] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """Concurrency 1 with the loops (and the diffusers baseline) taking turns, request by request.

    On a shared machine the load drifts over minutes; taking turns (the order rotating every round)
    makes every side see the same drift, so their ratios stay meaningful when the absolute numbers move.
    Each served request is bracketed by statistics reads, so each loop gets exactly its own deltas.
    """
    sides = [*loops, *(["baseline"] if baseline_generate is not None else [])]
    records: dict[str, list[dict[str, float]]] = {loop: [] for loop in loops}
    deltas: dict[str, dict[str, dict[str, int]]] = {loop: {} for loop in loops}
    baseline_runs: list[dict[str, float]] = []
    for i in tqdm(
        range(repeats), desc="concurrency 1, taking turns", unit="round", leave=False, disable=not progress
    ):
        shift = i % len(sides)
        for side in sides[shift:] + sides[:shift]:
            if side == "baseline":
                baseline_runs.append(baseline_generate(1000 + i))
                continue
            before = snapshot(stats_client)
            records[side].append(generate_once(clients[side], request, PROMPTS[0], seed=1000 + i))
            delta = settled_delta(stats_client, before, request.expected_requests(1))
            for model, counters in delta.items():
                total = deltas[side].setdefault(model, {})
                for key, value in counters.items():
                    total[key] = total.get(key, 0) + value
    levels = []
    for loop in loops:
        # The turns of the other sides do not count: throughput is the loop's requests over their own time.
        wall = sum(r["latency"] for r in records[loop])
        level = summarize_level(1, request, records[loop], wall, deltas[loop], loop=loop)
        level["taking_turns_with"] = [side for side in sides if side != loop]
        levels.append(level)
    return levels, baseline_runs


def log_level(level: Mapping[str, Any]) -> None:
    logger.info(
        "%s loop, concurrency %d: p50 %.3fs, %.3f images/s, outside compute %.2f ms/step",
        level["loop"],
        level["concurrency"],
        level["latency"]["p50"],
        level["images_per_s"],
        1e3 * level["overhead"]["outside_per_step_s"],
    )


def run_served(
    url: str,
    protocol: str,
    request: Request,
    *,
    loops: list[str],
    concurrency_levels: list[int],
    warmup: int,
    repeats: int,
    baseline: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Warm up, then measure every loop at each concurrency level.

    Concurrency 1 runs the loops (and the `baseline`, a `DiffusersBaseline`, when given) taking turns
    request by request; the baseline's runs come back under "baseline_runs". Higher levels measure one
    loop per window, the loops' order alternating from level to level.
    """
    result: dict[str, Any] = {
        "protocol": protocol,
        "server_version": server_version(url, protocol),
        "loops": list(loops),
    }
    clients = {loop: open_client(url, protocol, loop) for loop in loops}
    stats_client = clients[loops[0]]
    try:
        total = warmup * (len(loops) + (baseline is not None))
        with tqdm(total=total, desc="warm-up", unit="request", leave=False, disable=not progress) as bar:
            for k in range(warmup):
                for loop in loops:
                    generate_once(clients[loop], request, PROMPTS[0], seed=k)
                    bar.update(1)
                if baseline is not None:
                    baseline.generate(k)
                    bar.update(1)
        levels: list[dict[str, Any]] = []
        for index, concurrency in enumerate(concurrency_levels):
            if concurrency == 1:
                paired, runs = run_paired_level(
                    request,
                    loops=loops,
                    repeats=repeats,
                    clients=clients,
                    stats_client=stats_client,
                    baseline_generate=baseline.generate if baseline is not None else None,
                    progress=progress,
                )
                if baseline is not None:
                    result["baseline_runs"] = runs
                for level in paired:
                    log_level(level)
                levels += paired
                continue
            for loop in loops if index % 2 == 0 else list(reversed(loops)):
                level = run_level(
                    url,
                    protocol,
                    request,
                    loop=loop,
                    concurrency=concurrency,
                    repeats=repeats,
                    stats_client=stats_client,
                    progress=progress,
                )
                log_level(level)
                levels.append(level)
    finally:
        for client in clients.values():
            client.close()
    result["levels"] = sorted(levels, key=lambda lv: (lv["concurrency"], loops.index(lv["loop"])))
    return result


# -- added network round trip ----------------------------------------------------------------------


def measured_round_trip(client: KandinskyClient, direct: KandinskyClient, calls: int = 20) -> float:
    """Median extra seconds a trivial call (is_server_live) takes through `client` compared with `direct`."""

    def median_call(c: KandinskyClient) -> float:
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            c.transport.check_live()
            samples.append(time.perf_counter() - start)
        return summarize(samples)["p50"]

    median_call(client)  # connect
    return median_call(client) - median_call(direct)


def run_rtt(
    url: str,
    protocol: str,
    request: Request,
    *,
    loops: list[str],
    rtt_ms: list[float],
    warmup: int,
    repeats: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Both loops at concurrency 1 behind a proxy adding `rtt_ms` of round trip (0: no proxy).

    The loops take turns request by request. One row per (round trip, loop) with its latency summary.
    """
    rows: list[dict[str, Any]] = []
    direct = open_client(url, protocol, loops[0])
    try:
        for rtt in tqdm(rtt_ms, desc="added round trip", unit="setting", leave=False, disable=not progress):
            rows += _rtt_setting(url, protocol, request, loops, rtt, warmup, repeats, direct, progress)
    finally:
        direct.close()
    return rows


def _rtt_setting(
    url: str,
    protocol: str,
    request: Request,
    loops: list[str],
    rtt: float,
    warmup: int,
    repeats: int,
    direct: KandinskyClient,
    progress: bool,
) -> list[dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        target = url if rtt == 0 else stack.enter_context(proxy_process(url, rtt))
        clients = {loop: stack.enter_context(open_client(target, protocol, loop)) for loop in loops}
        measured = measured_round_trip(clients[loops[0]], direct) if rtt else 0.0
        for k in range(max(warmup, 1)):  # at least once: connections, readiness, the server's caches
            for loop in loops:
                generate_once(clients[loop], request, PROMPTS[0], seed=k)
        records: dict[str, list[dict[str, float]]] = {loop: [] for loop in loops}
        for i in tqdm(range(repeats), desc=f"+{rtt:g} ms", unit="round", leave=False, disable=not progress):
            for loop in loops if i % 2 == 0 else list(reversed(loops)):
                records[loop].append(generate_once(clients[loop], request, PROMPTS[0], seed=2000 + i))
    rows = []
    for loop in loops:
        runs = records[loop]
        rows.append(
            {
                "loop": loop,
                "rtt_ms": rtt,
                "measured_rtt_ms": 1e3 * measured,
                "concurrency": 1,
                "requests": len(runs),
                "latency": summarize([r["latency"] for r in runs]),
                "samples_s": [r["latency"] for r in runs],  # round i of each loop ran back to back
                "images_per_s": len(runs) * request.num_images_per_prompt / sum(r["latency"] for r in runs),
                "stages": {stage: summarize([r[stage] for r in runs]) for stage in STAGES},
            }
        )
        logger.info("%s loop, +%g ms round trip: p50 %.3fs", loop, rtt, rows[-1]["latency"]["p50"])
    return rows
