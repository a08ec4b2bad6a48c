"""The gateway (nginx + njs): only the routes clients need, JSON checks that stop the crash requests,
bearer token, rate limit, 503 while Triton is away, generate field checks, streaming, gRPC."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from kandinsky_client.pipeline import KandinskyClient
from kandinsky_repository.admin import AdminKey
from kandinsky_repository.gateway.nginx import Gateway, GatewayOptions
from kandinsky_repository.serving.triton import TritonServer
from tritonclient.utils import InferenceServerException

from .conftest import TEST_ADMIN_KEY, free_port
from .serving import generate_once, http, start_serve, wait_for
from .test_supervisor import CRASH_REQUESTS, crash_body

TOKEN = "gateway-token-0123456789abcdef"


@pytest.fixture(scope="module")
def gatewayed(nginx_with_njs, tiny_repository, tmp_path_factory):
    """kandinsky-serve --gateway: nginx on the public ports, Triton on internal loopback ports."""
    server = start_serve(tiny_repository, tmp_path_factory.mktemp("gatewayed"), "--gateway")
    yield server
    server.stop()


def _gateway(options: GatewayOptions) -> Gateway:
    gateway = Gateway(options)
    gateway.prepare()
    return gateway


def _options(triton_server, repository: Path, **changes) -> GatewayOptions:
    """A standalone gateway in front of the session's Triton."""
    fields = {
        "triton_http": triton_server.http_url,
        "triton_grpc": triton_server.grpc_url,
        "health": f"127.0.0.1:{free_port()}",  # no health endpoint: /v2/health/ready answers 503
        "repository": repository,
        "admin_key": AdminKey(TEST_ADMIN_KEY, "tests"),
        "http_port": free_port(),
        "grpc_port": free_port(),
        **changes,
    }
    return GatewayOptions(**fields)


# -- the crash requests of issue 9, through the gateway ------------------------------------------------


@pytest.mark.parametrize(("model", "shape"), CRASH_REQUESTS)
def test_crash_requests_are_refused_and_the_server_keeps_serving(gatewayed, model, shape):
    status, before = gatewayed.health()
    assert status == 200, before
    code, body = http("POST", f"http://{gatewayed.http_url}/v2/models/{model}/infer", crash_body(shape))
    assert code == 400, body
    assert "input 'image_rgb' declares shape" in body["error"] and "at most" in body["error"], body
    status, after = gatewayed.health()
    assert status == 200 and after["triton_pid"] == before["triton_pid"] and after["recoveries"] == 0
    with KandinskyClient(gatewayed.grpc_url, protocol="grpc") as client:
        generate_once(client)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            '{"inputs": [{"name": "image_rgb", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [1, 2]}]}',
            "carries 2",
        ),
        (
            '{"inputs": [{"name": "image_rgb", "shape": [1, -2, 2, 3], "datatype": "UINT8", "data": []}]}',
            "non-negative",
        ),
        (
            '{"inputs": [{"name": "image_rgb", "shape": [1, 2, 2, 3], "datatype": "UINT8"}]}',
            "neither JSON data",
        ),
        ('{"inputs": {"name": "image_rgb"}}', "'inputs' list"),
        (
            '{"inputs": [{"name": "image_rgb", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, 3], '
            '"parameters": {"shared_memory_region": "x"}}]}',
            "shared-memory",
        ),
        ('{"inputs": [', "not valid JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_infer_json_checks(gatewayed, body, fragment):
    code, answer = http("POST", f"http://{gatewayed.http_url}/v2/models/preprocess_movq_image/infer", body)
    assert code == 400 and fragment in answer["error"], answer


def test_a_valid_json_request_passes(gatewayed):
    body = {
        "inputs": [{"name": "image_rgb", "shape": [1, 64, 64, 3], "datatype": "UINT8", "data": [7] * 12288}]
    }
    code, answer = http("POST", f"http://{gatewayed.http_url}/v2/models/preprocess_movq_image/infer", body)
    assert code == 200, answer
    assert answer["outputs"][0]["shape"] == [1, 3, 64, 64]


def test_generation_through_the_gateway_over_http(gatewayed):
    """The HTTP client sends binary tensors: the gateway reads only their JSON header."""
    with KandinskyClient(gatewayed.http_url, protocol="http") as client:
        generate_once(client)


# -- routes ---------------------------------------------------------------------------------------------


ALLOWED = [
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/unet"),
    ("GET", "/v2/models/unet/versions/1"),
    ("GET", "/v2/models/unet/config"),
    ("GET", "/v2/models/unet/ready"),
    ("GET", "/v2/models/unet/versions/1/ready"),
    ("POST", "/v2/repository/index"),
]
REFUSED = [
    ("GET", "/v2/logging", 403),
    ("POST", "/v2/logging", 403),
    ("GET", "/v2/systemsharedmemory/status", 403),
    ("POST", "/v2/systemsharedmemory/region/x/register", 403),
    ("POST", "/v2/cudasharedmemory/region/x/register", 403),
    ("GET", "/v2/trace/setting", 403),
    ("POST", "/v2/repository/models/unet/load", 403),
    ("POST", "/v2/repository/models/unet/unload", 403),
    ("GET", "/v2/models/stats", 403),
    ("GET", "/v2/models/unet/stats", 403),
    ("GET", "/metrics", 404),
    ("GET", "/", 404),
    ("DELETE", "/v2/models/unet", 405),
    ("GET", "/v2/models/unet/infer", 405),
    ("POST", "/v2/health/ready", 405),
]


def test_only_the_routes_clients_need(gatewayed):
    base = f"http://{gatewayed.http_url}"
    for method, path in ALLOWED:
        code, body = http(method, base + path, b"" if method == "POST" else None)
        assert code == 200, (method, path, body)
    for method, path, expected in REFUSED:
        code, body = http(method, base + path, b"{}" if method in ("POST", "DELETE") else None)
        assert code == expected and isinstance(body, dict) and body["error"], (method, path, code, body)


def test_deep_readiness_is_what_the_gateway_reports(gatewayed):
    code, body = http("GET", f"http://{gatewayed.http_url}/v2/health/ready")
    assert code == 200 and body["ready"] is True and body["state"] == "serving"


def test_grpc_methods(gatewayed):
    with grpcclient.InferenceServerClient(gatewayed.grpc_url) as client:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("unet")
        assert client.get_model_config("unet").config.name == "unet"
        assert client.get_server_metadata().name == "triton"
        assert len(client.get_model_repository_index().models) > 10  # the gateway adds the key
        for call in (
            client.get_log_settings,
            client.get_system_shared_memory_status,
            lambda: client.register_system_shared_memory("x", "/x", 16),
            client.get_inference_statistics,
            lambda: client.load_model("unet"),
            client.get_trace_settings,
        ):
            with pytest.raises(InferenceServerException) as error:
                call()
            assert error.value.status() == "StatusCode.PERMISSION_DENIED", error.value


# -- token, rate limit, upstream down (standalone gateways in front of the session server) ------------------


def test_bearer_token_is_required_when_set(nginx_with_njs, triton_server, tiny_repository):
    with _gateway(_options(triton_server, tiny_repository, token=TOKEN)) as gateway:
        base = f"http://{gateway.http_url}"
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
            code, body = http("GET", base + "/v2/health/live", headers=headers)
            assert code == 401 and "Bearer" in body["error"], (headers, body)
        assert http("GET", base + "/v2/health/live", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            with pytest.raises(InferenceServerException) as error:
                client.is_server_live()
            assert error.value.status() == "StatusCode.UNAUTHENTICATED"
            assert client.is_server_live(headers={"authorization": f"Bearer {TOKEN}"})


def test_rate_limit_answers_429(nginx_with_njs, triton_server, tiny_repository):
    with _gateway(_options(triton_server, tiny_repository, rate_per_s=1, burst=2)) as gateway:
        codes, bodies = [], []
        for _ in range(8):
            code, body = http("GET", f"http://{gateway.http_url}/v2/health/live")
            codes.append(code)
            bodies.append(body)
        assert 200 in codes and 429 in codes, codes
        assert "too many requests" in bodies[codes.index(429)]["error"]
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            statuses = []
            for _ in range(8):
                try:
                    client.is_server_live()
                    statuses.append("OK")
                except InferenceServerException as error:
                    statuses.append(error.status())
            assert "StatusCode.RESOURCE_EXHAUSTED" in statuses, statuses


def test_triton_away_gives_503_retry(nginx_with_njs, triton_server, tiny_repository):
    closed = f"127.0.0.1:{free_port()}"
    options = _options(triton_server, tiny_repository, triton_http=closed, triton_grpc=closed)
    with _gateway(options) as gateway:
        for path in ("/v2/health/live", "/v2/models/unet/config", "/v2/health/ready"):
            code, body = http("GET", f"http://{gateway.http_url}{path}")
            assert code == 503 and "restarting or overloaded; retry" in body["error"], (path, body)
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            with pytest.raises(InferenceServerException) as error:
                client.is_server_live()
            assert error.value.status() == "StatusCode.UNAVAILABLE" and "retry" in error.value.message()


# -- generate: field checks from the model's config, and streaming -----------------------------------------


@pytest.fixture(scope="module")
def ticker_server(ticker_repository):
    """The decoupled test model (`count` responses, `delay` seconds apart) served by Triton."""
    with TritonServer(
        ticker_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    ) as server:
        yield server


def _ticker_options(server, repository, **overrides) -> GatewayOptions:
    return GatewayOptions(
        triton_http=server.http_url,
        triton_grpc=server.grpc_url,
        health=f"127.0.0.1:{free_port()}",
        repository=repository,
        http_port=free_port(),
        grpc_port=free_port(),
        **overrides,
    )


@pytest.fixture(scope="module")
def ticker(nginx_with_njs, ticker_server, ticker_repository):
    """The ticker behind a standalone gateway with the default limits."""
    with _gateway(_ticker_options(ticker_server, ticker_repository)) as gateway:
        yield gateway


def test_requests_in_flight_per_address_are_bounded(nginx_with_njs, ticker_server, ticker_repository):
    """Past `max_in_flight` concurrent requests from one address, the gateway answers 429 at once: the
    per-step models have no Triton queue bound, so this is what bounds one address's queued requests."""
    body = json.dumps({"text": "slow", "count": 2, "delay": 0.5})
    with _gateway(_ticker_options(ticker_server, ticker_repository, max_in_flight=2)) as gateway:
        url = f"http://{gateway.http_url}/v2/models/ticker/generate_stream"
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: http("POST", url, body), range(6)))
        codes = [code for code, _ in results]
        assert codes.count(200) >= 2 and 429 in codes, codes
        refused = next(answer for code, answer in results if code == 429)
        assert "2 in flight" in refused["error"], refused
        # Once those finish, the address may send again.
        assert http("POST", url, json.dumps({"text": "x", "count": 1, "delay": 0}))[0] == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('{"text": "hi", "count": 1, ', "not valid JSON"),
        ('["text"]', "must be a JSON object"),
        ('{"text": 3, "count": 1, "delay": 0}', "field 'text' must be a string"),
        ('{"text": "hi", "count": "three", "delay": 0}', "field 'count' must be an integer"),
        ('{"text": "hi", "count": 1.5, "delay": 0}', "field 'count' must be an integer"),
        ('{"text": "hi", "count": 1, "delay": true}', "field 'delay' must be a number"),
        ('{"text": "hi", "count": 1, "delay": 0, "colour": "red"}', "field 'colour' is not an input"),
        ('{"text": "hi", "count": 1, "delay": 0, "parameters": [1]}', "'parameters' must be a JSON object"),
    ],
)
def test_generate_checks_fields_against_the_model_config(ticker, body, fragment):
    for endpoint in ("generate", "generate_stream"):
        code, answer = http("POST", f"http://{ticker.http_url}/v2/models/ticker/{endpoint}", body)
        assert code == 400 and fragment in answer["error"], (endpoint, answer)
    if "colour" in body:
        assert "valid fields: text, count, delay, parameters" in answer["error"]


def test_generate_passes_valid_requests(ticker):
    body = {"text": "hi", "count": 1, "delay": 0, "parameters": {"note": "x"}}
    code, answer = http("POST", f"http://{ticker.http_url}/v2/models/ticker/generate", body)
    assert code == 200 and answer["text"] == "hi 0", answer
    code, answer = http("POST", f"http://{ticker.http_url}/v2/models/nobody/generate", body)
    assert code == 404 and "nobody" in answer["error"]


def test_generate_stream_events_arrive_before_the_request_completes(ticker):
    delay = 0.6
    host, port = ticker.http_url.split(":")
    connection = HTTPConnection(host, int(port), timeout=30)
    started = time.monotonic()
    connection.request(
        "POST",
        "/v2/models/ticker/generate_stream",
        body=json.dumps({"text": "tick", "count": 3, "delay": delay}),
        headers={"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream")
    events = []
    while len(events) < 3:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data:"):
            events.append((time.monotonic() - started, json.loads(line[5:])))
    connection.close()
    assert [event["text"] for _, event in events] == ["tick 0", "tick 1", "tick 2"]
    first, last = events[0][0], events[-1][0]
    assert last - first > delay, "events must arrive as they are produced, not all at the end"


def test_grpc_stream_responses_arrive_as_they_are_produced(ticker):
    """ModelStreamInfer (what the server-side generation loop streams over) through the gateway."""
    delay = 0.6
    arrivals: list[tuple[float, object]] = []
    inputs = []
    for name, value, dtype in (
        ("text", np.array([b"tick"], dtype=np.object_), "BYTES"),
        ("count", np.array([3], dtype=np.int32), "INT32"),
        ("delay", np.array([delay], dtype=np.float32), "FP32"),
    ):
        tensor = grpcclient.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    with grpcclient.InferenceServerClient(ticker.grpc_url) as client:
        client.start_stream(
            callback=lambda result, error: arrivals.append((time.monotonic(), result or error))
        )
        client.async_stream_infer("ticker", inputs)
        wait_for(lambda: len(arrivals) >= 3, 30, what="three streamed responses")
        client.stop_stream()
    texts = [r.as_numpy("text")[0] for _, r in arrivals[:3]]
    assert texts == [b"tick 0", b"tick 1", b"tick 2"], arrivals
    assert arrivals[2][0] - arrivals[0][0] > delay


def test_body_cap(nginx_with_njs, triton_server, tiny_repository):
    with _gateway(_options(triton_server, tiny_repository, max_body_bytes=4096)) as gateway:
        big = json.dumps(
            {"inputs": [{"name": "x", "shape": [3000], "datatype": "UINT8", "data": [1] * 3000}]}
        )
        code, body = http("POST", f"http://{gateway.http_url}/v2/models/unet/infer", big)
        assert code == 413 and "4096" in body["error"], body


def test_gateway_command_renders_its_config(nginx_with_njs, tiny_repository, tmp_path, monkeypatch):
    """`kandinsky-gateway --write-config` (other deployments reuse it); limits computed from the registry."""
    from kandinsky_repository.gateway.limits import read_configs, request_limits
    from kandinsky_repository.gateway.nginx import main as gateway_main

    monkeypatch.setenv("KANDINSKY_GATEWAY_TOKEN", TOKEN)
    monkeypatch.setenv("KANDINSKY_ADMIN_KEY", TEST_ADMIN_KEY)
    out = tmp_path / "gateway"
    arguments = ["--triton-http", "triton", "--triton-grpc", "triton", "--health-url", "http://triton"]
    assert gateway_main([*arguments, "--repository", str(tiny_repository), "--write-config", str(out)]) == 0
    conf = (out / "nginx.conf").read_text()
    assert "server triton:8000;" in conf and "server triton:8001;" in conf and "server triton:8003;" in conf
    assert TOKEN in conf and (out / "nginx.conf").stat().st_mode & 0o077 == 0, "secrets: owner-only file"
    limits = request_limits(tiny_repository)
    assert f"client_max_body_size {limits.max_body_bytes};" in conf
    from kandinsky_core.components import MAX_INPUT_IMAGE_SIDE, PREPROCESS_CLIP_IMAGE, UNET_CONTROLNET

    clip_batch = PREPROCESS_CLIP_IMAGE.max_batch_size * MAX_INPUT_IMAGE_SIDE**2 * 3
    assert limits.max_body_bytes >= clip_batch, "a full batch of MAX_INPUT_IMAGE_SIDE images for CLIP fits"
    # The tiny repository serves the ControlNet UNet, whose full batch of float32 hints is the largest request.
    hint_batch = UNET_CONTROLNET.max_batch_size * 3 * 1024 * 1024 * 4
    assert limits.max_body_bytes >= hint_batch and "unet_controlnet at batch 8" in limits.reason
    configs = read_configs(tiny_repository)
    del configs["unet_controlnet"]  # without it: the CLIP images, as base64 in a generate body
    assert "base64 images" in request_limits(tiny_repository, configs).reason
    assert limits.json_max_elements == 1024 * 1024 * 3
    assert limits.json_max_text_bytes == 16 * limits.json_max_elements + 2**20


def test_json_text_is_bounded_before_it_is_parsed(nginx_with_njs, triton_server, tiny_repository):
    options = _options(triton_server, tiny_repository, json_max_elements=100)  # 16 * 100 + 1 MiB of text
    with _gateway(options) as gateway:
        data = "[" + ",".join(["0"] * 600_000) + "]"  # 1.2 MB of JSON numbers
        body = '{"inputs": [{"name": "x", "shape": [600000], "datatype": "UINT8", "data": ' + data + "}]}"
        code, answer = http("POST", f"http://{gateway.http_url}/v2/models/unet/infer", body)
        assert code == 400 and "json_max_text_bytes" in answer["error"], answer
