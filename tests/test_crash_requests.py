"""Requests that crash Triton's own readers, sent to every port a default `kandinsky-serve` opens.

Triton 2.51 aborts on a JSON tensor whose declared shape it cannot allocate (it allocates before it counts
the data), segfaults on deeply nested JSON, allocates gigabytes for a 100-byte request, and lets a shape
whose product overflows int64 (or that holds a 0 beside a huge dimension) through its byte-size check to a
python-backend stub, which aborts. A default `kandinsky-serve` opens: the gateway's HTTP and gRPC ports,
Triton's internal HTTP and gRPC ports (loopback; inference needs the admin key, which only the gateway
adds), Triton's metrics port and the deep-health port. Every request of the table goes to every one of
them; each must get a clear refusal (the gateway's names the field or limit), and the server must still be
the same process, never recovered, and still generate. (A body of more than ~4 MB kills Triton's HTTP
server too, however valid: the gateway's HTTP port takes less.)
"""

from __future__ import annotations

import json
import queue
import socket

import grpc
import pytest
from kandinsky_client.pipeline import KandinskyClient
from tritonclient.grpc import service_pb2

from .serving import generate_once, http, start_serve

HUGE = 2**62


@pytest.fixture(scope="module")
def served(nginx_with_njs, tiny_repository, tmp_path_factory):
    """`kandinsky-serve` with its defaults (the test admin key aside)."""
    server = start_serve(tiny_repository, tmp_path_factory.mktemp("crash"))
    yield server
    server.stop()


def _tensor(model: str, shape: list, data: list | None = None) -> tuple[str, bytes, dict]:
    tensor = {"name": "image_rgb", "shape": shape, "datatype": "UINT8"}
    if data is not None:
        tensor["data"] = data
    return f"/v2/models/{model}/infer", json.dumps({"inputs": [tensor]}).encode(), {}


def _binary(model: str, shape: list, size: int) -> tuple[str, bytes, dict]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image_rgb",
                    "shape": shape,
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    ).encode()
    return (
        f"/v2/models/{model}/infer",
        header + bytes(size),
        {"Inference-Header-Content-Length": str(len(header))},
    )


MOVQ, CLIP = "preprocess_movq_image", "preprocess_clip_image"
# 200 KB of nesting: Triton's rapidjson recurses until its stack overflows (SIGSEGV)
DEEP = b'{"inputs": ' + b"[" * 200_000
DEEP_DATA = (
    b'{"inputs": [{"name": "image_rgb", "shape": [1], "datatype": "UINT8", "data": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}]}"
)
# (id, (path, body, headers), what the gateway's refusal says)
HTTP_REQUESTS = [
    (
        "declared-shape",
        _tensor(MOVQ, [1, 100000, 100000, 3], [1, 2, 3]),
        "declares shape [1,100000,100000,3]",
    ),
    ("gigabyte-shape", _tensor(MOVQ, [1, 20000, 20000, 3], [1, 2, 3]), "at most 3145728 elements"),
    ("overflowing-shape", _tensor(CLIP, [1, HUGE, HUGE, 3], [1, 2, 3]), "declares shape"),
    ("zero-and-huge-dimension", _tensor(CLIP, [1, 0, HUGE, 3], []), "integers >= 1"),
    (
        "duplicate-shape-key",
        (
            f"/v2/models/{MOVQ}/infer",
            b'{"inputs": [{"name": "image_rgb", "shape": [1, 100000, 100000, 3], "shape": [1, 1, 1, 3], '
            b'"datatype": "UINT8", "data": [1, 2, 3]}]}',
            {},
        ),
        "the key 'shape' twice",
    ),
    ("deep-nesting", (f"/v2/models/{MOVQ}/infer", DEEP, {}), "nested deeper than 32 levels"),
    ("deep-nesting-data", (f"/v2/models/{MOVQ}/infer", DEEP_DATA, {}), "nested deeper than 32 levels"),
    ("deep-nesting-index", ("/v2/repository/index", DEEP, {}), "nested deeper than 32 levels"),
    ("empty-body", (f"/v2/models/{MOVQ}/infer", b"", {}), "has no body"),
    ("malformed-json", (f"/v2/models/{MOVQ}/infer", b'{"inputs": [', {}), "not valid JSON"),
    ("binary-overflowing-shape", _binary(CLIP, [1, HUGE, HUGE, 3], 0), "declares shape"),
    ("binary-zero-dimension", _binary(CLIP, [1, 0, HUGE, 3], 0), "integers >= 1"),
    # more than ~4 MB: Triton's HTTP server overflows its thread's stack (413: the gateway's HTTP limit)
    ("body-over-4-mb", _binary(MOVQ, [1, 1200, 1200, 3], 1200 * 1200 * 3), "bytes over HTTP"),
]


def _grpc_request(shape: list, raw: bytes = b"") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=CLIP)
    tensor = request.inputs.add(name="image_rgb", datatype="UINT8")
    tensor.shape.extend(shape)
    request.raw_input_contents.append(raw)
    return request


GRPC_REQUESTS = [
    ("raw-overflowing-shape", "unary", _grpc_request([1, HUGE, HUGE, 3]), "declares shape"),
    ("raw-zero-dimension", "unary", _grpc_request([1, 0, HUGE, 3]), "integers >= 1"),
    ("stream-overflowing-shape", "stream", _grpc_request([1, HUGE, HUGE, 3]), "declares shape"),
    ("stream-zero-dimension", "stream", _grpc_request([1, 0, HUGE, 3]), "integers >= 1"),
]


def _raw_http(port: int, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    """(status, body) of one POST over a fresh connection; (0, why) when the connection broke."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{head}"
        "Connection: close\r\n\r\n"
    ).encode() + body
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            connection.sendall(request)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
    except OSError as error:
        return 0, str(error).encode()
    if not answer:
        return 0, b"connection closed without an answer"
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _grpc_call(port: int, kind: str, request: service_pb2.ModelInferRequest) -> tuple[str, str]:
    """(status code name, details) of one ModelInfer or ModelStreamInfer call."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = f"/inference.GRPCInferenceService/{'ModelInfer' if kind == 'unary' else 'ModelStreamInfer'}"
        try:
            if kind == "unary":
                channel.unary_unary(method)(request.SerializeToString(), timeout=30)
                return "OK", ""
            done: queue.Queue = queue.Queue()

            def requests():
                yield request.SerializeToString()
                done.get(timeout=30)  # keep the stream open until the answer (as a client does)

            for response in channel.stream_stream(method)(requests(), timeout=30):
                done.put(True)
                reply = service_pb2.ModelStreamInferResponse.FromString(response)
                return "STREAM_ERROR" if reply.error_message else "OK", reply.error_message
            return "OK", "stream ended"
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""


def _same_server(served, before: dict) -> None:
    status, after = served.health()
    assert status == 200, after
    assert after["triton_pid"] == before["triton_pid"] and after["recoveries"] == 0, after


@pytest.mark.parametrize(("name", "request_", "refusal"), HTTP_REQUESTS, ids=[r[0] for r in HTTP_REQUESTS])
def test_http_crash_requests_are_refused_on_every_port(served, name, request_, refusal):
    status, before = served.health()
    assert status == 200, before
    path, body, headers = request_
    # the gateway: 400 naming what is wrong
    code, answer = _raw_http(served.http_port, path, body, headers)
    assert code == (413 if name == "body-over-4-mb" else 400), (code, answer[:300])
    assert refusal in json.loads(answer)["error"], answer[:300]
    # Triton's own HTTP port: refused before the body is read (inference and the repository API need
    # the admin key, which only the gateway adds)
    code, answer = _raw_http(served.triton_http_port(), path, body, headers)
    assert code == 403 and "restricted" in json.loads(answer)["error"], (code, answer[:300])
    # metrics and deep health: no such route (neither reads a body)
    for port in (served.metrics_port, served.health_port):
        code, answer = _raw_http(port, path, body, headers)
        assert code in (404, 405) and json.loads(answer)["error"], (port, code, answer[:300])
    _same_server(served, before)


@pytest.mark.parametrize(
    ("name", "kind", "request_", "refusal"), GRPC_REQUESTS, ids=[r[0] for r in GRPC_REQUESTS]
)
def test_grpc_crash_requests_are_refused_on_every_port(served, name, kind, request_, refusal):
    status, before = served.health()
    assert status == 200, before
    code, details = _grpc_call(served.grpc_port, kind, request_)
    assert code == "INVALID_ARGUMENT" and refusal in details, (code, details)
    code, details = _grpc_call(served.triton_grpc_port(), kind, request_)
    assert code == "UNAVAILABLE" and "restricted" in details, (code, details)
    _same_server(served, before)


def test_still_serving_after_the_table(served):
    status, report = served.health()
    assert status == 200 and report["recoveries"] == 0, report
    with KandinskyClient(served.grpc_url, protocol="grpc") as client:
        generate_once(client)
    with KandinskyClient(served.http_url, protocol="http") as client:
        generate_once(client)
    assert http("GET", f"http://{served.http_url}/v2/health/ready")[0] == 200
