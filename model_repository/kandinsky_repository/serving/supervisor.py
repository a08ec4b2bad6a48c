"""Keeps a tritonserver serving: restarts it when it dies, recovers python-backend stubs that die.

Detection. Every `poll_interval_s` (0.5 s) the supervisor checks that tritonserver still runs (a
SIGABRT from `std::bad_alloc`, a kill -9) and that every stub process it saw start is still alive and
not a zombie (kill -9, the OOM killer, a crash inside the stub), with as many live stubs per
python-backend model as the model has instances.

Recovery: restart the whole server, never reload just the broken model. Measured on the CI machine kind
(2 cores, `tiny` preset, Triton 2.51 from nvidia-pytriton 0.7.0, 2026-11-25), with
`--model-control-mode=explicit --load-model=*` and the model-repository API:
- a stub killed while idle (`kill -9` of tokenizer_0_0): `POST .../tokenizer/unload` completed in about
  1 s and `POST .../tokenizer/load` in 1.4 s (the ensemble using it came back on its own); clean.
- the same with `load` alone (Triton's reload in place): the new instance served after 1.4 s, but the
  old one, holding the dead stub, never finished unloading: its /dev/shm region stayed and the next
  SIGTERM waited out the whole exit timeout (32 s with Triton's default of 30 s).
- a stub killed mid-request (the `[1, 2^62, 2^62, 3]` JSON request to preprocess_clip_image, which
  aborts the stub while it deserialises the request): `unload` never completed (still UNLOADING after
  60 s), so the model cannot be brought back cleanly at all.
The request that kills a stub is exactly the case to survive, so a model reload is not reliable here.
Restarting the server always works (a server that aborted needs it anyway), leaves no process, zombie or
shared-memory region behind, and costs the repository's load time: about 12 s for the tiny preset on 2
cores (all models; longer for large checkpoints). Requests in flight on other models fail with a
connection error, which clients treat as retryable. So the server runs with the default model control
mode (`none`): load and unload are refused outright, whatever the admin key.

Bound. A dead stub or server is serving again within
    poll_interval_s (0.5 s) + kill and /dev/shm clean-up (< 1 s) + backoff + load time,
where the backoff is 0 unless the server is in a crash loop: it failed while loading, or within
`crash_loop_window_s` (10 s) of becoming ready (a model that breaks at once, a request retried until it
kills the server again). Then the n-th restart of the loop waits 1, 2, 4, ... 30 s, so such a loop cannot
make it spin; the readiness report says so ("waiting"). A crash after the server served longer than that
window costs the load time only, however soon after the previous one (it used to wait 1, 2, 4 ... s
whenever restarts were under 60 s apart). The first start is not retried: a repository that does not
load is an error to report, not to loop on. Every detection, restart and recovery is logged.

While recovering, deep readiness says not ready (with the cause), Triton's ports refuse connections
(clients get a retryable connection error; the gateway answers 503 + JSON), and shutdown does not wait
for a broken server: SIGKILL at once when a stub is dead, so Ctrl-C takes about as long as it takes
tritonserver to exit normally (3-5 s) or less.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..settings import DEFAULTS
from .health import Readiness, deep_readiness, python_instances
from .stubs import StubProcess, remove_shm_regions, stub_processes, wait_group_gone

if TYPE_CHECKING:
    from ..gateway.nginx import Gateway
    from ..openai_api.server import OpenAIServer
    from .triton import TritonServer

logger = logging.getLogger(__name__)


class Backoff:
    """Delay before a restart: none after a server that served, growing delays in a crash loop.

    A crash belongs to a loop when the server failed while loading (a restart that never became ready) or
    within `loop_window_s` of becoming ready. Any other crash starts the count again: its restart waits
    nothing, so it costs the load time only. Backing off is for loops, where restarting at once would only
    spin (a broken model, a request retried until it kills the server again).
    """

    def __init__(
        self,
        steps: tuple[float, ...] = DEFAULTS.restart_backoff_s,
        loop_window_s: float = DEFAULTS.crash_loop_window_s,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.steps, self.loop_window_s, self.clock = steps, loop_window_s, clock
        self.in_a_row = 0  # restarts of the current crash loop so far
        self.ready_since: float | None = None  # None: not ready since the last crash

    def serving(self) -> None:
        self.ready_since = self.clock()

    def next_delay(self) -> tuple[float, str]:
        """(seconds to wait before the next start, why: empty when there is no wait)."""
        served = self.ready_since is not None and self.clock() - self.ready_since >= self.loop_window_s
        if served:
            self.in_a_row = 0
        self.ready_since = None
        delay = self.steps[min(self.in_a_row, len(self.steps) - 1)]
        self.in_a_row += 1
        reason = ""
        if delay > 0:
            reason = (
                f"crash loop: {self.in_a_row} failures in a row, each while loading or within "
                f"{self.loop_window_s:g}s of becoming ready; waiting {delay:g}s before restart {self.in_a_row}"
            )
        return delay, reason


@dataclass
class Recovery:
    cause: str
    seconds: float  # from detection to deep-ready
    restarts: int  # server starts it took
    load_seconds: float  # of which the last start's loading, to deep-ready
    backoff_seconds: float  # of which waiting before restarts


@dataclass
class Supervisor:
    server: TritonServer
    poll_interval_s: float = DEFAULTS.poll_interval_s
    ready_timeout_s: float = DEFAULTS.ready_timeout_s
    backoff: Backoff = field(default_factory=Backoff)
    gateway: Gateway | None = None
    openai: OpenAIServer | None = None  # the OpenAI Images API (a thread of this process)

    def __post_init__(self) -> None:
        self.state = "starting"  # starting -> serving <-> recovering -> stopped
        self.cause = ""
        self.recoveries: list[Recovery] = []
        self.expected = python_instances(self.server.repository)
        self._stop = threading.Event()
        self._seen: dict[int, StubProcess] = {}
        self._regions: set[str] = set()
        self.load_seconds = 0.0  # the last start's time to deep readiness
        self.waiting: tuple[float, str] | None = None  # (monotonic end, reason) of a crash-loop backoff
        self._gateway_started = 0.0
        self._openai_started = 0.0

    # -- readiness --------------------------------------------------------------------------------------

    def readiness(self) -> Readiness:
        details = {
            "state": self.state,
            "recoveries": len(self.recoveries),
            "triton_pid": self.server.pid,
        }
        if self.recoveries:
            last = self.recoveries[-1]
            details["last_recovery"] = {
                "cause": last.cause,
                "seconds": round(last.seconds, 2),
                "load_seconds": round(last.load_seconds, 2),
                "backoff_seconds": last.backoff_seconds,
                "restarts": last.restarts,
            }
        waiting = self.waiting
        if waiting is not None:
            left = max(0.0, waiting[0] - time.monotonic())
            details["waiting"] = {"seconds_left": round(left, 1), "reason": waiting[1]}
        if self.state != "serving":
            cause = f": {self.cause}" if self.cause else ""
            what = "recovery in progress" if self.state == "recovering" else f"server {self.state}"
            problems = [what + cause]
            if waiting is not None:
                problems.append(f"restarting in {max(0.0, waiting[0] - time.monotonic()):.1f}s: {waiting[1]}")
            return Readiness(False, problems, details=details)
        report = self._deep_readiness()
        report.details = details
        if self.openai is not None and not self.openai.alive():
            report.ready = False
            report.problems.append("the OpenAI API (kandinsky-openai) is not running; restarting it")
        return report

    def liveness(self) -> dict:
        return {"live": self.state != "stopped", "state": self.state}

    def _deep_readiness(self) -> Readiness:
        key = self.server.admin_key
        return deep_readiness(
            self.server.http_url,
            self.server.repository,
            process_group=self.server.pid,
            admin_header=key.header if key else None,
            admin_key=key.key if key else None,
            expected_stubs=self.expected,
        )

    def wait_deep_ready(self, timeout: float) -> list[str]:
        """Block until the deep check passes; raise if tritonserver exits or `timeout` passes."""
        from .triton import repository_models

        deadline = time.monotonic() + timeout
        report = Readiness(False, ["not checked yet"])
        while time.monotonic() < deadline and not self._stop.is_set():
            returncode = self.server.returncode
            if returncode is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {returncode} while loading models"
                    + self.server.log_since_start()
                )
            self._scan_stubs()
            report = self._deep_readiness()
            if report.ready:
                return repository_models(self.server.repository)
            self._stop.wait(0.25)
        raise TimeoutError(
            f"not ready after {timeout:.0f}s: {'; '.join(report.problems)}{self.server.log_since_start()}"
        )

    # -- the loop ---------------------------------------------------------------------------------------

    def start(self) -> list[str]:
        """First start: errors propagate (a repository that does not load is not retried)."""
        started = time.monotonic()
        self.server.start()
        models = self.wait_deep_ready(self.ready_timeout_s)
        self.load_seconds = time.monotonic() - started
        self._became_ready()
        return models

    def run(self) -> None:
        """Supervise until `stop()`; returns then."""
        while not self._stop.wait(self.poll_interval_s):
            problem = self.check()
            if problem:
                self.recover(problem)
            self._check_gateway()
            self._check_openai()

    def check(self) -> str | None:
        """What is broken now (None: nothing): the server exited, or a stub died."""
        returncode = self.server.returncode
        if returncode is not None:
            how = f"signal {-returncode}" if returncode < 0 else f"code {returncode}"
            return f"tritonserver (pid {self.server.pid}) exited with {how}"
        dead = self._scan_stubs()
        if dead:
            names = ", ".join(f"{s.instance} (model '{s.model}', pid {s.pid})" for s in dead)
            return f"python-backend stub process(es) died: {names}"
        return None

    def _scan_stubs(self) -> list[StubProcess]:
        """Record the stubs now running; return those seen before that are gone or zombies, plus
        placeholders for models with fewer live stubs than instances."""
        pid = self.server.pid
        if pid is None:
            return []
        current = {s.pid: s for s in stub_processes(pid)}
        self._regions.update(s.shm_region for s in current.values() if s.shm_region)
        if self.state != "serving":
            # While models load, short-lived stubs come and go (the python backend runs one per model
            # to complete its config before the instances' stubs): only served stubs are tracked.
            return []
        dead = [s for p, s in self._seen.items() if p not in current or not current[p].alive]
        self._seen.update((p, s) for p, s in current.items() if s.alive and s.model != "unknown")
        if not dead:
            alive = Counter(s.model for s in current.values() if s.alive)
            dead = [
                StubProcess(0, model, f"{model}_?", "", "gone")
                for model, count in self.expected.items()
                if alive[model] < count
            ]
        return dead

    def _became_ready(self) -> None:
        self.state, self.cause = "serving", ""
        self._seen.clear()
        self._scan_stubs()
        self.backoff.serving()

    def recover(self, cause: str) -> None:
        """Kill what is left of the server, clean up, restart it (with backoff) until deep-ready."""
        detected = time.monotonic()
        self.state, self.cause = "recovering", cause
        logger.warning("recovering: %s", cause)
        restarts, waited = 0, 0.0
        while not self._stop.is_set():
            self._kill_and_clean()
            delay, reason = self.backoff.next_delay()
            waited += delay
            if delay:
                logger.warning("restarting tritonserver in %.0fs: %s", delay, reason)
                self.waiting = (time.monotonic() + delay, reason)
                stopped = self._stop.wait(delay)
                self.waiting = None
                if stopped:
                    return
            restarts += 1
            started = time.monotonic()
            self.server.start()
            try:
                self.wait_deep_ready(self.ready_timeout_s)
            except (RuntimeError, TimeoutError) as error:
                self.cause = f"restart failed: {error}"
                logger.error("tritonserver restart failed: %s", error)
                continue
            if self._stop.is_set():
                return
            self.load_seconds = time.monotonic() - started
            seconds = time.monotonic() - detected
            self.recoveries.append(Recovery(cause, seconds, restarts, self.load_seconds, waited))
            self._became_ready()
            logger.warning(
                "recovered in %.1fs (%d restart(s), load %.1fs): %s",
                seconds,
                restarts,
                self.load_seconds,
                cause,
            )
            return

    def _kill_and_clean(self) -> None:
        pid = self.server.pid
        self.server.kill()
        if pid is not None and not wait_group_gone(pid, 5.0):
            logger.warning("processes of tritonserver's group %d outlived SIGKILL", pid)
        remove_shm_regions(self._regions, created_after=self.server.started_at)
        self._regions.clear()
        self._seen.clear()

    def _check_gateway(self) -> None:
        """Restart nginx if it exited (at most every few seconds, so a port taken by another program
        does not make it spin)."""
        if self.gateway is None or self.gateway.poll() is None or self._stop.is_set():
            return
        if time.monotonic() - self._gateway_started < DEFAULTS.frontend_restart_interval_s:
            return
        logger.error("the gateway (nginx) exited with code %s; restarting it", self.gateway.poll())
        self._gateway_started = time.monotonic()
        self.gateway.start()

    def _check_openai(self) -> None:
        """Start the OpenAI API's server again if its thread ended (at most every few seconds)."""
        if self.openai is None or self.openai.alive() or self._stop.is_set():
            return
        if time.monotonic() - self._openai_started < DEFAULTS.frontend_restart_interval_s:
            return
        logger.error("the OpenAI API (kandinsky-openai) stopped; restarting it")
        self._openai_started = time.monotonic()
        try:
            self.openai.start()
        except (RuntimeError, TimeoutError) as error:
            logger.error("the OpenAI API did not start again: %s", error)

    # -- shutdown ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the gateway and the server; SIGKILL at once when the server is broken."""
        self._stop.set()
        broken = self.state != "serving" or self.check() is not None
        self.state = "stopped"
        if self.gateway is not None:
            self.gateway.stop()
        if self.openai is not None:
            self.openai.stop()
        pid = self.server.pid
        self.server.stop(timeout=0 if broken else DEFAULTS.stop_grace_s)
        if pid is not None:
            wait_group_gone(pid, 5.0)
        remove_shm_regions(self._regions, created_after=self.server.started_at)
