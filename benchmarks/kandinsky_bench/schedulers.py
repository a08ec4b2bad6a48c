"""`kandinsky-bench schedulers`: each decoder scheduler's own time per step next to the UNet's, per loop.

    kandinsky-bench schedulers --preset tiny --height 512 --width 512

For every decoder scheduler (`DECODER_SCHEDULERS`) and both loops, text-to-image generations at a fixed
step count, reporting per decoder step:
- the scheduler's own numpy time (`decoder_scheduler` in the generation's timings, measured where the
  loop ran: in this process for the client loop, in the `kandinsky` model for the server loop);
- the UNet's compute per request (Triton's `compute_infer` statistics over the same window);
- the end-to-end p50.
Then the end-to-end row that matters to a user: DPM-Solver++ at 20 decoder steps against DDPM at 50.
Runs one server (the artifacts' repository) on loopback; prints a markdown table, optionally JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any

from kandinsky_core.generation import DECODER_STAGE, scheduler_stage
from kandinsky_core.schedulers.factory import DECODER_SCHEDULERS
from tqdm.auto import tqdm

from .served import PROMPTS, add_subcommand_arguments, open_client, settled_delta, snapshot
from .stats import percentile

logger = logging.getLogger(__name__)

# The comparison users ask for: DPM-Solver++ (2M) at DPM-Solver's recommended 20 steps vs DDPM at 50.
FEW_STEPS = ("DPMSolverMultistepScheduler", 20)
MANY_STEPS = ("DDPMScheduler", 50)


@dataclass(frozen=True)
class SchedulerRun:
    scheduler: str
    num_inference_steps: int
    loop: str


def measure(client: Any, run: SchedulerRun, args: argparse.Namespace) -> dict[str, Any]:
    """`args.repeats` generations (after one warm-up) of `run`; per-step scheduler and UNet times."""
    options = {
        "height": args.height,
        "width": args.width,
        "prior_num_inference_steps": args.prior_num_inference_steps,
        "num_inference_steps": run.num_inference_steps,
        "scheduler": run.scheduler,
    }
    client.text_to_image(PROMPTS[0], seed=0, **options)  # warm-up: sessions, caches, first-call costs
    before = snapshot(client)
    latencies, scheduler_s = [], 0.0
    for i in range(args.repeats):
        start = time.perf_counter()
        generation = client.text_to_image(PROMPTS[i % len(PROMPTS)], seed=i + 1, **options)
        latencies.append(time.perf_counter() - start)
        scheduler_s += float(generation.timings.get(scheduler_stage(DECODER_STAGE), 0.0))
    steps = run.num_inference_steps * args.repeats
    unet = settled_delta(client, before, {"unet": steps}).get("unet", {})
    unet_requests = max(1, unet.get("success_count", 0))
    return {
        "scheduler": run.scheduler,
        "num_inference_steps": run.num_inference_steps,
        "loop": run.loop,
        "repeats": args.repeats,
        "scheduler_ms_per_step": 1e3 * scheduler_s / steps,
        "unet_compute_ms_per_step": unet.get("compute_infer_ns", 0) / 1e6 / unet_requests,
        "p50_s": percentile(latencies, 50),
        "latencies_s": latencies,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scheduler | decoder steps | loop | scheduler ms/step | UNet compute ms/step | scheduler share | "
        "end-to-end p50 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        share = row["scheduler_ms_per_step"] / max(1e-9, row["unet_compute_ms_per_step"])
        lines.append(
            f"| {row['scheduler']} | {row['num_inference_steps']} | {row['loop']} | "
            f"{row['scheduler_ms_per_step']:.3f} | {row['unet_compute_ms_per_step']:.2f} | "
            f"{100 * share:.1f}% of the UNet | {row['p50_s']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kandinsky-bench schedulers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_subcommand_arguments(parser, size=512, num_inference_steps=20)
    parser.add_argument("--url", help="measure a server started elsewhere (default: start one on loopback)")
    parser.add_argument(
        "--schedulers", nargs="+", choices=DECODER_SCHEDULERS, default=list(DECODER_SCHEDULERS)
    )
    parser.add_argument("--repeats", type=int, default=3, help="generations per row")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.num_inference_steps < 1:
        parser.error("--repeats and --num-inference-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from kandinsky_repository.serving.triton import TritonServer, free_port

    from .artifacts import subcommand_artifacts
    from .machine import machine_line

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    runs = [SchedulerRun(s, args.num_inference_steps, loop) for s in args.schedulers for loop in args.loops]
    runs += [
        SchedulerRun(name, steps, loop) for name, steps in (FEW_STEPS, MANY_STEPS) for loop in args.loops
    ]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    server = None
    if args.url is None:
        artifacts = subcommand_artifacts(args)
        server = TritonServer(
            artifacts.repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
        )
        server.start()
    rows = []
    try:
        if server is not None:
            server.wait_ready()
            args.url = server.grpc_url if args.protocol == "grpc" else server.http_url
        clients = {loop: open_client(args.url, args.protocol, loop) for loop in args.loops}
        for run in tqdm(runs, desc="schedulers", unit="run"):
            rows.append(measure(clients[run.loop], run, args))
    finally:
        if server is not None:
            server.stop()
    command = "kandinsky-bench schedulers " + shlex.join(sys.argv[2:] if argv is None else argv)
    print(
        f"{command}\n{started}; {machine_line()}; {args.height}x{args.width}, "
        f"{args.prior_num_inference_steps} prior steps, {args.repeats} generations per row, {args.protocol}\n"
    )
    print(table(rows[: -2 * len(args.loops)]))
    print("\nEnd to end, fewer steps for the same picture:\n")
    print(table(rows[-2 * len(args.loops) :]))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "date": started, "rows": rows}, indent=1))
    return 0
