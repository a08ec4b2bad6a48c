"""The client's retry policy: which failures are retried, how often, and how long it waits between tries.

Retried: failures that say the server (or one replica behind a load balancer) could not take the request
and that the same request may succeed a moment later: the connection was refused or lost
(`ServerUnavailable`), a model is being recovered (`ModelNotReady`, or Triton's "Stub process ... is not
healthy"), or a queue is full (`ServerBusy`). Every such error has `retryable = True`. Never retried:
invalid requests, a request that ran into its time limit (its work may still be running), cancellations.

Each denoising step of the client loop is one idempotent request (same inputs, same output), so a failed
step is simply sent again, possibly to another replica; a server-side generation is retried whole (the
same seed gives the same image), unless `retry_generations` is off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import KandinskyClientError

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
