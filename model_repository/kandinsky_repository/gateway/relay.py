"""The stream relay: gRPC `ModelStreamInfer` through the gateway, each message checked before Triton's.

nginx cannot check a gRPC stream's messages: njs sees a request body only once it has ended, and a
stream's body lasts the whole call (a server-side generation sends its request, then reads progress for
minutes). Yet a stream message is a `ModelInferRequest` like any other, and one whose shape overflows
int64 passes Triton's byte-size check and aborts a python-backend stub (a full server restart). So the
gateway's gRPC server hands `ModelStreamInfer` calls to this relay on a unix socket in its runtime folder.
The relay reads every message with protobuf (the reader Triton itself uses, so both see the same fields),
refuses the call with INVALID_ARGUMENT at the first message the gateway would refuse as a `ModelInfer`
(`check_infer_request`: the same rules and messages as files/kandinsky_gateway.js), and passes the others
unchanged to nginx's checked socket, which adds the key and picks the replica. Responses come back
unchanged; a call the client cancels is cancelled upstream, so Triton stops the generation.

It runs on an asyncio loop in a thread of the process that runs nginx (kandinsky-serve,
kandinsky-gateway): streams are few (one per server-side generation) and carry few messages, while every
per-step `ModelInfer` is checked by njs inside nginx.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2

from .limits import TRITON_ITEM_BYTES

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
METHOD = f"/{SERVICE}/ModelStreamInfer"
# InferTensorContents field that carries each datatype (FP16, BF16: raw_input_contents only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
CONTENTS_FIELDS = sorted(set(CONTENTS_FIELD.values()))
# Metadata not passed on: the transport's own, the bearer token, and Triton's restriction headers
# (nginx's checked socket sets the key).
_DROPPED = ("authorization", "user-agent", "te", "content-type")


def _shape_elements(name: str, shape: Sequence[int], limit: int) -> tuple[int, str | None]:
    """(elements, None), or (0, the problem): a non-empty list of integers >= 1 whose product is at
    most `limit` (checked step by step, as the JavaScript does)."""
    shown = "[" + ",".join(str(d) for d in shape) + "]"
    if not shape:
        return 0, f"input '{name}' shape must be a non-empty list of integers >= 1, not {shown}"
    if any(d < 1 for d in shape):
        return 0, f"input '{name}' shape must be a list of integers >= 1, not {shown}"
    count = 1
    for d in shape:
        count *= d
        if count > limit:
            return 0, (
                f"input '{name}' declares shape {shown} (more than {limit} elements); at most {limit} "
                "elements fit in the request"
            )
    return count, None


def _size_problem(name: str, datatype: str, count: int, size: int) -> str | None:
    item = TRITON_ITEM_BYTES[datatype]
    if item == 0:
        if count * 4 <= size:
            return None
        return (
            f"input '{name}' declares {count} BYTES elements but carries {size} bytes (each element "
            "takes 4 bytes at least)"
        )
    if count * item == size:
        return None
    return (
        f"input '{name}' declares {count} {datatype} elements ({count * item} bytes) but carries {size} bytes"
    )


def check_infer_request(request: service_pb2.ModelInferRequest, message_bytes: int) -> str | None:
    """Why the gateway refuses `request` (a message of `message_bytes`), or None: the rules of the njs
    `checkGrpcRequest` (files/kandinsky_gateway.js), with its messages."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        return (
            f"the request carries {len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one "
            "per input (or typed contents for all)"
        )
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if "shared_memory_region" in tensor.parameters:
            return f"input '{name}': shared-memory inputs are not accepted through the gateway"
        if tensor.datatype not in TRITON_ITEM_BYTES:
            return f"input '{name}' datatype \"{tensor.datatype}\" is not one of {', '.join(sorted(TRITON_ITEM_BYTES))}"
        count, problem = _shape_elements(name, list(tensor.shape), message_bytes)
        if problem is None and raw:
            if tensor.HasField("contents"):
                return f"input '{name}' carries contents beside raw_input_contents"
            problem = _size_problem(name, tensor.datatype, count, len(raw[index]))
        elif problem is None and tensor.HasField("contents"):
            wanted = CONTENTS_FIELD.get(tensor.datatype)
            counts = {field: len(getattr(tensor.contents, field)) for field in CONTENTS_FIELDS}
            if any(n and field != wanted for field, n in counts.items()):
                return f"input '{name}' of {tensor.datatype} carries contents of another type"
            carried = counts.get(wanted, 0) if wanted else 0
            if carried != count:
                problem = f"input '{name}' declares {count} elements but carries {carried}" + (
                    "" if wanted else f" ({tensor.datatype} travels as raw_input_contents only)"
                )
        elif problem is None:
            problem = f"input '{name}' carries no data (neither contents nor raw_input_contents)"
        if problem is not None:
            return problem
    for output in request.outputs:
        if "shared_memory_region" in output.parameters:
            return f"output '{output.name}': shared-memory outputs are not accepted through the gateway"
    return None


def check_message(message: bytes) -> str | None:
    try:
        request = service_pb2.ModelInferRequest.FromString(message)
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and friends: refuse, never crash
        return f"the message is not a ModelInferRequest ({error})"
    return check_infer_request(request, len(message))


def _forwarded(metadata: Sequence[tuple[str, str | bytes]] | None) -> list[tuple[str, str | bytes]]:
    return [
        (key, value)
        for key, value in metadata or ()
        if not key.startswith((":", "grpc-", "triton-grpc-protocol-")) and key not in _DROPPED
    ]


class StreamRelay:
    """A gRPC server on `listen` (a unix socket) relaying checked ModelStreamInfer calls to `upstream`."""

    def __init__(self, listen: Path, upstream: Path, max_message_bytes: int) -> None:
        self.listen, self.upstream, self.max_message_bytes = Path(listen), Path(upstream), max_message_bytes
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.refused = 0  # calls refused so far (for logs and tests)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        with contextlib.suppress(FileNotFoundError):
            self.listen.unlink()  # left by a process that was killed
        self._started.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="stream-relay", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the gateway's stream relay did not start on {self.listen}: {self._error}")

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self.running:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None
        with contextlib.suppress(FileNotFoundError):
            self.listen.unlink()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # noqa: BLE001 - reported to start() or logged
            self._error = error
            logger.exception("the gateway's stream relay stopped")
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        async with grpc.aio.insecure_channel(f"unix:{self.upstream}", options=unlimited) as channel:
            self._call = channel.stream_stream(METHOD)  # bytes in, bytes out
            server = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", self.max_message_bytes),
                    ("grpc.max_send_message_length", -1),
                ]
            )
            handler = grpc.method_handlers_generic_handler(
                SERVICE, {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self._relay)}
            )
            server.add_generic_rpc_handlers((handler,))
            server.add_insecure_port(f"unix:{self.listen}")
            await server.start()
            os.chmod(self.listen, 0o666)  # nginx's workers (nobody, under a root master) connect to it
            self._started.set()
            try:
                await self._stopping.wait()
            finally:
                await server.stop(grace=1.0)

    async def _relay(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        refused: list[str] = []

        async def checked() -> AsyncIterator[bytes]:
            async for message in requests:
                problem = check_message(message)
                if problem is not None:
                    refused.append(problem)
                    call.cancel()
                    return
                yield message

        remaining = context.time_remaining()
        call = self._call(
            checked(),
            metadata=_forwarded(context.invocation_metadata()),
            timeout=None if remaining is None or math.isinf(remaining) else remaining,
        )
        try:
            async for response in call:
                yield response
        except (asyncio.CancelledError, grpc.aio.AioRpcError) as error:
            if refused:
                self.refused += 1
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused[0])
            if isinstance(error, asyncio.CancelledError):  # the client went away: so does Triton's call
                call.cancel()
                raise
            await context.abort(error.code(), error.details() or "")
        if refused:
            self.refused += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused[0])
