"""The gateway (nginx + njs): only the routes clients need, body checks as strict as Triton's most
permissive reader (duplicate keys, shapes, binary sizes, gRPC messages read like protobuf reads them),
bearer token, rate limit, in-flight bound counted once a body has arrived, slow clients cut off, abandoned
HTTP work still counted, 503 while Triton is away, generate field checks, streaming, gRPC. The crash
requests themselves, through every port of a default kandinsky-serve: tests/test_crash_requests.py."""

from __future__ import annotations

import json
import queue
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from kandinsky_client.pipeline import KandinskyClient
from kandinsky_repository.admin import AdminKey
from kandinsky_repository.gateway.nginx import Gateway, GatewayOptions
from kandinsky_repository.gateway.relay import check_message
from kandinsky_repository.serving.triton import TritonServer
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from .conftest import TEST_ADMIN_KEY, free_port
from .serving import generate_once, http, start_serve, wait_for

TOKEN = "gateway-token-0123456789abcdef"


@pytest.fixture(scope="module")
def gatewayed(nginx_with_njs, tiny_repository, tmp_path_factory):
    """kandinsky-serve (the gateway is its default): nginx on the public ports, Triton on internal ones."""
    server = start_serve(tiny_repository, tmp_path_factory.mktemp("gatewayed"))
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


# -- infer: JSON checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            '{"inputs": [{"name": "image_rgb", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [1, 2]}]}',
            "carries 2",
        ),
        (
            '{"inputs": [{"name": "image_rgb", "shape": [1, -2, 2, 3], "datatype": "UINT8", "data": []}]}',
            "integers >= 1",
        ),
        (
            '{"inputs": [{"name": "image_rgb", "shape": [1, 0, 2, 3], "datatype": "UINT8", "data": []}]}',
            "integers >= 1",
        ),
        (
            '{"inputs": [{"name": "image_rgb", "shape": [], "datatype": "UINT8", "data": [1]}]}',
            "non-empty list",
        ),
        (
            '{"inputs": [{"name": "image_rgb", "shape": [1.5], "datatype": "UINT8", "data": [1]}]}',
            "integers >= 1",
        ),
        ('{"inputs": [{"name": "image_rgb", "shape": [1], "datatype": "UINT9", "data": [1]}]}', "datatype"),
        # a key twice, wherever it is, however it is written: njs keeps the last, Triton the first
        (
            '{"inputs": [{"name": "image_rgb", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, 3], '
            '"datatype": "FP32"}]}',
            "the key 'datatype' twice",
        ),
        (
            '{"inputs": [{"name": "image_rgb", "sh\\u0061pe": [1, 9, 9, 3], "shape": [1, 1, 1, 3], '
            '"datatype": "UINT8", "data": [1, 2, 3]}]}',
            "the key 'shape' twice",
        ),
        ('{"parameters": {"a": 1, "a": 2}, "inputs": []}', "the key 'a' twice"),
        ('{"__proto__": 1, "__proto__": 2, "inputs": []}', "the key '__proto__' twice"),
        ('{"inputs": [], "inputs": []}', "the key 'inputs' twice"),
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
        ("", "has no body"),
        ('{"inputs": ' + "[" * 33 + "]" * 33 + "}", "nested deeper than 32 levels"),
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


def _binary_request(url: str, inputs: list[dict], binary: bytes, header_length: str | None = None):
    header = json.dumps({"inputs": inputs}).encode()
    length = str(len(header)) if header_length is None else header_length
    return http("POST", url, header + binary, headers={"Inference-Header-Content-Length": length})


def _image(shape: list, size: int, datatype: str = "UINT8") -> dict:
    return {
        "name": "image_rgb",
        "shape": shape,
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }


@pytest.mark.parametrize(
    ("inputs", "binary", "header_length", "fragment"),
    [
        ([_image([1, 2**62, 2**62, 3], 0)], b"", None, "declares shape"),
        ([_image([1, 0, 2**62, 3], 0)], b"", None, "integers >= 1"),
        (
            [_image([1, 2, 2, 3], 12, "FP32")],
            bytes(12),
            None,
            "12 FP32 elements (48 bytes) but carries 12 bytes",
        ),
        ([_image([1, 2, 2, 3], 12)], bytes(13), None, "13 bytes of binary data after the JSON part"),
        ([_image([1, 2, 2, 3], 13)], bytes(12), None, "binary_data_size is 13"),
        ([_image([1, 2, 2, 3], 12)], bytes(12), "12abc", "Inference-Header-Content-Length is 12abc"),
        ([_image([1, 2, 2, 3], 12)], bytes(12), "10,20", "Inference-Header-Content-Length is 10,20"),
    ],
)
def test_infer_binary_checks(gatewayed, inputs, binary, header_length, fragment):
    """Binary tensors: Triton compares their size with the declared shape's byte size, a product that
    overflows int64 (or a 0 beside a huge dimension) passes it and aborts a python-backend stub."""
    url = f"http://{gatewayed.http_url}/v2/models/preprocess_clip_image/infer"
    code, answer = _binary_request(url, inputs, binary, header_length)
    assert code == 400 and fragment in answer["error"], answer


def test_a_valid_binary_request_passes(gatewayed):
    url = f"http://{gatewayed.http_url}/v2/models/preprocess_movq_image/infer"
    code, answer = _binary_request(url, [_image([1, 64, 64, 3], 64 * 64 * 3)], bytes(64 * 64 * 3))
    assert code == 200 and answer["outputs"][0]["shape"] == [1, 3, 64, 64], answer


def test_requests_nginx_cannot_read_get_json_too(gatewayed):
    host, port = gatewayed.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"GET /v2 HTTP/1.1\r\n\r\n")  # no Host header
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400") and b'{"error": "bad request' in answer, answer
    code, body = http("GET", f"http://{gatewayed.http_url}/v2/models/unet/config", b"{}")
    assert code == 400 and "a GET request carries no body" in body["error"], body


# -- gRPC: ModelInfer messages read the way protobuf reads them (njs); streams by the relay -------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes | int) -> bytes:
    """One protobuf field: varints (wire 0) take an int, length-delimited (2) and fixed (1, 5) bytes."""
    tag = _varint(number << 3 | wire)
    if wire == 0:
        return tag + _varint(payload)
    if wire == 2:
        return tag + _varint(len(payload)) + payload
    return tag + payload


def _input(*parts: bytes) -> bytes:
    return _field(5, 2, b"".join(parts))


NAME, UINT8, FP32 = _field(1, 2, b"image_rgb"), _field(2, 2, b"UINT8"), _field(2, 2, b"FP32")
PACKED_SHAPE = _field(3, 2, b"".join(_varint(d) for d in (1, 2, 2, 3)))
RAW12 = _field(7, 2, bytes(12))
MODEL = _field(1, 2, b"preprocess_movq_image")
# Each case: a ModelInferRequest as bytes, and None (accepted: Triton answers) or what the refusal says.
GRPC_MESSAGES = [
    ("packed-shape", MODEL + _input(NAME, UINT8, PACKED_SHAPE) + RAW12, None),
    ("unpacked-shape", MODEL + _input(NAME, UINT8, *(_field(3, 0, d) for d in (1, 2, 2, 3))) + RAW12, None),
    (
        "shape-split-in-two",
        MODEL
        + _input(NAME, UINT8, _field(3, 2, _varint(1) + _varint(2)), _field(3, 0, 2), _field(3, 0, 3))
        + RAW12,
        None,
    ),
    (
        "unpacked-overflowing-shape",
        MODEL + _input(NAME, UINT8, *(_field(3, 0, d) for d in (1, 2**62, 2**62, 3))) + _field(7, 2, b""),
        "declares shape",
    ),
    (
        "negative-dimension",
        MODEL + _input(NAME, UINT8, *(_field(3, 0, d % 2**64) for d in (1, -1, 2, 3))) + RAW12,
        "integers >= 1",
    ),
    ("the-last-datatype-counts", MODEL + _input(NAME, FP32, UINT8, PACKED_SHAPE) + RAW12, None),
    (
        "the-last-datatype-counts-2",
        MODEL + _input(NAME, UINT8, FP32, PACKED_SHAPE) + RAW12,
        "48 bytes) but carries 12",
    ),
    (
        "shape-of-another-wire-type-is-unknown",
        MODEL + _input(NAME, UINT8, PACKED_SHAPE, _field(3, 5, bytes(4))) + RAW12,
        None,
    ),
    (
        "unknown-fields",
        MODEL + _field(99, 1, bytes(8)) + _input(NAME, UINT8, PACKED_SHAPE, _field(77, 2, b"x")) + RAW12,
        None,
    ),
    (
        "two-inputs-one-raw",
        MODEL + _input(NAME, UINT8, PACKED_SHAPE) * 2 + RAW12,
        "1 raw_input_contents for 2 inputs",
    ),
    (
        "contents-merged",
        MODEL
        + _input(
            NAME,
            UINT8,
            PACKED_SHAPE,
            _field(5, 2, _field(4, 2, bytes(6))),
            _field(5, 2, _field(4, 2, bytes(6))),
        ),
        None,
    ),
    (
        "contents-short",
        MODEL + _input(NAME, UINT8, PACKED_SHAPE, _field(5, 2, _field(4, 2, bytes(11)))),
        "declares 12 elements but carries 11",
    ),
    (
        "contents-of-another-type",
        MODEL + _input(NAME, UINT8, PACKED_SHAPE, _field(5, 2, _field(6, 2, bytes(48)))),
        "contents of another type",
    ),
    ("no-data", MODEL + _input(NAME, UINT8, PACKED_SHAPE), "carries no data"),
    (
        "shared-memory",
        MODEL
        + _input(
            NAME,
            UINT8,
            PACKED_SHAPE,
            _field(4, 2, _field(1, 2, b"shared_memory_region") + _field(2, 2, _field(3, 2, b"r"))),
        )
        + RAW12,
        "shared-memory",
    ),
    ("truncated", MODEL + _input(NAME, UINT8, PACKED_SHAPE)[:-2], "truncated"),
]


def _grpc_verdict(url: str, message: bytes, stream: bool) -> str | None:
    """None when Triton answered, else the refusal's details (INVALID_ARGUMENT expected)."""
    with grpc.insecure_channel(url) as channel:
        if not stream:
            try:
                channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(message, timeout=30)
                return None
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
                return error.details()
        done: queue.Queue = queue.Queue()

        def messages():
            yield message
            done.get(timeout=30)

        try:
            for response in channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(
                messages(), timeout=30
            ):
                done.put(True)
                reply = service_pb2.ModelStreamInferResponse.FromString(response)
                assert not reply.error_message, reply.error_message
                return None
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
            return error.details()
        raise AssertionError("the stream ended without an answer")


@pytest.mark.parametrize(("name", "message", "refusal"), GRPC_MESSAGES, ids=[m[0] for m in GRPC_MESSAGES])
def test_grpc_messages_are_read_as_protobuf_reads_them(gatewayed, name, message, refusal):
    """njs (ModelInfer) and the relay (ModelStreamInfer, protobuf itself) agree with each other and with
    the expectation: what Triton would read is what is checked."""
    python = check_message(message)
    unary = _grpc_verdict(gatewayed.grpc_url, message, stream=False)
    stream = _grpc_verdict(gatewayed.grpc_url, message, stream=True)
    if refusal is None:
        assert python is None and unary is None and stream is None, (python, unary, stream)
    elif refusal == "truncated":  # (protobuf says so in its own words)
        assert refusal in unary and "not a ModelInferRequest" in python and python == stream, (
            python,
            unary,
            stream,
        )
    else:
        assert refusal in unary and refusal in stream and refusal in python, (python, unary, stream)


def test_grpc_groups_are_refused(gatewayed):
    """Wire types 3/4 (groups): protobuf skips them as unknown fields; njs does not read them: refused."""
    message = MODEL + _input(NAME, UINT8, PACKED_SHAPE, _field(9, 3, b"") + _field(9, 4, b"")) + RAW12
    assert "groups are not accepted" in _grpc_verdict(gatewayed.grpc_url, message, stream=False)


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
    ("GET", "/"),
    ("GET", "/v1/models"),
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
    ("GET", "/index.html", 404),
    ("POST", "/", 405),  # (GET /: the playground page, like GET /playground/... and /v1/: the OpenAI API)
    ("GET", "/v1/nothing", 404),
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
        ('{"text": "hi", "count": 1, "delay": 0, "text": 3}', "the key 'text' twice"),
        ("", "has no body"),
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
    assert f"client_max_body_size {limits.max_body_bytes};" in conf  # gRPC
    # HTTP: below what kills Triton's HTTP server (~4 MB), whatever the repository
    from kandinsky_repository.settings import DEFAULTS

    assert f"client_max_body_size {DEFAULTS.triton_http_max_body_bytes};" in conf
    assert DEFAULTS.triton_http_max_body_bytes < 4_181_000 < limits.max_body_bytes
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


# -- slow clients and abandoned work ----------------------------------------------------------------------


def _start_upload(http_url: str, path: str = "/v2/models/unet/infer") -> socket.socket:
    """A request whose body (1000 bytes announced) stalls after a few bytes."""
    host, port = http_url.split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"inp')
    return connection


def test_slow_uploads_take_no_in_flight_slot_and_are_cut_off(nginx_with_njs, triton_server, tiny_repository):
    """Stalled bodies held the address's in-flight slots (429 for its other requests for as long as they
    trickled). Now a request counts once its body has arrived, and a body stalled for the body timeout is
    closed."""
    options = _options(triton_server, tiny_repository, max_in_flight=2, body_timeout_s=2)
    with _gateway(options) as gateway:
        uploads = [_start_upload(gateway.http_url) for _ in range(4)]
        try:
            time.sleep(0.5)
            code, body = http("GET", f"http://{gateway.http_url}/v2/health/live")
            assert code == 200, body
            prompt = {"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": ["a cat"]}]}
            assert http("POST", f"http://{gateway.http_url}/v2/models/encode_prompt/infer", prompt)[0] == 200
            started = time.monotonic()
            for upload in uploads:
                answer = upload.recv(65536)  # the 408 (or nothing), then the connection is closed
                assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
                while answer:
                    answer = upload.recv(65536)
            assert time.monotonic() - started < 2 + 3, "stalled bodies are cut off after the body timeout"
        finally:
            for upload in uploads:
                upload.close()


SLEEPER_MODEL = '''
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Sleeps `delay` seconds per request, then answers it: a slow unary request."""

    def execute(self, requests):
        responses = []
        for request in requests:
            delay = pb_utils.get_input_tensor_by_name(request, "delay").as_numpy().reshape(-1)[0]
            time.sleep(float(delay))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("slept", np.array([delay]))]))
        return responses
'''
SLEEPER_CONFIG = """
name: "sleeper"
backend: "python"
max_batch_size: 0
input { name: "delay" data_type: TYPE_FP32 dims: [ 1 ] }
output { name: "slept" data_type: TYPE_FP32 dims: [ 1 ] }
instance_group { kind: KIND_CPU count: 1 }
"""


@pytest.fixture(scope="module")
def sleeper(tmp_path_factory):
    """Triton serving `sleeper` (one instance): its requests run one after the other."""
    root = tmp_path_factory.mktemp("sleeper") / "repository"
    (root / "sleeper" / "1").mkdir(parents=True)
    (root / "sleeper" / "config.pbtxt").write_text(SLEEPER_CONFIG)
    (root / "sleeper" / "1" / "model.py").write_text(SLEEPER_MODEL)
    with TritonServer(root, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
        yield server


def _sleep_body(seconds: float) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "delay", "shape": [1], "datatype": "FP32", "data": [seconds]}]}
    ).encode()


def test_abandoned_http_requests_keep_their_slots_until_triton_answers(nginx_with_njs, sleeper):
    """Triton's HTTP server cannot cancel a request whose client went away (it stops reading the
    connection while the request runs), and the per-step models have no queue policy, so no timeout
    applies: an abandoned request runs to its end. It used to free its address's in-flight slot at once,
    so one address could leave any number of them queued. Now the gateway keeps the slot until Triton has
    answered: an address never has more than its in-flight limit running, abandoned or not."""
    options = GatewayOptions(
        triton_http=sleeper.http_url,
        triton_grpc=sleeper.grpc_url,
        health=f"127.0.0.1:{free_port()}",
        repository=sleeper.repository,
        http_port=free_port(),
        grpc_port=free_port(),
        max_in_flight=2,
    )
    with _gateway(options) as gateway:
        url = f"http://{gateway.http_url}/v2/models/sleeper/infer"
        host, port = gateway.http_url.split(":")
        body = _sleep_body(1.5)
        abandoned_at = time.monotonic()
        for _ in range(2):  # sent whole, then the client goes away
            with socket.create_connection((host, int(port)), timeout=10) as connection:
                head = f"POST /v2/models/sleeper/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                connection.sendall(head.encode() + body)
                time.sleep(0.2)
        time.sleep(0.3)
        code, answer = http("POST", url, _sleep_body(0))
        assert code == 429 and "2 in flight" in answer["error"], (code, answer)
        # once Triton has run both (1.5 s each, one after the other), the address may send again
        wait_for(lambda: http("POST", url, _sleep_body(0))[0] == 200, 15, interval=0.2, what="a free slot")
        assert time.monotonic() - abandoned_at > 2.5, "the slots were held while the abandoned work ran"


def test_streams_pass_with_a_runtime_folder_inside_a_private_one(
    nginx_with_njs, ticker_server, ticker_repository, tmp_path
):
    """Under a root master nginx's workers run as nobody: they must still reach the stream relay when the
    runtime folder sits inside a folder only its owner may enter (pytest's, a benchmark's log folder)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    gateway = Gateway(_ticker_options(ticker_server, ticker_repository), private / "gateway")
    gateway.prepare()
    with gateway:
        tensors = []
        for name, value, dtype in (
            ("text", np.array([b"tick"], dtype=np.object_), "BYTES"),
            ("count", np.array([2], dtype=np.int32), "INT32"),
            ("delay", np.array([0.0], dtype=np.float32), "FP32"),
        ):
            tensor = grpcclient.InferInput(name, [1], dtype)
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        answers: queue.Queue = queue.Queue()
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            client.start_stream(
                callback=lambda result, error: answers.put(error or result.as_numpy("text")[0])
            )
            client.async_stream_infer("ticker", tensors)
            first = answers.get(timeout=30)
            client.stop_stream()
        assert first == b"tick 0", first
    assert gateway.relay_dir is None or not gateway.relay_dir.exists()
