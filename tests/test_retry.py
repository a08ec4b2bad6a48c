"""The retry policy: retryable failures are tried again with growing pauses, others are raised at once
(the defaults, jitter, the budget and Retry-After: test_client_retries.py)."""

from __future__ import annotations

import pytest
from kandinsky_client.retry import NO_RETRY, RetryPolicy, with_retries
from kandinsky_core.errors import (
    InferenceFailed,
    InvalidRequest,
    ModelNotReady,
    RequestTimeout,
    ServerBusy,
    ServerUnavailable,
    error_from_message,
)

FAST = RetryPolicy(attempts=3, backoff_s=0.001, max_backoff_s=0.002)


def failing(errors: list[Exception], result: str = "ok"):
    calls = []

    def call() -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return result

    return call, calls


def test_retryable_failures_are_tried_again_until_success():
    call, calls = failing([ServerUnavailable("refused"), ServerBusy("full")])
    assert with_retries(FAST, "step", call) == "ok" and len(calls) == 3


def test_the_last_failure_is_raised_with_its_own_class_and_the_count():
    call, calls = failing([ServerUnavailable("refused")] * 5)
    with pytest.raises(ServerUnavailable, match=r"refused \(gave up on step after 3 attempts over"):
        with_retries(FAST, "step", call)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "error", [InvalidRequest("height", "bad"), RequestTimeout("late"), InferenceFailed("unet", "boom")]
)
def test_other_failures_are_not_retried(error):
    call, calls = failing([error])
    with pytest.raises(type(error)):
        with_retries(FAST, "step", call)
    assert len(calls) == 1


def test_no_retry_policy_and_backoff():
    call, calls = failing([ServerBusy("full")])
    with pytest.raises(ServerBusy, match="was not sent again"):
        with_retries(NO_RETRY, "step", call)
    assert len(calls) == 1
    # Without jitter the pauses double from backoff_s up to max_backoff_s.
    policy = RetryPolicy(backoff_s=0.25, max_backoff_s=1.0, jitter=0.0)
    assert [policy.pause(i) for i in range(4)] == [0.25, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("message", "retryable"),
    [
        ("in ensemble 'encode_prompt', Stub process 'tokenizer_0_0' is not healthy.", True),
        ("Request for unknown model: 'unet' is not found", True),
        ("unet: input 'timestep' has values in [1000, 1000]; valid range is [0, 999]", False),
    ],
)
def test_server_messages_say_whether_a_retry_can_help(message, retryable):
    assert error_from_message("unet", message).retryable is retryable
    assert isinstance(error_from_message("unet", "Exceeds maximum queue size"), ServerBusy)
    assert isinstance(error_from_message("unet", "Stub process 'unet_0_0' is not healthy."), ModelNotReady)
