"""The client's retry policy: which failures are retried, how often, and how long it waits between tries.

Retried: failures that say the server (or one replica behind a load balancer) could not take the request
and that the same request may succeed a moment later. Every such error has `retryable = True`:
- `ServerUnavailable`: connection refused, reset or lost; HTTP 502/503/504 (the gateway's "restarting or
  overloaded; retry"); gRPC UNAVAILABLE; an HTTP/2 stream reset by the gateway because the replica behind
  it died mid-call (gRPC "RST_STREAM"); a generate stream that ended before its final response;
- `ModelNotReady` and Triton's "Stub process ... is not healthy" / "... is not ready" (a model being
  recovered by kandinsky-serve's supervisor);
- `ServerBusy`: a full queue ("exceeds maximum queue size", the `kandinsky` model's "server busy"), and the
  gateway's rate limit (HTTP 429, gRPC RESOURCE_EXHAUSTED).
Never retried: invalid requests, a request that ran into its time limit (`RequestTimeout`: its work may
still be running), cancellations, any other server error.

How often: `attempts` tries in all (default 4), sleeping `backoff_s` (0.25 s) before the second, then twice
as long each time, capped at `max_backoff_s` (2 s): 0.25 + 0.5 + 1.0 s by default. Deadlines: every
attempt of every call (readiness checks included) is bounded by the client's `timeout_s`, which is also
sent as Triton's queue timeout; so a call with retries ends within attempts x timeout_s + the sleeps.
When the attempts run out the last error is raised, with its own class (still `retryable`), its message
ending in "(gave up on <what> after N attempts over T s)"; with one attempt allowed, "(retryable: <what>
was not sent again, ...)".

What is retried: each denoising step of the client loop is one idempotent request (same inputs, same
output), so a failed step is simply sent again, possibly to another replica; a server-side generation is
retried whole (the same seed gives the same image; its step callback sees the steps again), unless
`retry_generations` is off. Behind the gateway, a request whose replica fails before its response starts
is also re-sent by the gateway itself, to another replica (deploy/README.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kandinsky_core.errors import KandinskyClientError

logger = logging.getLogger("kandinsky_client")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all (1: no retry), waiting `backoff_s`, then twice that, ... up to `max_backoff_s`."""

    attempts: int = 4
    backoff_s: float = 0.25
    max_backoff_s: float = 2.0
    retry_generations: bool = True  # server loop: send a failed generation again, whole

    def delays(self) -> list[float]:
        return [min(self.backoff_s * 2**i, self.max_backoff_s) for i in range(max(self.attempts - 1, 0))]


NO_RETRY = RetryPolicy(attempts=1, retry_generations=False)


def with_retries(policy: RetryPolicy, what: str, call: Callable[[], T]) -> T:
    """`call()`, tried again after each retryable failure as the policy says."""
    started = time.monotonic()
    delays = policy.delays()
    for attempt in range(len(delays) + 1):
        try:
            return call()
        except KandinskyClientError as error:
            if not error.retryable or attempt == len(delays):
                if attempt and error.retryable:  # same class, so callers catch it as usual; say we tried
                    error.args = (
                        f"{error} (gave up on {what} after {attempt + 1} attempts over "
                        f"{time.monotonic() - started:.1f} s)",
                    )
                elif error.retryable:  # say that sending it again may work
                    error.args = (
                        f"{error} (retryable: {what} was not sent again, the retry policy "
                        "allows one attempt)",
                    )
                raise
            logger.warning(
                "%s failed (%s); retry %d of %d in %.2f s",
                what,
                error,
                attempt + 1,
                len(delays),
                delays[attempt],
            )
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")  # pragma: no cover
