"""Errors the client raises. Each message names what was wrong and what would have been valid.

The server-side generation model answers with the same messages, each starting with a fixed kind
(`error_message`), because a gRPC stream carries an error's text but not its status code; the client
turns such a message back into the same exception class (`error_from_message`).
"""

from __future__ import annotations

import re


class KandinskyClientError(Exception):
    """Base class of every error this client raises on purpose."""

    retryable = False  # whether the same request may succeed if sent again (after a pause)


class InvalidRequest(KandinskyClientError, ValueError):
    """A request argument is outside its valid values; `field` names the argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ServerUnavailable(KandinskyClientError, ConnectionError):
    """No Triton server answers at the given address (or the connection was lost)."""

    retryable = True


class ModelNotReady(KandinskyClientError):
    """The server answers but a model this request needs is not loaded and ready."""

    retryable = True


class InferenceFailed(KandinskyClientError):
    """The server refused or failed one inference request; the message is the server's."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"model '{model}': {message}")
        self.model = model


class ServerBusy(KandinskyClientError):
    """The server's queue for this model is full; nothing was started. Retry later."""

    retryable = True


class RequestTimeout(KandinskyClientError, TimeoutError):
    """The request did not finish within its time limit (client deadline or server time limit)."""


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


def error_message(error: KandinskyClientError) -> str:
    """The text the server sends for `error`: its kind, then the message (e.g. 'invalid argument: height: ...')."""
    kind = _KIND_OF.get(type(error))
    return f"{kind}: {error}" if kind else str(error)


def error_from_message(model: str, message: str) -> KandinskyClientError:
    """The exception a server-side error message stands for (InferenceFailed when it has no known kind)."""
    for kind, cls in _KINDS.items():
        prefix = f"{kind}: "
        if message.startswith(prefix):
            detail = message[len(prefix) :]
            if cls is InvalidRequest:
                field, _, rest = detail.partition(": ")
                return InvalidRequest(field, rest)
            return cls(detail)
    if re.search(r"exceeds maximum queue size", message, re.I):  # Triton's own queue policy
        return ServerBusy(f"model '{model}': {message}")
    error = InferenceFailed(model, message)
    # A dead python-backend stub or a model being reloaded: the supervisor recovers it (see the README).
    error.retryable = bool(re.search(r"not healthy|unavailable|is not ready|not found", message, re.I))
    return error
