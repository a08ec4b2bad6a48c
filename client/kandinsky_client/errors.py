"""Errors the client raises. Each message names what was wrong and what would have been valid."""

from __future__ import annotations


class KandinskyClientError(Exception):
    """Base class of every error this client raises on purpose."""


class InvalidRequest(KandinskyClientError, ValueError):
    """A request argument is outside its valid values; `field` names the argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ServerUnavailable(KandinskyClientError, ConnectionError):
    """No Triton server answers at the given address."""


class ModelNotReady(KandinskyClientError):
    """The server answers but a model this request needs is not loaded and ready."""


class InferenceFailed(KandinskyClientError):
    """The server refused or failed one inference request; the message is the server's."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"model '{model}': {message}")
        self.model = model
