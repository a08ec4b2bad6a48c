"""The OpenAI Images API and the playground page, as one Starlette app in front of the `kandinsky` model.

Routes:
  POST /v1/images/generations   JSON                 -> text_to_image
  POST /v1/images/edits         multipart            -> fuse, outpaint, inpaint or image_to_image (fields.py)
  POST /v1/images/variations    multipart            -> variations
  GET  /v1/models, /v1/models/{id}                   the served model, with its limits under "kandinsky"
  GET  /                         the playground page (static files under /playground/)
  GET  /health/live, /health/ready                   this process; the `kandinsky` model ready behind it

Each request is checked against the served checkpoint's limits (the core's validation, the server's
messages), then runs as one gRPC stream to the `kandinsky` model. With `stream: true` the answer is
OpenAI's server-sent events (`image_generation.partial_image` / `image_edit.partial_image` from the
server loop's previews, then `...completed`, one per image). An HTTP client that goes away cancels its
stream, and Triton stops the loop before its next step. Every failure is OpenAI's error object
(errors.py); bodies are capped before they are read (`body_limit`), and /v1 needs the bearer token when one
is set.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from kandinsky_core.components import MAX_PROMPT_BYTES
from kandinsky_core.errors import KandinskyClientError
from kandinsky_core.generation import DECODER_STAGE, Plan
from kandinsky_core.images import MAX_IMAGE_FILE_BYTES
from kandinsky_core.request import INPAINT, OUTPAINT, field_specs
from kandinsky_core.schedulers.factory import DECODER_SCHEDULERS
from kandinsky_core.server_info import ServerInfo
from kandinsky_core.validation import plan_request
from kandinsky_core.wire import FINAL_OUTPUT, ResponseOptions, request_inputs
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import fields as api
from .errors import APIError, ClientGone, from_server_error
from .triton import KandinskyModel

logger = logging.getLogger(__name__)

PLAYGROUND = Path(__file__).parent / "playground"
MIB = 1 << 20
# Body caps, checked before a byte is parsed. JSON: a request with prompts of MAX_PROMPT_BYTES, each byte
# escaped as \uXXXX (6 characters), fits with room to spare. Multipart: an image and its mask at the
# largest image file the server reads (MAX_IMAGE_FILE_BYTES each), and 1 MiB for the other fields.
MAX_JSON_BODY_BYTES = MIB
MAX_MULTIPART_BODY_BYTES = 2 * MAX_IMAGE_FILE_BYTES + MIB
MAX_FORM_FIELDS = 64  # text fields of one multipart request (every endpoint has fewer than 40)
MAX_FORM_FIELD_BYTES = 16 * MAX_PROMPT_BYTES  # one text field (a prompt is at most MAX_PROMPT_BYTES)
MULTIPART_ROUTES = ("/v1/images/edits", "/v1/images/variations")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: pass events on at once
MODE_HEADER = "kandinsky-mode"  # which generation mode an edit ran (fields.py's table)
RETRY_AFTER_S = 1  # with 429 (busy) and 503 (not ready): OpenAI's SDKs wait this long before retrying

T = TypeVar("T")


def body_limit(path: str) -> int:
    """The body cap of a route (the gateway's caps for these routes should be the same)."""
    if path in MULTIPART_ROUTES:
        return MAX_MULTIPART_BODY_BYTES
    return MAX_JSON_BODY_BYTES


class JSON(JSONResponse):
    """JSON in ASCII: a message may quote what a client sent, lone surrogates included (not UTF-8)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body exceeds {limit} bytes ({limit / MIB:.0f} MiB), the most this route accepts",
        code="request_too_large",
    )


class Guard:
    """ASGI middleware: the bearer token on /v1 (when set) and the body cap, before the app reads a byte.

    A declared Content-Length over the cap is refused at once; a chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value for key, value in scope["headers"]}
        if self.token and scope["path"].startswith("/v1/") and not self._authorized(headers):
            await _error_response(_unauthorized(headers))(scope, receive, send)
            return
        limit = body_limit(scope["path"])
        declared = headers.get("content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            await _error_response(_too_large(limit))(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        given = headers.get("authorization", b"").decode("latin-1")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())


def _unauthorized(headers: dict[str, bytes]) -> APIError:
    if "authorization" not in headers:
        message = "no API key given: send the server's token as 'Authorization: Bearer <token>'"
    else:
        message = "incorrect API key: 'Authorization: Bearer <token>' must carry the server's token"
    return APIError(401, message, code="invalid_api_key")


def _error_response(error: APIError) -> JSON:
    retry = {"Retry-After": str(RETRY_AFTER_S)} if error.status in (429, 503) else None
    return JSON(error.body(), status_code=error.status, headers=retry)


# -- requests ----------------------------------------------------------------------------------------


async def _json_fields(request: Request, endpoint: str) -> api.Fields:
    if request.headers.get("content-type", "").startswith("multipart/"):
        raise APIError(
            400, f"{endpoint} takes a JSON body (application/json), not multipart", code="invalid_json"
        )
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(400, f"the body is not valid JSON ({error})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the body is JSON nested too deeply", code="invalid_json") from None
    return api.Fields.from_json(body, endpoint)


async def _multipart_fields(request: Request, endpoint: str) -> api.Fields:
    """A multipart body as fields (files as bytes); `name[]` (how OpenAI's SDKs send lists) is `name`."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(
            400,
            f"{endpoint} takes a multipart/form-data body (as OpenAI's SDKs send it: the image as a file part)",
            code="invalid_multipart",
        )
    values: dict[str, list[Any]] = {}
    async with request.form(
        max_files=api.MAX_EDIT_IMAGES + 1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_FIELD_BYTES
    ) as form:
        for key, value in form.multi_items():
            name = key.removesuffix("[]")
            values.setdefault(name, []).append(value if isinstance(value, str) else await value.read())
    return api.Fields(values, multipart=True, endpoint=endpoint)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled (the server stops)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()  # the gRPC stream under it is cancelled with it
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone


# -- answers -----------------------------------------------------------------------------------------


def encode(encoded_png: Any, output: api.Output) -> str:
    """One image from the server (base64 PNG) as base64 in the requested format."""
    text = encoded_png.decode("ascii") if isinstance(encoded_png, bytes) else str(encoded_png)
    if output.output_format == "png":
        return text  # the server's own PNG: the same pixels as any other client gets
    with Image.open(io.BytesIO(base64.b64decode(text))) as picture:
        buffer = io.BytesIO()
        quality = 100 if output.compression is None else output.compression
        picture.convert("RGB").save(buffer, format=output.output_format.upper(), quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _encode_all(encoded: Any, output: api.Output) -> list[str]:
    return [encode(item, output) for item in np.asarray(encoded, dtype=object).reshape(-1)]


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


class _Job:
    """One checked request on its way to the `kandinsky` model, and what its answer says about it."""

    def __init__(self, call: api.ImagesCall, plan: Plan, events: str) -> None:
        self.call, self.checked, self.events = call, plan.request, events
        checked = plan.request
        partial = call.output.partial_images
        decoder_steps = plan.loop_steps[DECODER_STAGE]
        # Previews spread over the decoder loop, none at its last step (that one is the final image).
        self.preview_every = max(1, decoder_steps // (partial + 1)) if partial else 0
        self.size = f"{checked.width}x{checked.height}"
        self.created = int(time.time())

    def inputs(self) -> dict[str, np.ndarray]:
        """The request as sent (its images as given) with the seed the check drew, as KandinskyClient does."""
        options = ResponseOptions(progress=self.preview_every > 0, preview_every=self.preview_every)
        return request_inputs(self.call.request.with_values(seed=self.checked.seed), options)

    def described(self) -> dict[str, Any]:
        out = self.call.output
        return {
            "output_format": out.output_format,
            "size": self.size,
            "background": "opaque",
            "quality": "auto",
        }

    def response(self, images: list[str]) -> JSON:
        body = {
            "created": self.created,
            "data": [{"b64_json": image} for image in images],
            **self.described(),
            "seed": self.checked.seed,  # not OpenAI's: the seed that redoes these images
        }
        return JSON(body, headers={MODE_HEADER: self.checked.mode})

    def event(self, kind: str, image: str, **extra: Any) -> bytes:
        payload = {
            "type": f"{self.events}.{kind}",
            "b64_json": image,
            "created_at": int(time.time()),
            **self.described(),
            **extra,
        }
        return _sse(payload["type"], payload)


async def _answer(request: Request, call: api.ImagesCall, events: str) -> Response:
    model: KandinskyModel = request.app.state.model
    info = await model.info()
    plan = await run_in_threadpool(plan_request, call.request, info)
    job = _Job(call, plan, events)
    checked = plan.request
    inputs = await run_in_threadpool(job.inputs)
    logger.info("%s %s %s user=%r", request.url.path, checked.mode, api.describe(call), call.output.user)
    responses = model.stream(inputs)
    # The first response (an error, a progress step or the final images) before the status is sent, so a
    # request the server refuses gets its own status, also when it asked for events.
    try:
        first = await _unless_disconnected(request, anext(responses))
    except BaseException:
        await responses.aclose()
        raise
    if call.output.stream:
        return StreamingResponse(
            _events(job, first, responses),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, MODE_HEADER: checked.mode},
        )
    outputs = first
    try:
        while FINAL_OUTPUT not in outputs:
            outputs = await _unless_disconnected(request, anext(responses))
    finally:
        await responses.aclose()
    images = await run_in_threadpool(_encode_all, outputs["image"], call.output)
    return job.response(images)


async def _events(
    job: _Job, first: dict[str, np.ndarray], responses: AsyncGenerator[dict[str, np.ndarray], None]
) -> AsyncIterator[bytes]:
    """OpenAI's image events. Starlette cancels this when the client disconnects, which cancels the stream."""
    output = job.call.output
    sent = 0
    outputs = first
    try:
        while True:
            if FINAL_OUTPUT in outputs:
                for image in await run_in_threadpool(_encode_all, outputs["image"], output):
                    yield job.event("completed", image, seed=job.checked.seed)
                return
            if outputs.get("preview") is not None and sent < output.partial_images:
                for image in await run_in_threadpool(_encode_all, outputs["preview"], output):
                    yield job.event("partial_image", image, partial_image_index=sent)
                sent += 1
            outputs = await anext(responses)
    except (KandinskyClientError, APIError) as error:
        failure = from_server_error(error)
        logger.info("generation failed after its first response: %s", failure.message)
        yield _sse("error", {"type": "error", **failure.body()})
    finally:
        await responses.aclose()


# -- routes ------------------------------------------------------------------------------------------


async def generations(request: Request) -> Response:
    fields = await _json_fields(request, "/v1/images/generations")
    call = await run_in_threadpool(api.generation, fields)
    return await _answer(request, call, "image_generation")


async def edits(request: Request) -> Response:
    fields = await _multipart_fields(request, "/v1/images/edits")
    call = await run_in_threadpool(api.edit, fields)
    return await _answer(request, call, "image_edit")


async def variations(request: Request) -> Response:
    fields = await _multipart_fields(request, "/v1/images/variations")
    call = await run_in_threadpool(api.variation, fields)
    return await _answer(request, call, "image_generation")


def model_object(info: ServerInfo, served: list[str], created: int) -> dict[str, Any]:
    """OpenAI's model object; "kandinsky" says what the playground page (and any client) may ask for."""
    specs = field_specs()
    defaults = {
        name: specs[name].default
        for name in (
            "num_inference_steps",
            "prior_num_inference_steps",
            "guidance_scale",
            "prior_guidance_scale",
            "strength",
        )
    }
    inpainting = "unet_inpaint" in served
    return {
        "id": api.MODEL_ID,
        "object": "model",
        "created": created,
        "owned_by": "kandinsky",
        "kandinsky": {
            "modes": [m for m in api.API_MODES if inpainting or m not in (INPAINT, OUTPAINT)],
            "size_multiple": info.dims.size_multiple,
            "min_image_size": max(info.dims.size_multiple, info.min_image_size),
            "max_image_size": info.max_image_size,
            "static_size": list(info.static_size) if info.static_size else None,
            "max_images_per_request": info.max_images_per_request,
            "max_edit_images": api.MAX_EDIT_IMAGES,
            "max_partial_images": api.MAX_PARTIAL_IMAGES,
            "max_prompt_bytes": MAX_PROMPT_BYTES,
            "output_formats": list(api.OUTPUT_FORMATS),
            "schedulers": list(DECODER_SCHEDULERS),
            "defaults": defaults,
        },
    }


async def list_models(request: Request) -> Response:
    model: KandinskyModel = request.app.state.model
    info = await model.info()
    entry = model_object(info, model.served_models, request.app.state.created)
    return JSON({"object": "list", "data": [entry]})


async def get_model(request: Request) -> Response:
    name = request.path_params["model"]
    if name != api.MODEL_ID:
        raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    model: KandinskyModel = request.app.state.model
    info = await model.info()
    return JSON(model_object(info, model.served_models, request.app.state.created))


async def live(request: Request) -> Response:
    return JSON({"live": True})


async def ready(request: Request) -> Response:
    """Ready when the `kandinsky` model is ready and its limits are read (kandinsky-serve's deep check)."""
    model: KandinskyModel = request.app.state.model
    try:
        if not await model.ready():
            raise ConnectionError(f"the 'kandinsky' model at '{model.url}' is not ready")
        await model.info()
    except Exception as error:  # noqa: BLE001 - not ready, for whatever reason: say which
        return JSON({"ready": False, "reason": str(error)}, status_code=503)
    return JSON({"ready": True})


async def page(request: Request) -> Response:
    return FileResponse(PLAYGROUND / "index.html")


# -- errors ------------------------------------------------------------------------------------------


async def _on_api_error(request: Request, error: Exception) -> Response:
    failure = from_server_error(error)
    if failure.status >= 500:
        logger.warning("%s %s: %s", request.method, request.url.path, failure.message)
    return _error_response(failure)


async def _on_http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    status, where = error.status_code, f"{request.method} {request.url.path}"
    if status == 404:
        failure = APIError(404, f"no route {where}", code="not_found")
    elif status == 405:
        failure = APIError(
            405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"
        )
    else:  # the multipart parser's refusals (malformed, too many files or fields, a field too large)
        code = "invalid_multipart" if status == 400 else None
        failure = APIError(status, f"{where}: {error.detail}", code=code)
    return _error_response(failure)


async def _on_too_large(request: Request, error: Exception) -> Response:
    return _error_response(_too_large(int(error.args[0])))


async def _on_client_gone(request: Request, error: Exception) -> Response:
    logger.info("%s: the client went away; its generation was cancelled", request.url.path)
    return Response(status_code=499)


async def _on_unexpected(request: Request, error: Exception) -> Response:
    # (Starlette re-raises it after this answer, so the server's log gets the traceback.)
    logger.error("%s %s failed: %r", request.method, request.url.path, error)
    return _error_response(from_server_error(error))


def create_app(
    triton_grpc: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    model: KandinskyModel | None = None,
) -> ASGIApp:
    """The ASGI app. `triton_grpc`: host:port of Triton's gRPC endpoint (or a gateway's); `token`: the
    bearer token /v1 requires (None: none); `headers`: metadata of every Triton call (the admin key)."""
    backend = model or KandinskyModel(triton_grpc, headers)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.model = backend
        app.state.created = int(time.time())
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    routes = [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/images/variations", variations, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground"),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        APIError: _on_api_error,
        KandinskyClientError: _on_api_error,
        HTTPException: _on_http_error,
        _BodyTooLarge: _on_too_large,
        ClientGone: _on_client_gone,
        ClientDisconnect: _on_client_gone,
        Exception: _on_unexpected,
    }
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    return Guard(app, token)
