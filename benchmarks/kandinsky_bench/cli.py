"""`kandinsky-bench`: components, both served loops end to end, the diffusers baseline, overhead, added
network round trip; JSON + table + chart.

    kandinsky-bench --preset small        # CPU: 512x512, 10 prior + 20 decoder steps
    kandinsky-bench --preset tiny --height 512 --width 512 --prior-num-inference-steps 25 \
        --num-inference-steps 50 --skip components baseline    # the loops' overhead
    kandinsky-bench --preset tiny --repeats 2 --component-repeats 2 --concurrency 1 2 --rtt-ms 0 1   # smoke

Builds what it needs under artifacts/<preset>/ (checkpoint -> ONNX bundle -> Triton repository) and
reuses it when present. Times the components first, then starts a Triton server on the repository; at
concurrency 1 the client loop, the server loop and diffusers take turns; then higher concurrencies; then
both loops at concurrency 1 behind a proxy adding each --rtt-ms round trip. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from .report import markdown, write_all
from .runner import PARTS, BenchmarkPlan, run_benchmark
from .served import LOOPS

logger = logging.getLogger("kandinsky_bench")

# The one table of preset defaults: the command line's defaults and its --help come from it.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # A smoke run: keeps the command working; its numbers mean nothing.
    "tiny": {
        "height": 64,
        "width": 64,
        "prior_num_inference_steps": 2,
        "num_inference_steps": 2,
        "repeats": 3,
        "component_repeats": 5,
        "warmup": 1,
    },
    # The CPU benchmark of the targets.
    "small": {
        "height": 512,
        "width": 512,
        "prior_num_inference_steps": 10,
        "num_inference_steps": 20,
        "repeats": 5,
        "component_repeats": 10,
        "warmup": 1,
    },
    # The released sizes, for a GPU.
    "full": {
        "height": 768,
        "width": 768,
        "prior_num_inference_steps": 25,
        "num_inference_steps": 50,
        "repeats": 10,
        "component_repeats": 20,
        "warmup": 2,
    },
}


def presets_help() -> str:
    lines = ["preset defaults (options given on the command line win):"]
    for name, values in PRESET_DEFAULTS.items():
        lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kandinsky-bench",
        description=__doc__,
        epilog=presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESET_DEFAULTS),
        default="small",
        help="model size and default settings (default: small)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="benchmark this diffusers checkpoint root (prior/, decoder/) instead of the preset's",
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        help="where checkpoint/, onnx/, model_repository/ live (default: artifacts/<preset>)",
    )
    parser.add_argument(
        "--output", type=Path, help="results folder (default: benchmarks/results/<preset>-<timestamp>)"
    )
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--prior-num-inference-steps", type=int, help="prior denoising steps")
    parser.add_argument("--num-inference-steps", type=int, help="decoder (UNet) denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="decoder guidance (default 4)")
    parser.add_argument(
        "--prior-guidance-scale", type=float, help="prior guidance (default: --guidance-scale)"
    )
    parser.add_argument("--num-images-per-prompt", type=int, default=1)
    parser.add_argument("--warmup", type=int, help="untimed runs before each measurement")
    parser.add_argument("--repeats", type=int, help="timed end-to-end requests (at least) per measurement")
    parser.add_argument("--component-repeats", type=int, help="timed calls per component and runtime")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--loops",
        nargs="+",
        choices=LOOPS,
        default=list(LOOPS),
        help="where the denoising loops run: client (one request per step), server (the kandinsky model)",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        nargs="*",
        default=[0.0, 1.0, 10.0],
        help="added network round trips (ms) to measure both loops at, concurrency 1, through a delaying "
        "proxy on loopback; 0 = no proxy; none = skip (default: 0 1 10)",
    )
    parser.add_argument("--components", nargs="*", help="components to time (default: every exported one)")
    parser.add_argument(
        "--ort-sweep",
        action="store_true",
        help="also time components under other ONNX Runtime settings (optimisation level, threads, "
        "spinning) and PyTorch with one thread",
    )
    parser.add_argument("--skip", nargs="*", choices=PARTS, default=[], help="parts not to run")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument(
        "--url",
        help="measure an already running Triton server serving the same checkpoint (e.g. the NGC image on "
        "a GPU) instead of starting one on the generated repository",
    )
    parser.add_argument(
        "--flavour",
        choices=("cpu", "onnxruntime", "tensorrt"),
        default="cpu",
        help="repository flavour (GPU flavours need the NGC Triton image)",
    )
    parser.add_argument("--instances", type=int, default=1, help="Triton instances per network model")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime threads per served model (0: its default, one per core)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="dynamic batching window of the per-step models (prior, unet)",
    )
    parser.add_argument(
        "--no-interleave",
        action="store_true",
        help="run the diffusers baseline on its own before the server starts, instead of alternating it "
        "with the served requests at concurrency 1",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for key, value in PRESET_DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.component_repeats < 1 or args.warmup < 0:
        parser.error("repeats must be >= 1 and warm-up >= 0")
    if any(c < 1 for c in args.concurrency):
        parser.error("concurrency levels must be >= 1")
    args.loops = list(dict.fromkeys(args.loops))
    if any(r < 0 for r in args.rtt_ms):
        parser.error("round trips must be >= 0 ms")
    return args


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["failover"]:  # `kandinsky-bench failover ...`: replicas killed under load
        from .failover import main as failover_main

        return failover_main(arguments[1:])
    if arguments[:1] == ["schedulers"]:  # `kandinsky-bench schedulers ...`: scheduler vs model time per step
        from .schedulers import main as schedulers_main

        return schedulers_main(arguments[1:])
    if arguments[:1] == ["flops"]:  # `kandinsky-bench flops ...`: the counts behind the timed flavour's costs
        from .flops import main as flops_main

        return flops_main(arguments[1:])
    if arguments[:1] == ["timed"]:  # `kandinsky-bench timed ...`: both loops on the timed flavour (modelled)
        from .timed import main as timed_main

        return timed_main(arguments[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    command = "kandinsky-bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    fields = {f.name for f in dataclasses.fields(BenchmarkPlan)} - {"command"}
    plan = BenchmarkPlan(**{k: v for k, v in vars(args).items() if k in fields}, command=command)
    result = run_benchmark(plan)
    paths = write_all(result, Path(result["output"]))
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
