"""Runs a benchmark plan: artifacts, components, the diffusers baseline and the served measurements.

The order keeps measurements from competing for the machine: components first, then the server starts;
at concurrency 1 the client loop, the server loop and diffusers take turns request by request, then the
higher concurrencies run one loop per window, then both loops behind the delaying proxy (added round trip).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import machine as machine_info

PARTS = ("components", "baseline", "served", "rtt")


@dataclass(frozen=True)
class BenchmarkPlan:
    """What to measure and how; the command line fills it (see cli.py for each field's meaning)."""

    preset: str
    height: int
    width: int
    prior_num_inference_steps: int
    num_inference_steps: int
    repeats: int
    component_repeats: int
    warmup: int
    guidance_scale: float = 4.0
    prior_guidance_scale: float | None = None  # None: guidance_scale
    num_images_per_prompt: int = 1
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    loops: list[str] = field(default_factory=lambda: ["client", "server"])
    rtt_ms: list[float] = field(default_factory=lambda: [0.0, 1.0, 10.0])
    components: list[str] | None = None
    ort_sweep: bool = False
    skip: list[str] = field(default_factory=list)
    protocol: str = "grpc"
    url: str | None = None
    flavour: str = "cpu"
    instances: int = 1
    intra_op_threads: int = 0
    max_queue_delay_us: int = 0
    no_interleave: bool = False
    no_progress: bool = False
    checkpoint: Path | None = None
    artifacts: Path | None = None
    output: Path | None = None
    command: str = ""


def artifacts_folder(plan: BenchmarkPlan) -> Path:
    """artifacts/<preset>, or the folder holding a given checkpoint/ (so its bundle sits beside it)."""
    if plan.artifacts:
        return plan.artifacts
    if plan.checkpoint:
        checkpoint = plan.checkpoint.resolve()
        return checkpoint.parent if checkpoint.name == "checkpoint" else Path("artifacts") / checkpoint.name
    return Path("artifacts") / plan.preset


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_benchmark(plan: BenchmarkPlan) -> dict[str, Any]:
    """Every measurement the plan asks for, as one result dictionary (report.py writes it out)."""
    from kandinsky_core.bundle import read_manifest
    from kandinsky_export.checkpoint import Checkpoint
    from kandinsky_repository.generator.repository import RepositoryOptions
    from kandinsky_repository.serving.triton import TritonServer, free_port

    from .artifacts import ensure_artifacts
    from .baseline import DiffusersBaseline, run_baseline
    from .components import bench_component, ort_variants
    from .served import PROMPTS, Request, run_rtt, run_served, server_version

    progress = not plan.no_progress
    started = dt.datetime.now().astimezone()
    output = plan.output or Path("benchmarks/results") / f"{plan.preset}-{started:%Y%m%d-%H%M%S}"
    output.mkdir(parents=True, exist_ok=True)
    options = RepositoryOptions(
        flavour=plan.flavour,
        max_image_size=max(1024, plan.height, plan.width),
        instances=plan.instances,
        intra_op_threads=plan.intra_op_threads,
        max_queue_delay_us=plan.max_queue_delay_us,
    )
    artifacts = ensure_artifacts(
        artifacts_folder(plan),
        preset=None if plan.checkpoint else plan.preset,
        checkpoint_root=plan.checkpoint,
        repository_options=None if plan.url else options,
    )
    device = torch_device()
    import onnxruntime as ort
    import torch

    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # the baseline as a user would run it: every core
    torch_threads = torch.get_num_threads()

    prior_guidance = plan.guidance_scale if plan.prior_guidance_scale is None else plan.prior_guidance_scale
    cuda_ep = device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": plan.command,
        "settings": {
            "preset": plan.preset,
            "checkpoint": str(artifacts.checkpoint_root),
            "bundle": str(artifacts.bundle),
            "repository": str(artifacts.repository),
            "height": plan.height,
            "width": plan.width,
            "prior_num_inference_steps": plan.prior_num_inference_steps,
            "num_inference_steps": plan.num_inference_steps,
            "guidance_scale": plan.guidance_scale,
            "prior_guidance_scale": prior_guidance,
            "num_images_per_prompt": plan.num_images_per_prompt,
            "warmup": plan.warmup,
            "repeats": plan.repeats,
            "component_repeats": plan.component_repeats,
            "loops": plan.loops,
            "concurrency": plan.concurrency,
            "rtt_ms": plan.rtt_ms,
            "protocol": plan.protocol,
            "server": plan.url or "started by the benchmark on the generated repository",
            "torch_device": device,
            "torch_threads": torch_threads,
            "repository_options": dict(options.__dict__),
        },
        "machine": machine_info.machine(),
        "versions": machine_info.versions(),
        "artifacts_built_s": artifacts.built,
    }

    if "components" not in plan.skip:
        checkpoint = Checkpoint.from_root(artifacts.checkpoint_root)
        names = plan.components or list(read_manifest(artifacts.bundle)["components"])
        variants = ort_variants(plan.ort_sweep, os.cpu_count() or 1, cuda_ep)
        from tqdm.auto import tqdm

        result["components"] = [
            bench_component(
                checkpoint,
                artifacts.bundle,
                name,
                images=plan.num_images_per_prompt,
                height=plan.height,
                width=plan.width,
                warmup=plan.warmup,
                repeats=plan.component_repeats,
                variants=variants,
                torch_device=device,
                torch_sweep_threads=(1,) if plan.ort_sweep and device == "cpu" and torch_threads > 1 else (),
                progress=progress,
            )
            for name in tqdm(names, desc="components", unit="component", disable=not progress)
        ]
        gc.collect()

    baseline = None
    if "baseline" not in plan.skip:
        baseline = DiffusersBaseline(
            artifacts.checkpoint_root,
            prompt=PROMPTS[0],
            height=plan.height,
            width=plan.width,
            prior_num_inference_steps=plan.prior_num_inference_steps,
            num_inference_steps=plan.num_inference_steps,
            guidance_scale=plan.guidance_scale,
            prior_guidance_scale=prior_guidance,
            device=device,
            dtype="float16" if device == "cuda" else "float32",
        )
    interleave = baseline is not None and "served" not in plan.skip and 1 in plan.concurrency
    if interleave and plan.no_interleave:
        interleave = False
    if baseline is not None and not interleave:
        result["baseline"] = run_baseline(
            baseline, warmup=plan.warmup, repeats=plan.repeats, progress=progress
        )

    served_parts = [part for part in ("served", "rtt") if part not in plan.skip]
    if served_parts:
        request = Request(
            height=plan.height,
            width=plan.width,
            prior_num_inference_steps=plan.prior_num_inference_steps,
            num_inference_steps=plan.num_inference_steps,
            guidance_scale=plan.guidance_scale,
            prior_guidance_scale=prior_guidance,
            num_images_per_prompt=plan.num_images_per_prompt,
        )
        with contextlib.ExitStack() as stack:
            url = plan.url
            if url is None:
                server = TritonServer(
                    artifacts.repository,
                    http_port=free_port(),
                    grpc_port=free_port(),
                    metrics_port=free_port(),
                    log_file=output / "tritonserver.log",
                )
                stack.enter_context(server)
                url = server.grpc_url if plan.protocol == "grpc" else server.http_url
            served: dict[str, Any] = {"protocol": plan.protocol, "loops": plan.loops}
            if "served" in served_parts:
                served = run_served(
                    url,
                    plan.protocol,
                    request,
                    loops=plan.loops,
                    concurrency_levels=plan.concurrency,
                    warmup=plan.warmup,
                    repeats=plan.repeats,
                    baseline=baseline if interleave else None,
                    progress=progress,
                )
            if "rtt" in served_parts and plan.rtt_ms:
                result["machine"]["load_average_before_rtt"] = machine_info.load_average()
                served["rtt"] = run_rtt(
                    url,
                    plan.protocol,
                    request,
                    loops=plan.loops,
                    rtt_ms=plan.rtt_ms,
                    warmup=plan.warmup,
                    repeats=plan.repeats,
                    progress=progress,
                )
            if "server_version" not in served:
                served["server_version"] = server_version(url, plan.protocol)
        if interleave:
            result["baseline"] = baseline.summarize(served.pop("baseline_runs"), interleaved=True)
        result["served"] = served
        result["versions"]["tritonserver"] = served["server_version"]
    del baseline
    gc.collect()

    result["machine"]["load_average_end"] = machine_info.load_average()
    result["output"] = str(output)
    return result
