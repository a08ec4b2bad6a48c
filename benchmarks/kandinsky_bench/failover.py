"""Replica failure without lost images: Triton replicas behind the gateway, a bounded load, one replica
killed in the middle; generations attempted, completed, retried and lost, and the latencies.

    kandinsky-bench failover --preset tiny                  # 3 replicas, 8 clients x 5 generations, both loops
    kandinsky-bench failover --preset tiny --replicas 2 --clients 6 --generations 3 --loops server

Topology: the one the Kubernetes chart (`deploy/`) runs, on loopback. `--replicas` Triton servers
(`TritonServer`, each in its own process group, with a deep-health endpoint like kandinsky-serve's) and
one gateway (`kandinsky_repository.gateway.nginx`, the same template and settings as `kandinsky-gateway`) listing
every replica in its upstreams, as it lists the ready pods of the headless Service in the cluster.

For each loop, two runs of the same requests (same seeds): without a failure (the reference images and
latencies), then with the busiest replica (most UNet executions just before) killed with SIGKILL of its
process group (tritonserver and its python-backend stubs) once a third of the generations completed. The
replica stays dead for the rest of that run, as a lost pod would until Kubernetes replaces it.

- client loop: every step is its own request; a step whose replica dies is sent again by the gateway to
  another replica (before its response started) or by the client's retry policy; same inputs, same
  output, so the image equals the reference.
- server loop: a generation is one streamed request (with progress events, so the stream has started
  when the kill comes and the gateway can no longer move it): the generations on the dead replica fail
  with a retryable error and the client sends them again, whole (`RetryPolicy.retry_generations`), to
  another replica; the same seed gives the same image.

Counted per run: attempted; completed (an image came back); retried (generations whose client retried a
step or the whole generation); lost (no image, or an image different from the reference). The gateway's
own re-sends are not visible to the client; its error log counts them (`gateway_retries`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kandinsky_client.pipeline import KandinskyClient
from kandinsky_client.retry import RETRY_LOG_FIELD, RetryPolicy

from .served import add_subcommand_arguments
from .stats import summarize

logger = logging.getLogger(__name__)

PROMPT = "a red fox in the snow"


# -- replicas behind the gateway ----------------------------------------------------------------------


class Replicas:
    """`count` Triton servers on loopback ports behind one gateway; `kill(i)` and `restart(i)` a replica."""

    def __init__(self, repository: Path, count: int, *, log_dir: Path | None = None, **gateway: Any) -> None:
        from kandinsky_repository.serving.triton import TritonServer, free_port

        self.repository = Path(repository)
        self._own_logs = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kandinsky-replicas-"))
        self.servers = [
            TritonServer(
                self.repository,
                http_port=free_port(),
                grpc_port=free_port(),
                metrics_port=free_port(),
                log_file=self.log_dir / f"replica-{i}.log",
            )
            for i in range(count)
        ]
        self.health_ports = [free_port() for _ in range(count)]
        self._gateway_fields = gateway
        self._health: list[Any] = []
        self.gateway: Any = None

    @property
    def grpc_url(self) -> str:
        return self.gateway.grpc_url

    @property
    def http_url(self) -> str:
        return self.gateway.http_url

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url

    def _readiness(self, index: int) -> Callable[[], Any]:
        from kandinsky_repository.serving.health import deep_readiness

        server = self.servers[index]
        return lambda: deep_readiness(server.http_url, self.repository, process_group=server.pid)

    def start(self) -> None:
        from kandinsky_repository.gateway.nginx import Gateway, GatewayOptions
        from kandinsky_repository.serving.health import HealthServer
        from kandinsky_repository.serving.triton import free_port

        for server in self.servers:  # load in parallel
            server.start()
        for server in self.servers:
            server.wait_ready()
        for index, port in enumerate(self.health_ports):
            health = HealthServer("127.0.0.1", port, self._readiness(index), lambda: {"live": True})
            health.start()
            self._health.append(health)
        fields = {
            "triton_http": tuple(s.http_url for s in self.servers),
            "triton_grpc": tuple(s.grpc_url for s in self.servers),
            "health": tuple(f"127.0.0.1:{p}" for p in self.health_ports),
            "repository": self.repository,
            "http_port": free_port(),
            "grpc_port": free_port(),
            **self._gateway_fields,
        }
        self.gateway = Gateway(GatewayOptions(**fields), self.log_dir / "gateway")
        self.gateway.prepare()
        self.gateway.start()
        self.gateway.wait_listening()

    def alive(self) -> list[int]:
        return [i for i, s in enumerate(self.servers) if s.returncode is None and s.pid is not None]

    def busiest(self, model: str = "unet", window_s: float = 0.05, patience_s: float = 2.0) -> int:
        """The live replica whose `model` ran the most requests in the last `window_s` (asked directly),
        once one has run any (so a generation is in flight there), waiting at most `patience_s`."""

        def counts() -> dict[int, int]:
            found = {}
            for i in self.alive():
                url = f"http://{self.servers[i].http_url}/v2/models/{model}/stats"
                with (
                    contextlib.suppress(OSError, ValueError, KeyError, IndexError),
                    urllib.request.urlopen(url, timeout=2) as response,
                ):
                    found[i] = int(json.load(response)["model_stats"][0]["inference_count"])
            return found

        deadline = time.monotonic() + patience_s
        before = counts()
        while True:
            time.sleep(window_s)
            after = counts()
            growth = {i: after[i] - before[i] for i in after if i in before}
            if (growth and max(growth.values()) > 0) or time.monotonic() > deadline:
                break
            before = after
        return max(growth, key=lambda i: (growth[i], -i)) if growth else self.alive()[0]

    def kill(self, index: int) -> None:
        """SIGKILL the replica's process group (tritonserver and its stubs), as a lost pod."""
        from kandinsky_repository.serving.stubs import remove_shm_regions, wait_group_gone

        server = self.servers[index]
        pid = server.pid
        server.kill()
        if pid is not None:
            wait_group_gone(pid, 5.0)
        remove_shm_regions([], created_after=server.started_at)  # what the dead stubs left in /dev/shm

    def restart(self, index: int) -> None:
        server = self.servers[index]
        if server.returncode is None and server.pid is not None:
            return
        server.start()
        server.wait_ready()

    def gateway_retries(self) -> int:
        """Requests nginx sent to another replica after a failure (from its error log)."""
        if self.gateway is None or not self.gateway.error_log.exists():
            return 0
        text = self.gateway.error_log.read_text(errors="replace")
        return len(re.findall(r"while (connecting to|reading response header from) upstream", text))

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for health in self._health:
            health.stop()
        for index, server in enumerate(self.servers):
            if server.returncode is None and server.pid is not None:
                server.stop()
            elif server.pid is not None:
                self.kill(index)  # reaped already; clean what it left
        if self._own_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Replicas:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the load -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    loop: str
    clients: int = 8
    generations: int = 5
    height: int = 64
    width: int = 64
    prior_steps: int = 2
    steps: int = 20
    protocol: str = "grpc"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 60.0
    progress: bool = True  # server loop: step events, so a stream is answering when a kill comes

    @property
    def total(self) -> int:
        return self.clients * self.generations

    def seed(self, client: int, index: int) -> int:
        return 1000 + client * self.generations + index


@dataclass
class Outcome:
    client: int
    seed: int
    seconds: float
    pixels: np.ndarray | None = None
    error: Exception | None = None
    step_retries: int = 0  # client-side re-sends of a step (client loop)
    generation_retries: int = 0  # client-side re-sends of the whole generation (server loop)


@dataclass
class LoadResult:
    plan: LoadPlan
    outcomes: list[Outcome]
    seconds: float
    killed: int | None = None  # the replica killed, if any
    killed_after: int | None = None  # generations completed when it was killed
    gateway_retries: int = 0

    def counts(self, reference: LoadResult | None = None) -> dict[str, Any]:
        expected = {o.seed: o.pixels for o in reference.outcomes} if reference else {}
        completed = [o for o in self.outcomes if o.pixels is not None]
        mismatched = [
            o
            for o in completed
            if o.seed in expected
            and (expected[o.seed] is None or not np.array_equal(o.pixels, expected[o.seed]))
        ]
        latencies = [o.seconds for o in completed]
        summary = summarize(latencies) if latencies else {"p50": math.nan, "p99": math.nan}
        return {
            "loop": self.plan.loop,
            "run": "no failure"
            if self.killed is None
            else f"replica {self.killed} killed after {self.killed_after}/{self.plan.total}",
            "attempted": len(self.outcomes),
            "completed": len(completed),
            "retried": sum(1 for o in self.outcomes if o.step_retries or o.generation_retries),
            "step_retries": sum(o.step_retries for o in self.outcomes),
            "generation_retries": sum(o.generation_retries for o in self.outcomes),
            "gateway_retries": self.gateway_retries,
            "failed": len(self.outcomes) - len(completed),
            "different_image": len(mismatched),
            "lost": len(self.outcomes) - len(completed) + len(mismatched),
            "p50_s": summary["p50"],
            "p99_s": summary["p99"],
            "wall_s": self.seconds,
            "errors": sorted({f"{type(o.error).__name__}: {o.error}" for o in self.outcomes if o.error}),
        }


class _RetryCounter(logging.Handler):
    """Counts the client's retries per thread, from the retry policy's log records (retry.py)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[int, Counter] = {}
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        what = getattr(record, RETRY_LOG_FIELD, None)  # set on each retry's record (retry.py)
        if what is None:
            return
        kind = "generation" if what == "generation" else "step"
        with self._lock:
            self.counts.setdefault(threading.get_ident(), Counter())[kind] += 1

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self.counts.get(threading.get_ident(), Counter()))


@contextlib.contextmanager
def _counting_retries(quiet: bool) -> Any:
    client_logger = logging.getLogger("kandinsky_client")
    counter = _RetryCounter()
    client_logger.addHandler(counter)
    propagate = client_logger.propagate
    client_logger.propagate = not quiet
    try:
        yield counter
    finally:
        client_logger.removeHandler(counter)
        client_logger.propagate = propagate


def run_load(
    url: str,
    plan: LoadPlan,
    *,
    kill: Callable[[], int] | None = None,
    kill_after: int | None = None,
    quiet: bool = True,
) -> LoadResult:
    """`plan.clients` threads, each with its own client, running `plan.generations` generations back to
    back; `kill()` (returning the replica it killed) is called once `kill_after` generations completed."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    completed = 0
    killer: threading.Thread | None = None
    killed: list[int] = []
    # Per client: whether its current generation has made a step (its stream is answering).
    stepping: dict[int, bool] = {}

    def kill_when_every_generation_runs() -> None:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            with lock:
                if all(stepping.values()):
                    break
            time.sleep(0.005)
        killed.append(kill())

    def maybe_kill() -> None:
        nonlocal killer
        if kill is None or kill_after is None or completed != kill_after:
            return
        killer = threading.Thread(target=kill_when_every_generation_runs, name="kill", daemon=True)
        killer.start()

    def worker(client_index: int, counter: _RetryCounter) -> None:
        nonlocal completed

        def step_callback(stage: str, step: int, timestep: int, latents: Any) -> None:
            stepping[client_index] = True

        with KandinskyClient(url, plan.protocol, plan.timeout_s, loop=plan.loop, retry=plan.retry) as client:
            for g in range(plan.generations):
                outcome = Outcome(client_index, plan.seed(client_index, g), 0.0)
                with lock:
                    stepping[client_index] = False
                before = counter.snapshot()
                started = time.perf_counter()
                try:
                    result = client.text_to_image(
                        PROMPT,
                        height=plan.height,
                        width=plan.width,
                        prior_num_inference_steps=plan.prior_steps,
                        num_inference_steps=plan.steps,
                        seed=outcome.seed,
                        callback_on_step_end=step_callback
                        if plan.loop == "client" or plan.progress
                        else None,
                    )
                    outcome.pixels = np.asarray(result.images[0])
                except Exception as error:  # noqa: BLE001 - counted as lost, reported with its message
                    outcome.error = error
                outcome.seconds = time.perf_counter() - started
                retries = counter.snapshot() - before
                outcome.step_retries, outcome.generation_retries = retries["step"], retries["generation"]
                with lock:
                    outcomes.append(outcome)
                    completed += 1
                    maybe_kill()
            with lock:
                stepping.pop(client_index, None)  # done: nothing of it left to wait for

    with _counting_retries(quiet) as counter:
        threads = [
            threading.Thread(target=worker, args=(c, counter), name=f"client-{c}")
            for c in range(plan.clients)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        if killer is not None:
            killer.join()
    outcomes.sort(key=lambda o: o.seed)
    return LoadResult(plan, outcomes, seconds, killed[0] if killed else None, kill_after if killed else None)


def failover_runs(replicas: Replicas, plan: LoadPlan, *, quiet: bool = True) -> tuple[LoadResult, LoadResult]:
    """The reference run, then the same load with the busiest replica killed after a third of it; the
    killed replica is started again afterwards (so the next run has every replica). One untimed
    generation per client first (connections, first executions)."""
    url = replicas.url(plan.protocol)
    run_load(url, dataclasses.replace(plan, generations=1), quiet=quiet)
    reference = run_load(url, plan, quiet=quiet)
    before = replicas.gateway_retries()

    def kill() -> int:
        index = replicas.busiest()
        logger.info("killing replica %d (SIGKILL of its process group)", index)
        replicas.kill(index)
        return index

    failed = run_load(url, plan, kill=kill, kill_after=max(plan.total // 3, 1), quiet=quiet)
    failed.gateway_retries = replicas.gateway_retries() - before
    if failed.killed is not None:
        replicas.restart(failed.killed)
    return reference, failed


# -- the table -----------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| loop | run | attempted | completed | retried (client) | gateway re-sends | lost | p50 | p99 | wall |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        retried = f"{r['retried']} ({r['step_retries']} steps, {r['generation_retries']} whole)"
        lines.append(
            f"| {r['loop']} | {r['run']} | {r['attempted']} | {r['completed']} | {retried} | "
            f"{r['gateway_retries']} | {r['lost']} | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s | "
            f"{r['wall_s']:.1f} s |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kandinsky-bench failover",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_subcommand_arguments(parser, size=64, num_inference_steps=20)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--generations", type=int, default=5, help="per client")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (one is killed)")
    if args.clients < 1 or args.generations < 1:
        parser.error("--clients and --generations must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys

    from .artifacts import subcommand_artifacts
    from .machine import machine_line

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    artifacts = subcommand_artifacts(args)
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with Replicas(artifacts.repository, args.replicas) as replicas:
        for loop in args.loops:
            plan = LoadPlan(
                loop,
                clients=args.clients,
                generations=args.generations,
                height=args.height,
                width=args.width,
                prior_steps=args.prior_num_inference_steps,
                steps=args.num_inference_steps,
                protocol=args.protocol,
            )
            reference, failed = failover_runs(replicas, plan)
            rows += [reference.counts(), failed.counts(reference)]
    command = "kandinsky-bench failover " + shlex.join(sys.argv[2:] if argv is None else argv)
    print(
        f"{command}\n{started}; {machine_line()}; {args.replicas} replicas behind the gateway; "
        f"{args.clients} clients x {args.generations} generations per run, {args.height}x{args.width}, "
        f"{args.prior_num_inference_steps} prior + {args.num_inference_steps} decoder steps, "
        f"{args.protocol}\n"
    )
    print(table(rows))
    for row in rows:
        for error in row["errors"]:
            print(f"  {row['loop']} / {row['run']}: {error}")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "date": started, "rows": rows}, indent=1))
    return 0 if all(r["lost"] == 0 for r in rows) else 1
