"""Clients ride through a restart: one classification of every failure (`kandinsky_core.errors.classify`),
a retry policy whose defaults outlast a restart of the server (jittered, budgeted, never a tight loop),
and end to end: a python stub killed under load loses no generation with default client settings, and
the gateway's rate limit at start-up is waited out rather than reported as a missing server or model.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from kandinsky_client.pipeline import KandinskyClient
from kandinsky_client.retry import NO_RETRY, RetryPolicy, with_retries
from kandinsky_client.transport import TritonTransport
from kandinsky_core import components as registry
from kandinsky_core.errors import (
    Cancelled,
    InferenceFailed,
    InvalidRequest,
    KandinskyClientError,
    ModelNotReady,
    RequestTimeout,
    ServerBusy,
    ServerUnavailable,
    classify,
    classify_exception,
    classify_http,
    error_from_message,
    error_message,
    is_stream_reset,
)
from kandinsky_repository.serving.stubs import stub_processes
from tritonclient.utils import InferenceServerException

from .serving import start_serve

# The longest restart measured (a killed tritonserver to deep-ready again, loaded 2-core machine).
MEASURED_RESTART_S = 11.7


# -- the gateway's answers, as it is configured to send them ------------------------------------------


@dataclass(frozen=True)
class GatewayAnswer:
    location: str
    status: int | str  # HTTP status, or gRPC status as tritonclient reports it ("StatusCode.X")
    message: str
    retry_after: str | None


def gateway_answers(repository: Path) -> dict[str, GatewayAnswer]:
    """Every answer the gateway gives itself (its named error locations), from its rendered config."""
    from kandinsky_repository.gateway.nginx import GatewayOptions, render

    options = GatewayOptions(
        triton_http="127.0.0.1:1", triton_grpc="127.0.0.1:2", health="127.0.0.1:3", repository=repository
    )
    servers = {"triton_http": ["127.0.0.1:1"], "triton_grpc": ["127.0.0.1:2"], "health": ["127.0.0.1:3"]}
    text = render(options, "", servers)[0]
    answers = {}
    for block in text.split("location @")[1:]:
        name, body = block.split(" ", 1)[0], block.split("location ", 1)[0]
        retry_after = re.search(r"add_header Retry-After (\S+) always", body)
        grpc_status = re.search(r"add_header grpc-status (\d+) always", body)
        returned = re.search(r"return (\d{3}) '(.*)\\n';", body)
        if grpc_status:
            code = next(c for c in grpc.StatusCode if c.value[0] == int(grpc_status.group(1)))
            message = re.search(r'add_header grpc-message "(.*)" always', body).group(1)
            answers[name] = GatewayAnswer(name, str(code), message, None)
        elif returned:
            status, json_body = int(returned.group(1)), returned.group(2)
            answers[name] = GatewayAnswer(name, status, json_body, retry_after and retry_after.group(1))
    return answers


# What each of the gateway's own answers must be classified as (retryable: ServerBusy, ServerUnavailable).
GATEWAY_CLASSES = {
    "too_many_requests": ServerBusy,
    "grpc_rate_limited": ServerBusy,
    "unavailable": ServerUnavailable,
    "grpc_unavailable": ServerUnavailable,
    "too_large": InvalidRequest,
    "grpc_too_large": InvalidRequest,
    "timeout": RequestTimeout,
    "grpc_timeout": RequestTimeout,
    "unauthorized": InferenceFailed,
    "grpc_unauthenticated": InferenceFailed,
    "forbidden": InferenceFailed,
    "grpc_permission_denied": InferenceFailed,
    "not_found": InferenceFailed,
    "method_not_allowed": InferenceFailed,
    "bad_request": InferenceFailed,
    "grpc_bad_request": InferenceFailed,
    "internal": InferenceFailed,
    "grpc_internal": InferenceFailed,
}


@pytest.fixture(scope="module")
def gateway(tiny_repository) -> dict[str, GatewayAnswer]:
    return gateway_answers(tiny_repository)


def test_every_gateway_answer_is_classified(gateway):
    assert {"too_many_requests", "grpc_rate_limited", "unavailable", "grpc_unavailable"} <= set(gateway)
    assert set(gateway) <= set(GATEWAY_CLASSES), "a new gateway answer needs a row in GATEWAY_CLASSES"
    for location, answer in gateway.items():
        if isinstance(answer.status, int):
            error = classify_http(
                answer.status,
                answer.message.encode(),
                model="unet",
                url="gw:8000",
                retry_after_header=answer.retry_after,
            )
        else:
            error = classify(answer.status, answer.message, model="unet", url="gw:8001")
        assert type(error) is GATEWAY_CLASSES[location], (location, repr(error))
        assert error.retryable is (GATEWAY_CLASSES[location] in (ServerBusy, ServerUnavailable)), location
        if isinstance(error, ServerBusy):
            # Honest: the rate limit is a busy server, not a missing model or server.
            assert "server busy (rate limited" in str(error) and "too many requests" in str(error)
        if answer.retry_after is not None:
            assert error.retry_after_s == float(answer.retry_after)


# -- the classification table ------------------------------------------------------------------------

REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to "
    "remote host: Connection refused"
)
STREAM_INVALID = (
    "The stream is no longer in valid state, the error detail is reported through provided callback. "
    "A new stream should be started after stopping the current stream."
)

TABLE = [
    # (status, message, class, retryable)
    (429, "too many requests", ServerBusy, True),
    ("StatusCode.RESOURCE_EXHAUSTED", "too many requests from this address; retry later", ServerBusy, True),
    ("RESOURCE_EXHAUSTED", "quota", ServerBusy, True),
    ("StatusCode.RESOURCE_EXHAUSTED", "Received message larger than max (9 vs. 4)", InvalidRequest, False),
    (413, "request body larger than the gateway limit", InvalidRequest, False),
    (502, "bad gateway", ServerUnavailable, True),
    (503, "the server is restarting or overloaded; retry", ServerUnavailable, True),
    ("504", "gateway timeout", ServerUnavailable, True),
    ("StatusCode.UNAVAILABLE", "Socket closed", ServerUnavailable, True),
    ("StatusCode.UNAVAILABLE", REFUSED, ServerUnavailable, True),
    ("StatusCode.INTERNAL", "Received RST_STREAM with error code 2", ServerUnavailable, True),
    ("StatusCode.UNKNOWN", "Stream removed", ServerUnavailable, True),
    ("StatusCode.INTERNAL", "Internal error from Core", ServerUnavailable, True),  # via the stream relay
    (None, STREAM_INVALID, ServerUnavailable, True),
    ("StatusCode.UNAVAILABLE", "Server is stopping to serve requests.", ServerUnavailable, True),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", RequestTimeout, False),
    (408, "request timeout", RequestTimeout, False),
    ("StatusCode.CANCELLED", "Locally cancelled by application!", Cancelled, False),
    ("StatusCode.UNAUTHENTICATED", "unauthenticated", InferenceFailed, False),
    (403, "forbidden", InferenceFailed, False),
    # The server-side generation model's kinds win over the generic status it comes with.
    (None, "server busy: 8 generations are running and 32 are waiting; retry later", ServerBusy, True),
    ("StatusCode.UNAVAILABLE", "server busy: 8 generations are running", ServerBusy, True),
    (400, "server busy: 8 generations are running", ServerBusy, True),
    (None, "invalid argument: height: is 65; it must be a multiple of 64", InvalidRequest, False),
    (
        "StatusCode.UNAVAILABLE",
        "deadline exceeded: the generation's time limit passed",
        RequestTimeout,
        False,
    ),
    (None, "cancelled: the client cancelled the generation", Cancelled, False),
    # Triton's own texts, which come with generic statuses.
    (None, "in ensemble 'encode_prompt', Stub process 'tokenizer_0_0' is not healthy.", ModelNotReady, True),
    (500, "Stub process 'unet_0_0' is not healthy.", ModelNotReady, True),
    (400, "Request for unknown model: 'unet' is not found", ModelNotReady, True),
    ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", ServerBusy, True),
    (503, "Exceeds maximum queue size", ServerBusy, True),
    # Anything else is the server's answer about the request: not retried.
    (
        400,
        "unet: input 'timestep' has values in [1000, 1000]; valid range is [0, 999]",
        InferenceFailed,
        False,
    ),
    ("StatusCode.INVALID_ARGUMENT", "unexpected inference input 'x'", InferenceFailed, False),
    (
        None,
        "mode inpaint needs model(s) ['unet_inpaint'], which this server does not have",
        InferenceFailed,
        False,
    ),
    ("StatusCode.INTERNAL", "internal error: boom", InferenceFailed, False),
]


@pytest.mark.parametrize(("status", "message", "cls", "retryable"), TABLE)
def test_classification_table(status, message, cls, retryable):
    error = classify(status, message, model="unet", url="host:1")
    assert type(error) is cls, repr(error)
    assert error.retryable is retryable
    assert isinstance(error, KandinskyClientError)


def test_a_refused_connection_is_marked_and_named_honestly():
    refused = classify("StatusCode.UNAVAILABLE", REFUSED, model="unet", url="host:1")
    assert refused.refused and "no Triton server answers at 'host:1'" in str(refused)
    lost = classify("StatusCode.UNAVAILABLE", "Socket closed", model="unet", url="host:1")
    assert not lost.refused and "no Triton server answers" not in str(lost)


def test_the_server_kinds_round_trip():
    """What the server-side generation model sends comes back as the same class and message."""
    for error in (
        InvalidRequest("height", "is 65; it must be a multiple of 64"),
        ServerBusy("8 generations are running and 32 are waiting; retry later"),
        RequestTimeout("the generation's time limit passed; it was stopped"),
        Cancelled("the client cancelled the generation"),
    ):
        back = error_from_message("kandinsky", error_message(error))
        assert type(back) is type(error) and str(back) == str(error)
    assert error_from_message("kandinsky", "invalid argument: height: bad").field == "height"


def test_one_stream_reset_check():
    for message in (
        "Received RST_STREAM with error code 2",
        "Stream removed",
        STREAM_INVALID,
        "Internal error from Core",
    ):
        assert is_stream_reset(message), message
    assert not is_stream_reset("input 'stream' is missing")


class RpcError(grpc.RpcError):
    """What grpc raises (code() and details()), e.g. grpc.aio's AioRpcError."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("error", "cls", "refused"),
    [
        (ConnectionRefusedError(111, "Connection refused"), ServerUnavailable, True),
        (socket.gaierror(-2, "Name or service not known"), ServerUnavailable, True),
        (ConnectionResetError(104, "Connection reset by peer"), ServerUnavailable, False),
        (BrokenPipeError(32, "Broken pipe"), ServerUnavailable, False),
        (TimeoutError("timed out"), RequestTimeout, None),
        (InferenceServerException("too many requests", status="429"), ServerBusy, None),
        (InferenceServerException(STREAM_INVALID), ServerUnavailable, False),
        (RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests"), ServerBusy, None),
        (RpcError(grpc.StatusCode.UNAVAILABLE, REFUSED), ServerUnavailable, True),
    ],
)
def test_exceptions_are_classified(error, cls, refused):
    classified = classify_exception(error, model="unet", url="host:1", timeout_s=5)
    assert type(classified) is cls, repr(classified)
    if refused is not None:
        assert classified.refused is refused


def test_a_bug_is_not_classified():
    assert classify_exception(TypeError("a bug"), model="unet") is None


# -- the policy ----------------------------------------------------------------------------------------


class Clock:
    """A fake `sleep` that records the pauses and advances a fake time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def down_until(clock: Clock, seconds: float, error: KandinskyClientError):
    """A call that fails with `error` until the fake time reaches `seconds`."""
    calls = []

    def call() -> str:
        calls.append(clock.now)
        if clock.now < seconds:
            raise error
        return "ok"

    return call, calls


@pytest.mark.parametrize(
    "error",
    [ServerUnavailable("refused"), ModelNotReady("stub not healthy"), ServerBusy("rate limited")],
    ids=["unavailable", "not-ready", "busy"],
)
def test_the_default_policy_outlasts_a_restart(error):
    """A server down for twice the longest measured restart: the default policy still gets through."""
    clock = Clock()
    call, calls = down_until(clock, 2 * MEASURED_RESTART_S, error)
    assert with_retries(RetryPolicy(), "step", call, sleep=clock.sleep) == "ok"
    assert len(calls) > 2
    # Back-off, not a tight loop: no pause is shorter than the first one's floor or longer than the cap.
    assert min(clock.pauses) >= RetryPolicy().backoff_s * (1 - RetryPolicy().jitter)
    assert max(clock.pauses) <= RetryPolicy().max_backoff_s


def test_the_budget_bounds_the_pauses_and_every_retry_pauses():
    policy = RetryPolicy(backoff_s=0.01, max_backoff_s=0.5, budget_s=5.0)
    clock = Clock()
    call, calls = down_until(clock, float("inf"), ServerUnavailable("refused"))
    with pytest.raises(ServerUnavailable, match=r"gave up on step after \d+ attempts.*budget of 5 s"):
        with_retries(policy, "step", call, sleep=clock.sleep, rng=random.Random(0))
    assert sum(clock.pauses) == pytest.approx(policy.budget_s, abs=policy.backoff_s)
    assert len(calls) == len(clock.pauses) + 1
    assert min(clock.pauses) > 0
    # The number of tries is bounded by the budget over the shortest pause.
    assert len(calls) <= policy.budget_s / (policy.backoff_s * (1 - policy.jitter)) + 1


def test_jitter_stays_within_its_bounds():
    policy = RetryPolicy(backoff_s=0.25, max_backoff_s=2.0, jitter=0.5)
    rng = random.Random(1)
    for retry in range(12):
        ceiling = min(0.25 * 2**retry, 2.0)
        pauses = [policy.pause(retry, rng) for _ in range(200)]
        assert all(ceiling * 0.5 <= p <= ceiling for p in pauses), retry
        assert max(pauses) - min(pauses) > ceiling * 0.3, "jitter spreads clients that failed together"


def test_retry_after_is_honoured():
    clock = Clock()
    call, calls = down_until(clock, 2.0, ServerBusy("rate limited", retry_after_s=1.5))
    assert with_retries(RetryPolicy(), "step", call, sleep=clock.sleep) == "ok"
    policy = RetryPolicy()
    assert all(1.5 <= p <= 1.5 * (1 + policy.jitter) for p in clock.pauses), clock.pauses


def test_a_retry_after_longer_than_the_budget_ends_the_retries():
    clock = Clock()
    call, calls = down_until(clock, 100.0, ServerBusy("rate limited", retry_after_s=60.0))
    with pytest.raises(ServerBusy, match="asks for a pause of 60 s"):
        with_retries(RetryPolicy(budget_s=30.0), "step", call, sleep=clock.sleep)
    assert len(calls) == 1 and clock.pauses == []


@pytest.mark.parametrize(
    "error",
    [
        RequestTimeout("late"),
        InvalidRequest("height", "bad"),
        InferenceFailed("unet", "boom"),
        Cancelled("x"),
    ],
)
def test_no_blind_retries(error):
    clock = Clock()
    call, calls = down_until(clock, 1.0, error)
    with pytest.raises(type(error)):
        with_retries(RetryPolicy(), "step", call, sleep=clock.sleep)
    assert len(calls) == 1 and clock.pauses == []


def test_attempts_still_cap_the_tries():
    clock = Clock()
    call, calls = down_until(clock, 100.0, ServerUnavailable("refused"))
    with pytest.raises(ServerUnavailable, match="after 3 attempts"):
        with_retries(RetryPolicy(attempts=3), "step", call, sleep=clock.sleep)
    assert len(calls) == 3
    with pytest.raises(ServerUnavailable, match="was not sent again"):
        with_retries(NO_RETRY, "step", down_until(clock, 100.0, ServerUnavailable("x"))[0])


@pytest.mark.parametrize(
    "fields",
    [
        {"backoff_s": 0},
        {"jitter": 1.0},
        {"attempts": 0},
        {"budget_s": -1},
        {"backoff_s": 3, "max_backoff_s": 2},
    ],
)
def test_a_policy_that_could_spin_is_refused(fields):
    with pytest.raises(InvalidRequest):
        RetryPolicy(**fields)


def test_the_client_retries_whole_generations_by_default():
    policy = RetryPolicy()
    assert policy.retry_generations and policy.budget_s >= 2 * MEASURED_RESTART_S


# -- the transport, with tritonclient answering as the gateway does ------------------------------------


def test_the_gateway_grpc_rate_limit_is_retried_by_the_transport(monkeypatch, gateway):
    """RESOURCE_EXHAUSTED with the gateway's message (no word "rate" in it) is a busy server: retried."""
    transport = TritonTransport("127.0.0.1:1", "grpc", timeout_s=5, retry=RetryPolicy(backoff_s=0.001))
    limited = gateway["grpc_rate_limited"]
    answers = [InferenceServerException(limited.message, status=limited.status)] * 3

    def infer(*args, **kwargs):
        if answers:
            raise answers.pop()
        return FakeResult()

    monkeypatch.setattr(transport._client, "infer", infer)
    inputs = {"input_ids": np.zeros((1, 77), np.int64)}
    try:
        assert transport.infer(registry.TEXT_ENCODER, inputs) == {
            t.name: 1 for t in registry.TEXT_ENCODER.outputs
        }
    finally:
        transport.close()
    assert answers == []


class FakeResponse:
    """What tritonclient's HTTP client returns for a GET (geventhttpclient's response)."""

    def __init__(self, status: int, body: str = "", retry_after: str | None = None) -> None:
        self.status_code, self.body, self.retry_after = status, body.encode(), retry_after

    def read(self) -> bytes:
        return self.body

    def get(self, header: str, default: str | None = None) -> str | None:
        return self.retry_after if header.lower() == "retry-after" else default


def test_http_readiness_reads_the_status(monkeypatch, gateway):
    """A gateway's 429 at the live check is a busy server, waited out as its Retry-After says; a 401 is
    raised at once by its name (not "not live", not retried); a model answered not ready is not ready."""
    transport = TritonTransport("127.0.0.1:1", "http", timeout_s=5, retry=RetryPolicy(backoff_s=0.001))
    limited, unauthorized = gateway["too_many_requests"], gateway["unauthorized"]
    answers: list[FakeResponse] = []
    monkeypatch.setattr(transport._client, "_get", lambda **kwargs: answers.pop(0))
    try:
        answers[:] = [FakeResponse(429, limited.message, "0.2"), FakeResponse(200)]
        started = time.monotonic()
        transport.check_live()
        assert time.monotonic() - started >= 0.2 and answers == []
        answers[:] = [FakeResponse(401, unauthorized.message)] * 3
        with pytest.raises(KandinskyClientError, match="refused .*HTTP 401.*unauthorized") as raised:
            transport.check_live()
        assert not raised.value.retryable and len(answers) == 2
        answers[:] = [FakeResponse(400, '{"error": "Request for unknown model: \'x\' is not found"}')]
        assert transport._ready("x") is False
    finally:
        transport.close()


class FakeResult:
    def as_numpy(self, name: str) -> int:
        return 1


def test_a_wrong_address_fails_fast():
    """Nothing has ever answered there: a refused connection is not waited out for the whole budget."""
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="127.0.0.1:1"):
        KandinskyClient("127.0.0.1:1", protocol="grpc", timeout_s=5)
    assert time.monotonic() - started < 5


# -- end to end: a stub killed under load, default client settings --------------------------------------

CLIENTS = 4
STEPS = {"height": 64, "width": 64, "prior_num_inference_steps": 2, "num_inference_steps": 20}


@dataclass
class Load:
    """Generations run back to back by `CLIENTS` clients until stopped; every outcome is kept."""

    done: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each success
    failures: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, client: KandinskyClient, seed: int) -> None:
        """Until stopped or the first failure (a lost generation; the client stops there)."""
        index = 0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                result = client.text_to_image("a cat", seed=seed + index, **STEPS)
                assert result.images[0].size == (64, 64)
            except BaseException as error:  # noqa: BLE001 - every failure is a lost generation
                with self.lock:
                    self.failures.append(error)
                return
            index += 1
            with self.lock:
                self.done.append((started, time.monotonic()))

    def finished_after(self, moment: float) -> int:
        with self.lock:
            return sum(1 for start, _ in self.done if start > moment)


@pytest.fixture(scope="module")
def direct(tiny_repository, tmp_path_factory):
    """kandinsky-serve --no-gateway: clients talk to Triton itself."""
    server = start_serve(tiny_repository, tmp_path_factory.mktemp("direct"), "--no-gateway")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gatewayed(nginx_with_njs, tiny_repository, tmp_path_factory):
    """kandinsky-serve with its gateway (the default) and its default limits."""
    server = start_serve(tiny_repository, tmp_path_factory.mktemp("gatewayed"), "--gateway")
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("topology", "loop", "protocol"),
    [
        ("direct", "client", "grpc"),
        ("direct", "server", "grpc"),
        ("direct", "client", "http"),
        ("direct", "server", "http"),
        ("gatewayed", "client", "grpc"),
        ("gatewayed", "server", "grpc"),
    ],
)
def test_a_killed_stub_loses_no_generation(request, topology, loop, protocol):
    """4 clients with default settings run generations back to back; the UNet's python stub is killed
    (kandinsky-serve's supervisor restarts Triton): every generation completes."""
    served = request.getfixturevalue(topology)
    status, before = served.health()
    assert status == 200, before
    url = served.grpc_url if protocol == "grpc" else served.http_url
    clients = [KandinskyClient(url, protocol=protocol, loop=loop) for _ in range(CLIENTS)]  # defaults
    load = Load()
    threads = [threading.Thread(target=load.run, args=(c, 100 * i)) for i, c in enumerate(clients)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(load.done) < CLIENTS and time.monotonic() < deadline:  # the load is going
            time.sleep(0.05)
        stub = next(s for s in stub_processes(before["triton_pid"]) if s.model == "unet")
        killed = time.monotonic()
        os.kill(stub.pid, signal.SIGKILL)
        served.wait_recovered(before["recoveries"] + 1, timeout=60)
        recovered = time.monotonic()
        while load.finished_after(recovered) < CLIENTS and time.monotonic() < recovered + 60:
            if not any(thread.is_alive() for thread in threads):
                break
            time.sleep(0.05)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(120)
        for client in clients:
            client.close()
    assert load.failures == [], [repr(e) for e in load.failures[:4]]
    in_flight = [span for span in load.done if span[0] < killed < span[1]]
    assert in_flight, "no generation was in flight when the stub was killed"
    assert load.finished_after(recovered) >= CLIENTS


# -- end to end: the gateway's rate limit at start-up ----------------------------------------------------


@pytest.fixture(scope="module")
def rate_limited(nginx_with_njs, tiny_repository, tmp_path_factory):
    """kandinsky-serve --gateway with limits that a few clients starting at once run into."""
    server = start_serve(
        tiny_repository,
        tmp_path_factory.mktemp("rate-limited"),
        "--gateway",
        "--gateway-rate",
        "20",
        "--gateway-burst",
        "5",
        "--gateway-max-in-flight",
        "3",
    )
    yield server
    server.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_start_up_through_a_rate_limited_gateway(rate_limited, protocol, caplog):
    """8 clients start at once (live check, readiness, configs, one generation each) against a gateway
    that allows 20 requests/s, a burst of 5 and 3 in flight: every 429 / RESOURCE_EXHAUSTED is waited
    out; none is reported as a missing server or model."""
    url = rate_limited.grpc_url if protocol == "grpc" else rate_limited.http_url
    failures: list[BaseException] = []
    completed: list[int] = []

    def start(index: int) -> None:
        try:
            with KandinskyClient(url, protocol=protocol, loop="server") as client:
                client.text_to_image("a cat", seed=index, **{**STEPS, "num_inference_steps": 2})
            completed.append(index)
        except BaseException as error:  # noqa: BLE001 - counted
            failures.append(error)

    caplog.set_level(logging.WARNING, logger="kandinsky_client")
    threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == [], [repr(e) for e in failures[:4]]
    assert sorted(completed) == list(range(8))
    retried = [r.getMessage() for r in caplog.records if "server busy (rate limited" in r.getMessage()]
    assert retried, "the gateway's limits were not hit: the test proves nothing"
