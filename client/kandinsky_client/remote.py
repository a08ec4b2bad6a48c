"""Server-side generation from the client: one streamed request to the `kandinsky` model per generation.

gRPC uses Triton's bidirectional stream (`ModelStreamInfer`); HTTP uses the generate extension's
`generate_stream` (server-sent events). Both carry progress responses when a step callback is given, and
both cancel the server-side loop when the caller stops waiting: the gRPC stream is cancelled, the HTTP
connection is closed (Triton cancels a streamed request whose client went away).
"""

from __future__ import annotations

import http.client
import json
import queue
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from kandinsky_core.errors import (
    InvalidRequest,
    KandinskyClientError,
    RequestTimeout,
    ServerBusy,
    ServerUnavailable,
    error_from_message,
)
from kandinsky_core.generation import Generation, StepCallback
from kandinsky_core.request import GenerationRequest
from kandinsky_core.wire import (
    FINAL_OUTPUT,
    MODEL_NAME,
    ResponseOptions,
    decode_images,
    generation_from_outputs,
    request_inputs,
    request_json,
    scalar,
)
from PIL import Image

# on_preview(stage, step, images): preview images the server sends every `preview_every` decoder steps.
PreviewCallback = Callable[[str, int, list[Image.Image]], None]


class _Progress:
    """Turns progress responses into the step callback (0-based step index, like diffusers) and previews."""

    def __init__(self, callback: StepCallback | None, on_preview: PreviewCallback | None) -> None:
        self.callback, self.on_preview = callback, on_preview

    def __call__(self, outputs: Mapping[str, Any]) -> None:
        stage, step = scalar(outputs, "stage"), int(scalar(outputs, "step")) - 1
        if self.callback is not None:
            replaced = self.callback(stage, step, int(scalar(outputs, "timestep")), None)
            if replaced is not None:
                raise InvalidRequest(
                    "callback_on_step_end",
                    "returned latents, which only the client-side loop can replace (loop='client')",
                )
        if self.on_preview is not None and outputs.get("preview") is not None:
            self.on_preview(stage, step, decode_images(outputs["preview"]))


class RemoteGenerator:
    """Runs generation requests on the server's `kandinsky` model over gRPC or HTTP."""

    def __init__(
        self, url: str, protocol: str, timeout_s: float, headers: Mapping[str, str], embed_dim: int
    ) -> None:
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.headers = dict(headers)
        self.embed_dim = embed_dim

    def generate(
        self,
        request: GenerationRequest,
        *,
        callback_on_step_end: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
        preview_every: int = 0,
        return_image_embeds: bool = True,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> Generation:
        """`shapes`: output shapes known from the request (see wire.generation_from_outputs)."""
        progress = callback_on_step_end is not None or on_preview is not None
        options = ResponseOptions(
            return_image_embeds=return_image_embeds,
            progress=progress,
            preview_every=preview_every if on_preview is not None else 0,
            timeout_s=self.timeout_s,
        )
        started = time.perf_counter()
        self.shapes = dict(shapes or {})
        handle = _Progress(callback_on_step_end, on_preview)
        run = self._grpc if self.protocol == "grpc" else self._http
        generation = run(request, options, handle)
        generation.timings["request"] = time.perf_counter() - started
        return generation

    def _deadline_error(self) -> RequestTimeout:
        return RequestTimeout(f"the generation did not finish within {self.timeout_s:g} s (cancelled)")

    # -- gRPC ------------------------------------------------------------------------------------

    def _grpc(self, request: GenerationRequest, options: ResponseOptions, progress: _Progress) -> Generation:
        import tritonclient.grpc as grpcclient

        inputs = []
        for name, array in request_inputs(request, options).items():
            tensor = grpcclient.InferInput(name, list(array.shape), _triton_dtype(array))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + self.timeout_s
        finished = False
        try:
            client.start_stream(
                callback=lambda result, error: responses.put((result, error)), headers=self.headers or None
            )
            client.async_stream_infer(MODEL_NAME, inputs, timeout=int(self.timeout_s * 1e6))
            while True:
                try:
                    result, error = responses.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    raise self._deadline_error() from None
                if error is not None:
                    raise _stream_error(error, self.url)
                names = {o.name for o in result.get_response().outputs}
                outputs = {name: result.as_numpy(name) for name in names}
                if FINAL_OUTPUT in outputs:
                    finished = True
                    return generation_from_outputs(outputs, self.embed_dim, self.shapes)
                progress(outputs)
        finally:
            # Cancelling an unfinished stream stops the server-side loop within one step.
            client.stop_stream(cancel_requests=not finished)
            client.close()

    # -- HTTP ------------------------------------------------------------------------------------

    def _http(self, request: GenerationRequest, options: ResponseOptions, progress: _Progress) -> Generation:
        host, _, port = self.url.removeprefix("http://").partition(":")
        connection = http.client.HTTPConnection(host, int(port or 80), timeout=self.timeout_s)
        deadline = time.monotonic() + self.timeout_s
        body = json.dumps(request_json(request, options))
        try:
            try:
                connection.request(
                    "POST",
                    f"/v2/models/{MODEL_NAME}/generate_stream",
                    body=body,
                    headers={"Content-Type": "application/json", **self.headers},
                )
                response = connection.getresponse()
            except (ConnectionError, socket.gaierror) as error:
                raise ServerUnavailable(f"no server answers at '{self.url}' over http: {error}") from error
            if response.status != 200 and "text/event-stream" not in (
                response.getheader("Content-Type") or ""
            ):
                raise _http_error(response.status, response.read(), self.url)
            for event in _sse_events(response, deadline):
                if "error" in event:
                    raise error_from_message(MODEL_NAME, str(event["error"]))
                if FINAL_OUTPUT in event:
                    return generation_from_outputs(event, self.embed_dim, self.shapes)
                progress(event)
            raise ServerUnavailable(f"'{self.url}' closed the stream before the final response")
        except TimeoutError:
            raise self._deadline_error() from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise ServerUnavailable(
                f"lost the server at '{self.url}' during the generation: {error!r}"
            ) from error
        finally:
            connection.close()  # a generation still running on the server is cancelled by this


def _sse_events(response: http.client.HTTPResponse, deadline: float) -> Any:
    """The JSON payloads of a server-sent event stream (`data: {...}` lines), until it ends."""
    for line in response:
        if time.monotonic() > deadline:
            raise TimeoutError
        if line.startswith(b"data:"):
            yield json.loads(line[5:].strip())


def _http_error(status: int, body: bytes, url: str) -> KandinskyClientError:
    try:
        message = str(json.loads(body).get("error", body.decode("utf-8", "replace")))
    except (json.JSONDecodeError, AttributeError):
        message = body.decode("utf-8", "replace")
    if status in (502, 503, 504):
        return ServerUnavailable(f"'{url}' answered HTTP {status}: {message}")
    if status == 429:
        return ServerBusy(f"'{url}' answered HTTP 429 (rate limit): {message}")
    return error_from_message(MODEL_NAME, message)


# HTTP/2 stream reset by the peer: what a gRPC proxy sends when the server behind it goes away mid-call.
_STREAM_RESET = re.compile(r"RST_STREAM|Stream removed", re.I)


def _stream_error(error: Exception, url: str) -> KandinskyClientError:
    status = str(getattr(error, "status", lambda: "")() or "")
    message = getattr(error, "message", lambda: str(error))() or str(error)
    if "UNAVAILABLE" in status:
        return ServerUnavailable(f"no server answers at '{url}' over grpc: {message}")
    if _STREAM_RESET.search(message):  # a proxy (the gateway) lost the replica running the generation
        return ServerUnavailable(f"lost the server at '{url}' during the generation (grpc): {message}")
    if "RESOURCE_EXHAUSTED" in status and "rate" in message.lower():
        return ServerBusy(f"'{url}' rate-limits this client: {message}")
    return error_from_message(MODEL_NAME, message)


def _triton_dtype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)
