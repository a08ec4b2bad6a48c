"""Server-side generation from the client: one streamed request to the `kandinsky` model per generation.

gRPC uses Triton's bidirectional stream (`ModelStreamInfer`); HTTP uses the generate extension's
`generate_stream` (server-sent events). Both carry progress responses when a step callback is given, and
both cancel the server-side loop when the caller stops waiting: the gRPC stream is cancelled, the HTTP
connection is closed (Triton cancels a streamed request whose client went away). Every failure is
classified by `kandinsky_core.errors` (one table for both protocols and the unary transport); a stream
that ends or is reset before its final response is `ServerUnavailable`, so the generation is retried
whole (the caller's retry policy, see pipeline.py).
"""

from __future__ import annotations

import http.client
import json
import queue
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from kandinsky_core.errors import (
    InvalidRequest,
    KandinskyClientError,
    RequestTimeout,
    ServerUnavailable,
    classify,
    classify_exception,
    classify_http,
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

from .transport import grpc_channel_args

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
        client = grpcclient.InferenceServerClient(self.url, channel_args=grpc_channel_args())
        deadline = time.monotonic() + self.timeout_s
        finished = False
        try:
            client.start_stream(
                callback=lambda result, error: responses.put((result, error)), headers=self.headers or None
            )
            try:
                client.async_stream_infer(MODEL_NAME, inputs, timeout=int(self.timeout_s * 1e6))
            except Exception as error:  # noqa: BLE001 - classified below
                # "The stream is no longer in valid state": the stream's call already failed (refused,
                # reset); its reason goes to the callback, which is the better error to raise.
                raise self._stream_failure(responses, error) from error
            while True:
                try:
                    result, error = responses.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    raise self._deadline_error() from None
                if error is not None:
                    raise self._classified(error) from error
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

    def _classified(self, error: BaseException) -> KandinskyClientError:
        classified = classify_exception(error, model=MODEL_NAME, url=self.url, timeout_s=self.timeout_s)
        if classified is None:
            raise error
        return classified

    def _stream_failure(self, responses: queue.Queue, error: BaseException) -> KandinskyClientError:
        """The error of a stream that failed before the request went out: the callback's, when it comes
        within a moment, else the one raised (a stream reset, ServerUnavailable either way)."""
        try:
            _, reported = responses.get(timeout=_STREAM_ERROR_WAIT_S)
        except queue.Empty:
            reported = None
        return self._classified(reported if reported is not None else error)

    # -- HTTP ------------------------------------------------------------------------------------

    def _http(self, request: GenerationRequest, options: ResponseOptions, progress: _Progress) -> Generation:
        host, _, port = self.url.removeprefix("http://").partition(":")
        connection = http.client.HTTPConnection(host, int(port or 80), timeout=self.timeout_s)
        deadline = time.monotonic() + self.timeout_s
        body = json.dumps(request_json(request, options))
        try:
            connection.request(
                "POST",
                f"/v2/models/{MODEL_NAME}/generate_stream",
                body=body,
                headers={"Content-Type": "application/json", **self.headers},
            )
            response = connection.getresponse()
            if response.status != 200 and "text/event-stream" not in (
                response.getheader("Content-Type") or ""
            ):
                raise classify_http(
                    response.status,
                    response.read(),
                    model=MODEL_NAME,
                    url=self.url,
                    retry_after_header=response.getheader("Retry-After"),
                )
            for event in _sse_events(response, deadline):
                if "error" in event:
                    raise classify(None, str(event["error"]), model=MODEL_NAME, url=self.url)
                if FINAL_OUTPUT in event:
                    return generation_from_outputs(event, self.embed_dim, self.shapes)
                progress(event)
            raise ServerUnavailable(
                f"model '{MODEL_NAME}': '{self.url}' closed the stream before the final response"
            )
        except KandinskyClientError:
            raise
        except TimeoutError:
            raise self._deadline_error() from None
        except Exception as error:  # noqa: BLE001 - refused, reset, cut: classified (others propagate)
            raise self._classified(error) from error
        finally:
            connection.close()  # a generation still running on the server is cancelled by this


# How long a failed stream's callback is waited for, for the reason of the failure.
_STREAM_ERROR_WAIT_S = 1.0


def _sse_events(response: http.client.HTTPResponse, deadline: float) -> Any:
    """The JSON payloads of a server-sent event stream (`data: {...}` lines), until it ends."""
    for line in response:
        if time.monotonic() > deadline:
            raise TimeoutError
        if line.startswith(b"data:"):
            yield json.loads(line[5:].strip())


def _triton_dtype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)
