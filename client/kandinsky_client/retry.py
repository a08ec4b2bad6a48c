"""The client's retry policy: which failures are retried, how often, and how long it waits between tries.

Retried: failures that say the server (or one replica behind a load balancer) could not take the request
and that the same request may succeed a moment later; `kandinsky_core.errors.classify` decides, and every
such error has `retryable = True`:
- `ServerUnavailable`: connection refused, reset or lost; HTTP 502/503/504 (the gateway's "restarting or
  overloaded; retry"); gRPC UNAVAILABLE; an HTTP/2 stream reset by the gateway because the replica behind
  it died mid-call (gRPC "RST_STREAM"), or a generate stream that ended before its final response;
- `ModelNotReady`: Triton's "Stub process ... is not healthy" / "... is not ready" (a model being
  recovered by kandinsky-serve's supervisor, which restarts the server);
- `ServerBusy`: a full queue ("exceeds maximum queue size", the `kandinsky` model's "server busy"), and the
  gateway's rate limit (HTTP 429, gRPC RESOURCE_EXHAUSTED), whose Retry-After is honoured.
Never retried: invalid requests, a request that ran into its time limit (`RequestTimeout`: its work may
still be running), cancellations, any other server error.

How long: long enough to ride through a restart of the server (measured on a loaded 2-core machine,
tiny preset: 6.3-8.0 s from a killed python stub, 7.4-11.7 s from a killed tritonserver, to deep-ready). Pauses grow exponentially from `backoff_s` (0.25 s), doubling up to
`max_backoff_s` (2 s) each, with jitter (each pause drawn from [(1 - jitter) x, x], so clients that failed
together do not come back together) and never shorter than (1 - jitter) x backoff_s: no tight loop. The
pauses of one call add up to at most `budget_s` (30 s); `attempts` (default: no limit) caps the tries.
A Retry-After from the server lengthens a pause to at least that (plus jitter); one longer than the budget
left ends the retries. Deadlines: every attempt of every call (readiness checks included) is bounded by
the client's `timeout_s`, which is also sent as Triton's queue timeout.

When the retries end the last error is raised, with its own class (still `retryable`), its message ending
in "(gave up on <what> after N attempts over T s)"; with one attempt allowed, "(retryable: <what> was not
sent again, ...)".

What is retried: each denoising step of the client loop is one idempotent request (same inputs, same
output), so a failed step is simply sent again, possibly to another replica; a server-side generation is
retried whole (the client drew the seed, so the image is the same; its step callback sees the steps
again), unless `retry_generations` is off. Behind the gateway, a request whose replica fails before its
response starts is also re-sent by the gateway itself, to another replica (deploy/README.md).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kandinsky_core.errors import InvalidRequest, KandinskyClientError

logger = logging.getLogger("kandinsky_client")

T = TypeVar("T")

# The attribute of each retry's log record that names what is retried (benchmarks count retries by it).
RETRY_LOG_FIELD = "kandinsky_retry_of"
# 2 ** this bounds the exponential growth (the pause is capped long before; this only avoids overflow).
_MAX_DOUBLINGS = 32


@dataclass(frozen=True)
class RetryPolicy:
    """Pauses from `backoff_s`, doubling up to `max_backoff_s`, with `jitter`, `budget_s` of pauses in all.

    `attempts`: tries in all (1: no retry; None: as many as the budget allows).
    """

    attempts: int | None = None
    backoff_s: float = 0.25
    max_backoff_s: float = 2.0
    budget_s: float = 30.0  # the pauses of one call add up to at most this
    jitter: float = 0.5  # each pause is drawn from [(1 - jitter) x, x]; < 1, so none is 0
    retry_generations: bool = True  # server loop: send a failed generation again, whole

    def __post_init__(self) -> None:
        if self.attempts is not None and (isinstance(self.attempts, bool) or self.attempts < 1):
            raise InvalidRequest("attempts", f"is {self.attempts!r}; it must be >= 1 or None (no limit)")
        if not 0 < self.backoff_s <= self.max_backoff_s:
            raise InvalidRequest(
                "backoff_s",
                f"is {self.backoff_s!r}; it must be > 0 and <= max_backoff_s ({self.max_backoff_s!r})",
            )
        if not 0 <= self.jitter < 1:
            raise InvalidRequest("jitter", f"is {self.jitter!r}; it must be in [0, 1)")
        if not 0 <= self.budget_s < float("inf"):
            raise InvalidRequest("budget_s", f"is {self.budget_s!r}; it must be a number of seconds >= 0")

    def pause(self, retry: int, rng: random.Random | None = None) -> float:
        """The pause before retry number `retry` (0: the first), jittered."""
        ceiling = min(self.backoff_s * 2 ** min(retry, _MAX_DOUBLINGS), self.max_backoff_s)
        return ceiling * (1 - self.jitter * (rng or random).random())


NO_RETRY = RetryPolicy(attempts=1, retry_generations=False)


def _retryable(error: KandinskyClientError) -> bool:
    return error.retryable


def with_retries(
    policy: RetryPolicy,
    what: str,
    call: Callable[[], T],
    *,
    retry_if: Callable[[KandinskyClientError], bool] = _retryable,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """`call()`, tried again after each failure `retry_if` accepts (by default: `retryable` ones), as the
    policy says. `sleep` and `rng` are there for tests."""
    started = time.monotonic()
    slept = 0.0
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except KandinskyClientError as error:
            if not retry_if(error):
                raise
            wait, why_not = _next_pause(policy, attempt, slept, error, rng)
            if wait is None:  # same class, so callers catch it as usual; say what was tried
                if policy.attempts == 1:
                    note = f"retryable: {what} was not sent again, the retry policy allows one attempt"
                else:
                    elapsed = time.monotonic() - started
                    note = f"gave up on {what} after {attempt} attempts over {elapsed:.1f} s: {why_not}"
                error.args = (f"{error} ({note})",)
                raise
            logger.warning(
                "%s failed (%s); retry %d in %.2f s",
                what,
                error,
                attempt,
                wait,
                extra={RETRY_LOG_FIELD: what},
            )
            sleep(wait)
            slept += wait


def _next_pause(
    policy: RetryPolicy,
    attempt: int,
    slept: float,
    error: KandinskyClientError,
    rng: random.Random | None,
) -> tuple[float | None, str]:
    """(the pause before the next attempt, "") or (None, why there is none)."""
    if policy.attempts is not None and attempt >= policy.attempts:
        return None, f"the retry policy allows {policy.attempts} attempts"
    left = policy.budget_s - slept
    floor = policy.backoff_s * (1 - policy.jitter)  # the shortest pause there is
    if left < floor:
        return None, f"the retry budget of {policy.budget_s:g} s of pauses is spent"
    wait = policy.pause(attempt - 1, rng)
    if error.retry_after_s is not None:
        if error.retry_after_s > left:
            return (
                None,
                f"the server asks for a pause of {error.retry_after_s:g} s, more than the {left:.1f} s left",
            )
        asked = error.retry_after_s * (1 + policy.jitter * (rng or random).random())
        wait = max(wait, min(asked, left))
    return max(min(wait, left), floor), ""
