"""`kandinsky-repository`: write a Triton model repository from an export bundle."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kandinsky_core.bundle import BundleError
from kandinsky_core.gpu_costs import GPUS, NO_GPU
from kandinsky_core.memory import BUDGET_FRACTION, GIB

from ..python_models.step_batching import STEP_BATCHING_MODES
from ..settings import DEFAULTS
from .gpu_backends import GPU_MAX_QUEUE_DELAY_US
from .repository import DEFAULT_MAX_IMAGE_SIZE, FLAVOURS, RepositoryOptions, generate_repository


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, required=True, help="export bundle (kandinsky-export output)")
    parser.add_argument("--output", type=Path, required=True, help="repository folder (replaced)")
    parser.add_argument("--flavour", choices=FLAVOURS, default="cpu")
    parser.add_argument("--max-image-size", type=int, default=DEFAULT_MAX_IMAGE_SIZE)
    parser.add_argument("--instances", type=int, default=1, help="instances per network model")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="cpu flavour: ONNX Runtime threads")
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        help=f"dynamic batching window of the per-step models (default: 0 on cpu, {GPU_MAX_QUEUE_DELAY_US} on GPUs)",
    )
    parser.add_argument(
        "--max-queue-size",
        type=int,
        default=DEFAULTS.max_queue_size,
        help="requests that may wait per once-per-image model; more are refused at once (retryable). "
        "The per-step models have no bound (a queue policy would slow every step; see docs/benchmarks.md)",
    )
    parser.add_argument(
        "--precision",
        choices=("default", "fp16", "fp32"),
        default="default",
        help="onnxruntime flavour: ONNX variant served (default: the bundle's measured choice per component)",
    )
    parser.add_argument(
        "--ort-tensorrt", action="store_true", help="onnxruntime flavour: TensorRT accelerator"
    )
    parser.add_argument(
        "--ort-trt-cache-dir",
        default="",
        help="its engine cache (default: <output>.ort_trt_cache, next to the repository, kept across runs)",
    )
    parser.add_argument(
        "--gpu",
        default=RepositoryOptions.gpu,
        help=f"timed flavour: the GPU whose modelled step times are replayed ({', '.join(GPUS)}; "
        f"{NO_GPU}: no time, to measure the python-stub hop)",
    )
    parser.add_argument("--gpu-costs", default="", help="timed flavour: an edited copy of gpu_costs.json")
    parser.add_argument(
        "--architecture",
        default=RepositoryOptions.architecture,
        help="timed flavour: whose costs are modelled (an architecture of the cost table)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="GPU flavours: no warm-up request at load")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="tensorrt flavour: no CUDA graphs")
    defaults = RepositoryOptions()
    parser.add_argument(
        "--max-concurrent-generations",
        type=int,
        default=defaults.max_concurrent_generations,
        help="server-side generations running at once (the `kandinsky` model)",
    )
    parser.add_argument(
        "--max-queued-generations",
        type=int,
        default=defaults.max_queued_generations,
        help="server-side generations waiting before new ones are refused as 'server busy'",
    )
    parser.add_argument(
        "--max-generation-seconds",
        type=float,
        default=defaults.max_generation_seconds,
        help="time limit of one server-side generation",
    )
    parser.add_argument(
        "--step-batching",
        choices=STEP_BATCHING_MODES,
        default=defaults.step_batching,
        help="how server-side generations send their denoising steps: off (each its own request; "
        "Triton's dynamic batcher merges what is queued) or on (one request per step of every "
        "generation in the same loop; see docs/benchmarks.md)",
    )
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=defaults.memory_budget_bytes / GIB,
        help="cpu flavour: host memory (GiB) the network calls may take at once; a request that can never "
        "fit is refused, server-side generations wait for room (default 0: "
        f"{BUDGET_FRACTION:.0%} of this machine's memory after the networks' weights)",
    )
    args = parser.parse_args(argv)
    if args.memory_budget_gib < 0:
        parser.error("--memory-budget-gib must be >= 0 (0: derived from this machine)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = RepositoryOptions(
        flavour=args.flavour,
        max_image_size=args.max_image_size,
        instances=args.instances,
        intra_op_threads=args.intra_op_threads,
        max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size,
        precision=args.precision,
        ort_tensorrt=args.ort_tensorrt,
        ort_trt_cache_dir=args.ort_trt_cache_dir,
        warmup=not args.no_warmup,
        cuda_graphs=not args.no_cuda_graphs,
        gpu=args.gpu,
        gpu_costs=args.gpu_costs,
        architecture=args.architecture,
        max_concurrent_generations=args.max_concurrent_generations,
        max_queued_generations=args.max_queued_generations,
        max_generation_seconds=args.max_generation_seconds,
        memory_budget_bytes=int(args.memory_budget_gib * GIB),
        step_batching=args.step_batching,
    )
    try:
        models = generate_repository(args.bundle, args.output, options)
    except (ValueError, KeyError, FileNotFoundError, BundleError) as error:
        print(f"kandinsky-repository: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(models)} models to {args.output}: {', '.join(models)}")
    return 0
