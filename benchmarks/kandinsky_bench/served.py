"""Text-to-image through Triton with the client loop, at several concurrencies, with server statistics.

Each concurrent worker is a thread with its own `KandinskyClient` (its own connection), running requests
back to back, as independent users would. Latency is the wall time of `text_to_image` as a caller sees
it; the client's own timings split it into prompt encoding, prior loop, decoder loop and image decoding.
Triton's cumulative statistics are read before and after each measured window; their difference says
how much of the window the models computed and how much went to queueing and tensor copies.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kandinsky_client.components import SERVED_MODELS
from kandinsky_client.pipeline import KandinskyClient
from tqdm.auto import tqdm

from .stats import overhead, parse_model_stats, server_time, stats_delta, summarize

logger = logging.getLogger(__name__)

STAGES = ("encode_prompt", "prior", "decoder", "decode_image")
# The served models each client stage calls (leaf models; encode_prompt and decode_image are ensembles).
STAGE_MODELS = {
    "encode_prompt": ("tokenizer", "text_encoder"),
    "prior": ("prior", "prior_postprocess"),
    "decoder": ("unet",),
    "decode_image": ("movq_decoder", "postprocess_image"),
}
ENSEMBLES = frozenset(name for name, spec in SERVED_MODELS.items() if spec.steps)
PROMPTS = (
    "a photograph of a red fox in the snow, highly detailed",
    "a lighthouse on a cliff at sunset, oil painting",
    "a bowl of ramen on a wooden table, studio lighting",
    "an astronaut riding a horse on the moon, digital art",
)


@dataclass(frozen=True)
class Request:
    """What every benchmark request asks for (the seed varies per request)."""

    height: int
    width: int
    prior_steps: int
    decoder_steps: int
    guidance_scale: float
    images_per_request: int = 1


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


def generate_once(client: KandinskyClient, request: Request, prompt: str, seed: int) -> dict[str, float]:
    """One text-to-image call; returns its wall latency and the client's per-stage timings."""
    start = time.perf_counter()
    generation = client.text_to_image(
        prompt,
        num_images_per_prompt=request.images_per_request,
        height=request.height,
        width=request.width,
        prior_steps=request.prior_steps,
        decoder_steps=request.decoder_steps,
        prior_guidance_scale=request.guidance_scale,
        decoder_guidance_scale=request.guidance_scale,
        seed=seed,
    )
    latency = time.perf_counter() - start
    if len(generation.images) != request.images_per_request:
        raise RuntimeError(f"asked for {request.images_per_request} images, got {len(generation.images)}")
    return {"latency": latency, **{k: float(v) for k, v in generation.timings.items()}}


def snapshot(client: KandinskyClient) -> dict[str, dict[str, int]]:
    return parse_model_stats(client.transport.inference_statistics())


def requests_per_worker(concurrency: int, repeats: int) -> int:
    """Every worker runs the same number of requests, and the window holds at least `repeats`."""
    return max(1, math.ceil(repeats / concurrency))


def run_level(
    url: str,
    protocol: str,
    request: Request,
    *,
    concurrency: int,
    repeats: int,
    stats_client: KandinskyClient,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure one concurrency level: `concurrency` workers, each running its share of the requests."""
    per_worker = requests_per_worker(concurrency, repeats)
    clients = [KandinskyClient(url, protocol=protocol) for _ in range(concurrency)]
    for client in clients:
        _ = client.info  # read the served configs before the window opens
    records: list[dict[str, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)
    bar = tqdm(
        total=per_worker * concurrency,
        desc=f"served, concurrency {concurrency}",
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
    after = snapshot(stats_client)
    bar.close()
    for client in clients:
        client.close()
    if errors:
        raise RuntimeError(f"a worker failed at concurrency {concurrency}") from errors[0]
    return summarize_level(concurrency, request, records, wall, stats_delta(before, after))


def summarize_level(
    concurrency: int,
    request: Request,
    records: list[dict[str, float]],
    wall_s: float,
    delta: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """Latency percentiles, throughput, server time per stage and the overhead share of one window."""
    count = len(records)
    leaves = sorted(m for m in delta if m not in ENSEMBLES)
    end_to_end = sum(r["latency"] for r in records)
    server = server_time(delta, leaves)
    stages: dict[str, Any] = {}
    for stage in STAGES:
        client_s = [r[stage] for r in records]
        compute = server_time(delta, STAGE_MODELS[stage])
        stages[stage] = {
            **summarize(client_s),
            "server_compute_per_request_s": compute["compute_infer"] / count,
            "server_request_per_request_s": compute["success"] / count,
        }
    per_model = {}
    for model in leaves:
        counters = delta[model]
        executions = counters.get("execution_count", 0)
        per_model[model] = {
            "requests": counters.get("success_count", 0),
            "executions": executions,
            "requests_per_execution": counters.get("success_count", 0) / executions if executions else 0.0,
            **{
                f"{k}_s": server_time(delta, [model])[k]
                for k in ("queue", "compute_input", "compute_infer", "compute_output", "success")
            },
        }
    return {
        "concurrency": concurrency,
        "requests": count,
        "images": count * request.images_per_request,
        "wall_s": wall_s,
        "images_per_s": count * request.images_per_request / wall_s,
        "latency": summarize([r["latency"] for r in records]),
        "client_total": summarize([r["total"] for r in records]),
        "stages": stages,
        "server_s": server,
        "overhead": {
            **overhead(end_to_end, server["compute_infer"]),
            # The split of the time outside compute: inside Triton (queue, tensor copies to and from the
            # python stub), and outside it (client work, serialization, transport, ensemble scheduling).
            "queue_s": server["queue"],
            "compute_io_s": server["compute_input"] + server["compute_output"],
            "client_and_transport_s": end_to_end - server["success"],
        },
        "models": per_model,
    }


def run_paired_level(
    request: Request,
    *,
    repeats: int,
    client: KandinskyClient,
    baseline_generate: Callable[[int], dict[str, float]],
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Concurrency 1, alternating served requests with baseline generations (ABBA order).

    On a shared machine the load drifts over minutes; alternating makes both sides see the same drift,
    so their ratio stays meaningful even when the absolute numbers move.
    """
    records: list[dict[str, float]] = []
    baseline_runs: list[dict[str, float]] = []
    before = snapshot(client)
    for i in tqdm(
        range(repeats),
        desc="served vs diffusers, alternating",
        unit="pair",
        leave=False,
        disable=not progress,
    ):
        order = ("served", "baseline") if i % 2 == 0 else ("baseline", "served")
        for side in order:
            if side == "served":
                records.append(generate_once(client, request, PROMPTS[0], seed=1000 + i))
            else:
                baseline_runs.append(baseline_generate(1000 + i))
    after = snapshot(client)
    # The window also holds the baseline's runs: throughput counts the served requests' own time.
    level = summarize_level(
        1, request, records, sum(r["latency"] for r in records), stats_delta(before, after)
    )
    level["interleaved_with_baseline"] = True
    return level, baseline_runs


def run_served(
    url: str,
    protocol: str,
    request: Request,
    *,
    concurrency_levels: list[int],
    warmup: int,
    repeats: int,
    baseline: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Warm up, then measure each concurrency level in turn.

    With a `baseline` (a `DiffusersBaseline`), concurrency 1 alternates served and baseline runs; the
    baseline's runs come back under "baseline_runs".
    """
    result: dict[str, Any] = {"protocol": protocol, "server_version": server_version(url, protocol)}
    with KandinskyClient(url, protocol=protocol) as client:
        for k in tqdm(range(warmup), desc="warm-up", unit="request", leave=False, disable=not progress):
            generate_once(client, request, PROMPTS[0], seed=k)
            if baseline is not None:
                baseline.generate(k)
        levels = []
        for concurrency in concurrency_levels:
            if concurrency == 1 and baseline is not None:
                level, result["baseline_runs"] = run_paired_level(
                    request,
                    repeats=repeats,
                    client=client,
                    baseline_generate=baseline.generate,
                    progress=progress,
                )
            else:
                level = run_level(
                    url,
                    protocol,
                    request,
                    concurrency=concurrency,
                    repeats=repeats,
                    stats_client=client,
                    progress=progress,
                )
            logger.info(
                "concurrency %d: p50 %.3fs, %.3f images/s, overhead %.1f%%",
                concurrency,
                level["latency"]["p50"],
                level["images_per_s"],
                100 * level["overhead"]["share"],
            )
            levels.append(level)
    result["levels"] = levels
    return result
