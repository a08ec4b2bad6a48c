"""OpenAI's error object for every failure, and the HTTP status each of the server's errors gets.

OpenAI clients read `{"error": {"message", "type", "param", "code"}}` and the status: 400 bad request,
401 missing or wrong key, 404 unknown model or route, 413 body too large, 429 busy (the SDKs retry it),
503 the model server is not there or not ready (retried too), 504 the generation ran out of time. The
messages are the server's own (`kandinsky_core.validation`, the `kandinsky` model's): a bad field gets the
same words here as over Triton's protocols; only the names OpenAI spells differently are renamed
(`num_images_per_prompt` is `n`, `mask_image` is `mask`, `height`/`width` are `size`).
"""

from __future__ import annotations

from typing import Any

from kandinsky_core.errors import (
    Cancelled,
    InvalidRequest,
    KandinskyClientError,
    ModelNotReady,
    RequestTimeout,
    ServerBusy,
    ServerUnavailable,
)
from kandinsky_core.server_info import IncompatibleServer

# Request fields whose OpenAI name differs (the message then says which side of `size` was wrong).
OPENAI_NAMES = {"num_images_per_prompt": "n", "mask_image": "mask", "height": "size", "width": "size"}


class APIError(Exception):
    """An answer in OpenAI's error format: `status`, and the error object's four members."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The HTTP client disconnected before its answer: the generation was cancelled, nobody is answered."""


def invalid(field: str, detail: str, code: str = "invalid_value") -> APIError:
    """400 for `field` (already in OpenAI's spelling), its message starting with the field's name."""
    return APIError(400, f"{field}: {detail}", param=field, code=code)


def from_invalid_request(error: InvalidRequest) -> APIError:
    """400 with the validation's message, the field in OpenAI's spelling where it has one of its own."""
    field = error.field
    detail = str(error)[len(field) + 2 :] if str(error).startswith(f"{field}: ") else str(error)
    param = OPENAI_NAMES.get(field, field)
    if field in ("height", "width"):
        # "size: height is 2000; valid values are [64, 1024]"
        detail = f"{field} {detail}".replace(f"pass {field} explicitly", "pass size as WIDTHxHEIGHT")
    return invalid(param, detail)


def from_server_error(error: Exception) -> APIError:
    """The status and error object of one of the server's errors (checks, Triton, the `kandinsky` model)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidRequest):
        return from_invalid_request(error)
    message = str(error)
    if isinstance(error, ServerBusy):
        return APIError(429, message, type="rate_limit_error", code="server_busy")
    if isinstance(error, ServerUnavailable | ModelNotReady | IncompatibleServer):
        return APIError(503, message, type="server_error", code="service_unavailable")
    if isinstance(error, RequestTimeout):
        return APIError(504, message, type="server_error", code="timeout")
    if isinstance(error, Cancelled):
        return APIError(499, message, type="server_error", code="cancelled")
    if isinstance(error, KandinskyClientError):
        return APIError(500, message, type="server_error", code="generation_failed")
    return APIError(500, "internal error (see the server's log)", type="server_error", code="internal_error")
