"""`kandinsky-serve` as users run it: loopback by default, restricted APIs, and a supervisor that brings
the server back after a stub dies or a request crashes it, within the documented bound, leaving no
/dev/shm region behind; shutdown stays fast after a stub died."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error

import pytest
from kandinsky_client.pipeline import KandinskyClient
from kandinsky_repository.serving.health import main as health_main
from kandinsky_repository.serving.stubs import SHM_DIR, group_alive, stub_processes
from kandinsky_repository.settings import DEFAULTS

from .conftest import TEST_ADMIN_KEY, free_port
from .serving import generate_once, http, start_serve, wait_for

# JSON requests that declare a huge shape with 3 values (issue 9, points 1 and 2): the first makes
# tritonserver allocate 30 GB (std::bad_alloc, SIGABRT), the second overflows the size computation and
# aborts the python-backend stub while it deserialises the request, before any model code runs.
CRASH_REQUESTS = [
    pytest.param("preprocess_movq_image", [1, 100000, 100000, 3], id="huge-shape"),
    pytest.param("preprocess_clip_image", [1, 2**62, 2**62, 3], id="overflowing-shape"),
]


def crash_body(shape: list[int]) -> dict:
    return {"inputs": [{"name": "image_rgb", "shape": shape, "datatype": "UINT8", "data": [1, 2, 3]}]}


@pytest.fixture(scope="module")
def served(tiny_repository, tmp_path_factory):
    server = start_serve(tiny_repository, tmp_path_factory.mktemp("serve"))
    yield server
    server.stop()


def _non_loopback_ipv4() -> str | None:
    try:
        addresses = subprocess.run(
            ["hostname", "-I"], capture_output=True, text=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        addresses = []
    return next((a for a in addresses if "." in a and not a.startswith("127.")), None)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def _regions(triton_pid: int) -> set[str]:
    return {s.shm_region for s in stub_processes(triton_pid)}


def _recovered_cleanly(served, before: dict, regions: set[str]) -> dict:
    """Wait for the next recovery; the dead server's /dev/shm regions must be gone."""
    report = served.wait_recovered(before["recoveries"] + 1)
    assert report["triton_pid"] != before["triton_pid"]
    leaked = sorted(r for r in regions if (SHM_DIR / r).exists())
    assert not leaked, f"/dev/shm regions of the dead server left behind: {leaked}"
    return report


def test_default_bind_is_loopback(served):
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for port in (served.http_port, served.grpc_port, served.metrics_port, served.health_port):
        assert _accepts("127.0.0.1", port), port
        assert not _accepts(address, port), f"port {port} answers on {address}"


def test_restricted_apis_need_the_key(served):
    base = f"http://{served.http_url}"
    status, body = http("GET", base + "/v2/logging")
    assert status == 403 and "restricted" in body["error"]
    assert http("GET", base + "/v2/logging", headers={DEFAULTS.admin_key_header: TEST_ADMIN_KEY})[0] == 200
    assert TEST_ADMIN_KEY not in served.output, "the admin key must never be printed"


def test_a_killed_stub_is_recovered_within_the_bound(served):
    status, before = served.health()
    assert status == 200, before
    triton_pid = before["triton_pid"]
    regions = _regions(triton_pid)
    stub = next(s for s in stub_processes(triton_pid) if s.model == "tokenizer")
    killed = time.monotonic()
    os.kill(stub.pid, signal.SIGKILL)

    def not_ready():
        code, report = served.health()
        return report if code == 503 else None

    report = wait_for(not_ready, 10, interval=0.05, what="deep readiness to report the dead stub")
    assert any("tokenizer" in problem for problem in report["not_ready"]), report
    # Requests meanwhile fail fast with a retryable error: the stub is "not healthy" until the supervisor
    # kills the server, then connections are refused until it is back.
    prompt = {"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": ["a cat"]}]}
    try:
        code, body = http(
            "POST", f"http://{served.http_url}/v2/models/encode_prompt/infer", prompt, timeout=10
        )
        assert code >= 500 and "not healthy" in body["error"], (code, body)
    except (urllib.error.URLError, ConnectionError) as error:
        assert "refused" in str(error) or "reset" in str(error) or "closed" in str(error), error

    report = _recovered_cleanly(served, before, regions)
    elapsed = time.monotonic() - killed
    last = report["last_recovery"]
    assert "tokenizer_0_0" in last["cause"]
    # The documented bound: poll interval + kill and clean-up (< 1 s) + backoff + load time. Load time and
    # backoff are measured by the supervisor; what remains is the supervisor's own overhead.
    overhead = elapsed - last["load_seconds"] - last["backoff_seconds"]
    assert overhead < DEFAULTS.poll_interval_s + 2.5, (elapsed, last)
    with KandinskyClient(served.grpc_url, protocol="grpc") as client:
        generate_once(client)


@pytest.mark.parametrize(("model", "shape"), CRASH_REQUESTS)
def test_crash_requests_sent_directly_are_recovered(served, model, shape):
    status, before = served.health()
    assert status == 200, before
    regions = _regions(before["triton_pid"])
    try:
        code, body = http("POST", f"http://{served.http_url}/v2/models/{model}/infer", crash_body(shape))
    except OSError:
        code, body = 0, "connection lost"  # the server (or the stub, then the server) went down
    if code == 0 or code >= 500:
        _recovered_cleanly(served, before, regions)
    else:  # a machine with enough memory may survive the allocation and refuse the request instead
        assert code == 400, body
    with KandinskyClient(served.http_url, protocol="http") as client:
        generate_once(client)


def test_health_command(served):
    """`kandinsky-health` (Docker/Kubernetes exec probes): exit 0 when deep-ready, 1 otherwise."""
    assert health_main(["--url", f"http://127.0.0.1:{served.health_port}", "--quiet"]) == 0
    assert health_main(["--url", f"127.0.0.1:{free_port()}", "--quiet", "--timeout", "2"]) == 1


def test_shutdown_is_fast_after_a_stub_died(served):
    """Last in this module: it stops the server. Triton alone waits out its exit timeout here (31 s)."""
    status, report = served.health()
    assert status == 200, report
    triton_pid = report["triton_pid"]
    regions = _regions(triton_pid)
    stub = next(s for s in stub_processes(triton_pid) if s.model == "unet")
    os.kill(stub.pid, signal.SIGKILL)
    seconds = served.stop()
    assert served.process.returncode == 0 and "stopped" in served.output
    assert seconds < DEFAULTS.stop_grace_s, seconds
    assert not [r for r in regions if (SHM_DIR / r).exists()]
    assert group_alive(triton_pid) == []
