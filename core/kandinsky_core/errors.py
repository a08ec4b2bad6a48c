"""Errors the client raises, and the one place that decides which error a failure is (`classify`).

Each message names what was wrong and what would have been valid. Each class says whether the same
request may succeed if sent again (`retryable`, used by the client's retry policy) and, when the server
said so, how long to wait first (`retry_after_s`, from a Retry-After header).

Classification goes by status code first (an HTTP status, a gRPC status name) and by the message only
where the status carries no kind: a gRPC stream carries an error's text but no status, and Triton answers
most model errors with a generic status. The server-side generation model therefore starts its messages
with a fixed kind (`error_message`: "server busy: ...", "invalid argument: height: ..."), which the client
turns back into the same class. The table, in the order it is applied:

  HTTP 429 / gRPC RESOURCE_EXHAUSTED   ServerBusy (rate limited; Retry-After honoured) - unless the message
                                       says the request is too large: InvalidRequest
  HTTP 413                             InvalidRequest (the request is larger than a limit)
  HTTP 408 / gRPC DEADLINE_EXCEEDED    RequestTimeout
  gRPC CANCELLED                       Cancelled
  HTTP 401, 403 / gRPC UNAUTHENTICATED, PERMISSION_DENIED   refused for good (not retried)
  "<kind>: <detail>" (our server)      that kind's class, whatever the status
  a broken HTTP/2 stream               ServerUnavailable (`is_stream_reset`: a proxy lost the server
                                       behind it mid-call, tritonclient's stream ended, grpc's "Internal
                                       error from Core")
  Triton's own texts                   "Exceeds maximum queue size": ServerBusy; a dead or unloaded model
                                       ("Stub process ... is not healthy", "... is not ready", "unknown
                                       model"): ModelNotReady; "Server is stopping": ServerUnavailable
  HTTP 502, 503, 504 / gRPC UNAVAILABLE   ServerUnavailable (`refused` when nothing accepted the connection)
  anything else                        InferenceFailed with the server's message (not retried)

`classify_exception` does the same for an exception: tritonclient's or grpc's (status and message), or a
socket error raised on the way (refused, reset, timed out). Both client loops (transport.py: unary gRPC and
HTTP; remote.py: the gRPC stream and HTTP generate_stream) and the server-side generation model (its BLS
responses, through `error_from_message`) use these, and nothing else.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from typing import Any


class KandinskyClientError(Exception):
    """Base class of every error this client raises on purpose."""

    retryable = False  # whether the same request may succeed if sent again (after a pause)
    retry_after_s: float | None = None  # the pause the server asked for (Retry-After), when it said


class InvalidRequest(KandinskyClientError, ValueError):
    """A request argument is outside its valid values; `field` names the argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ServerUnavailable(KandinskyClientError, ConnectionError):
    """No Triton server answers at the given address, the connection was lost, or the server (or the
    gateway in front of it) says it is restarting. `refused`: nothing accepted the connection at all."""

    retryable = True

    def __init__(self, message: str, *, refused: bool = False, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.refused = refused
        self.retry_after_s = retry_after_s


class ModelNotReady(KandinskyClientError):
    """The server answers but a model this request needs is not loaded and ready (or its python stub
    died and kandinsky-serve's supervisor is bringing it back)."""

    retryable = True


class InferenceFailed(KandinskyClientError):
    """The server refused or failed one inference request; the message is the server's."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"model '{model}': {message}")
        self.model = model


class ServerBusy(KandinskyClientError):
    """The server (or the gateway's rate limit) refused the request for now; nothing was started."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(KandinskyClientError, TimeoutError):
    """The request did not finish within its time limit (client deadline or server time limit).

    Not retried: its work may still be running, and a second try would run into the same limit.
    """


class Cancelled(KandinskyClientError):
    """The generation was cancelled before it finished."""


# The kinds a server-side message starts with ("<kind>: <detail>"), and the classes they map back to.
_KINDS: dict[str, type[KandinskyClientError]] = {
    "invalid argument": InvalidRequest,
    "server busy": ServerBusy,
    "deadline exceeded": RequestTimeout,
    "cancelled": Cancelled,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}

# A call's HTTP/2 stream broken under it, its real status lost: reset by the peer (what a gRPC proxy sends
# when the server behind it goes away mid-call), tritonclient's word for a stream whose call has already
# failed, and grpc's asyncio client's status for a call its transport failed (the gateway's stream relay
# passes that on when the Triton behind it dies mid-generation).
_STREAM_RESET = re.compile(
    r"RST_STREAM|Stream removed|stream is no longer in valid state|Internal error from Core", re.I
)
# Triton's own messages, which come with a generic status (400, 500, INTERNAL, UNAVAILABLE, none).
_QUEUE_FULL = re.compile(r"exceeds maximum queue size", re.I)
_MODEL_NOT_READY = re.compile(r"not healthy|is not ready|unknown model", re.I)
_SERVER_STOPPING = re.compile(r"server is stopping", re.I)
# gRPC's UNAVAILABLE detail when no connection could be made (the status alone also covers "lost").
_REFUSED = re.compile(r"failed to connect|connection refused|name resolution|dns resolution", re.I)
_TOO_LARGE = re.compile(r"larger than", re.I)

_UNAVAILABLE_HTTP = (502, 503, 504)
_DENIED = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def error_message(error: KandinskyClientError) -> str:
    """The text the server sends for `error`: its kind, then the message ("invalid argument: height: ...")."""
    kind = _KIND_OF.get(type(error))
    return f"{kind}: {error}" if kind else str(error)


def is_stream_reset(message: str) -> bool:
    """Whether a message says the call's HTTP/2 stream was reset or is no longer usable (retry a new one)."""
    return bool(_STREAM_RESET.search(message))


def _normalise(status: int | str | None) -> int | str | None:
    """An HTTP status as int, a gRPC status as its name ("StatusCode.UNAVAILABLE" -> "UNAVAILABLE")."""
    if status is None or isinstance(status, int):
        return status
    text = str(status).strip()
    if text.isdigit():
        return int(text)
    return text.removeprefix("StatusCode.").upper() or None


def _from_kind(message: str) -> KandinskyClientError | None:
    for kind, cls in _KINDS.items():
        prefix = f"{kind}: "
        if message.startswith(prefix):
            detail = message[len(prefix) :]
            if cls is InvalidRequest:
                field, _, rest = detail.partition(": ")
                return InvalidRequest(field, rest)
            return cls(detail)
    return None


def classify(
    status: int | str | None,
    message: str,
    *,
    model: str = "",
    url: str = "",
    retry_after_s: float | None = None,
    timeout_s: float | None = None,
) -> KandinskyClientError:
    """The error a failed call stands for (see the table in the module docstring).

    `status`: the HTTP status (int or digits) or gRPC status name, None where the answer had none (a
    stream's error, a BLS response); `model`: the model called ("" for server-level calls such as the
    live check); `url`: the address, for the message; `retry_after_s`: the answer's Retry-After;
    `timeout_s`: the client's time limit, for the message of a timeout.
    """
    code = _normalise(status)
    message = message or ""
    about = f"model '{model}': " if model else ""
    at, from_ = (f" at '{url}'", f" from '{url}'") if url else ("", "")
    shown = f"HTTP {code}" if isinstance(code, int) else str(code)

    if code in (429, "RESOURCE_EXHAUSTED"):
        if _TOO_LARGE.search(message):
            return InvalidRequest("request", message)
        return ServerBusy(
            f"{about}server busy (rate limited{at}, {shown}): {message}", retry_after_s=retry_after_s
        )
    if code == 413:
        return InvalidRequest("request", message)
    if code in (408, "DEADLINE_EXCEEDED"):
        within = f" within {timeout_s:g} s" if timeout_s else " in time"
        return RequestTimeout(f"{about}no answer{from_}{within} ({message})")
    if code == "CANCELLED":
        return Cancelled(f"{about}{message}")
    if code in (401, 403, *_DENIED):
        return _failed(model, f"refused{at} ({shown}): {message}")

    kind = _from_kind(message)
    if kind is not None:
        return kind
    if is_stream_reset(message):
        return ServerUnavailable(f"{about}lost the server{at} during the call: {message}")
    if _QUEUE_FULL.search(message):
        return ServerBusy(f"{about}server busy (queue full{at}): {message}", retry_after_s=retry_after_s)
    if _MODEL_NOT_READY.search(message):
        return ModelNotReady(f"{about}{message}")
    if _SERVER_STOPPING.search(message):
        return ServerUnavailable(f"{about}the server{at} is stopping: {message}")
    if code in (*_UNAVAILABLE_HTTP, "UNAVAILABLE"):
        if _REFUSED.search(message):
            return ServerUnavailable(f"{about}no Triton server answers{at}: {message}", refused=True)
        return ServerUnavailable(
            f"{about}server unavailable{at} ({shown}): {message}", retry_after_s=retry_after_s
        )
    return _failed(model, message if model or not url else f"'{url}' answered: {message}")


def _failed(model: str, message: str) -> KandinskyClientError:
    """The server's answer about this request, not retried: InferenceFailed for a model's call."""
    return InferenceFailed(model, message) if model else KandinskyClientError(message)


def error_from_message(model: str, message: str) -> KandinskyClientError:
    """The exception a message without a status stands for (a gRPC stream's or a BLS response's error)."""
    return classify(None, message, model=model)


def classify_http(
    status: int,
    body: bytes,
    *,
    model: str = "",
    url: str = "",
    retry_after_header: str | None = None,
) -> KandinskyClientError:
    """`classify` for an HTTP answer: its status, the `error` of its JSON body (or the body's text) and
    its Retry-After header."""
    text = body.decode("utf-8", "replace")
    try:
        decoded = json.loads(text)
    except json.JSONDecodeError:
        decoded = None
    message = str(decoded["error"]) if isinstance(decoded, dict) and "error" in decoded else text.strip()
    return classify(status, message, model=model, url=url, retry_after_s=retry_after(retry_after_header))


def classify_exception(
    error: BaseException, *, model: str = "", url: str = "", timeout_s: float | None = None
) -> KandinskyClientError | None:
    """The error an exception raised by a call stands for; None when it is none of a call's failures
    (a bug: let it propagate as it is).

    tritonclient's `InferenceServerException` (`status()`, `message()`) and grpc's `RpcError` (`code()`,
    `details()`) are classified by their status and message; socket errors met on the way are timeouts
    (RequestTimeout), refusals and failed look-ups (ServerUnavailable, `refused`), or a lost connection
    (ServerUnavailable).
    """
    if isinstance(error, KandinskyClientError):
        return error
    status, message = getattr(error, "status", None), getattr(error, "message", None)
    if callable(status) and callable(message):  # tritonclient's InferenceServerException
        return classify(status(), message() or str(error), model=model, url=url, timeout_s=timeout_s)
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    if callable(code) and callable(details):  # grpc.RpcError / grpc.aio.AioRpcError
        return classify(str(code()), details() or str(error), model=model, url=url, timeout_s=timeout_s)
    about = f"model '{model}': " if model else ""
    at, from_ = (f" at '{url}'", f" from '{url}'") if url else ("", "")
    if isinstance(error, TimeoutError) or type(error).__name__ == "Timeout":  # socket / gevent timeouts
        within = f" within {timeout_s:g} s" if timeout_s else " in time"
        return RequestTimeout(f"{about}no answer{from_}{within}")
    if isinstance(error, ConnectionRefusedError | socket.gaierror):
        return ServerUnavailable(f"{about}no Triton server answers{at}: {error!r}", refused=True)
    if isinstance(error, OSError | http.client.HTTPException | EOFError):  # reset, closed, cut response
        return ServerUnavailable(f"{about}lost the server{at}: {error!r}")
    return None


def retry_after(value: Any) -> float | None:
    """Seconds from a Retry-After header value (delay-seconds form; an HTTP date or garbage: None)."""
    try:
        seconds = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return seconds if 0 <= seconds < float("inf") else None
