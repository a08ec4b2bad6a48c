"""One connection to a Triton server over gRPC or HTTP, speaking in numpy arrays named by the registry.

Request tensors are cast and shaped from the component registry, so the client cannot send a tensor the
served model does not declare. Every call, readiness checks included, is bounded by `timeout_s`; the
same limit goes to the server as the request's queue timeout, so a request the client gave up on is
dropped from the server's queue rather than run (and gRPC cancels the call when its deadline passes).
Transport errors become `ServerUnavailable`, `RequestTimeout`, `ModelNotReady`, `ServerBusy`,
`InvalidRequest` or `InferenceFailed` with the server's message.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
from kandinsky_core.components import ModelSpec, model_inputs
from kandinsky_core.errors import (
    InvalidRequest,
    KandinskyClientError,
    ModelNotReady,
    RequestTimeout,
    ServerBusy,
    ServerUnavailable,
    error_from_message,
)
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .retry import RetryPolicy, with_retries

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_TIMEOUT_S = 600.0

T = TypeVar("T")


def check_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise InvalidRequest("timeout_s", f"is {value!r}; it must be a number of seconds > 0")
    return float(value)


def _is_timeout(error: BaseException) -> bool:
    """gevent/socket timeouts (HTTP) and DEADLINE_EXCEEDED (gRPC) all mean the time limit passed."""
    if isinstance(error, InferenceServerException):
        return "DEADLINE_EXCEEDED" in str(error.status()) or "Deadline Exceeded" in (error.message() or "")
    return isinstance(error, TimeoutError) or type(error).__name__ == "Timeout"


def _is_connection_error(error: InferenceServerException) -> bool:
    """Nothing answered, the gateway says the server behind it is restarting (HTTP 502-504), or a proxy
    reset the call's HTTP/2 stream because the replica serving it went away (gRPC RST_STREAM)."""
    status = str(error.status() or "")
    message = (error.message() or "").lower()
    return (
        any(s in status for s in ("UNAVAILABLE", "502", "503", "504"))
        or "failed to connect" in message
        or "rst_stream" in message
        or "stream removed" in message
    )


def _is_rate_limited(error: InferenceServerException) -> bool:
    """The gateway's per-client rate limit (HTTP 429, gRPC RESOURCE_EXHAUSTED naming the rate)."""
    status = str(error.status() or "")
    return "429" in status or ("RESOURCE_EXHAUSTED" in status and "rate" in (error.message() or "").lower())


class TritonTransport:
    """`infer(spec, inputs)` and the few metadata calls the client needs, over gRPC or HTTP.

    `headers` go with every call (e.g. {"Authorization": "Bearer <token>"} for a gateway that asks).
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        headers: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise InvalidRequest("protocol", f"'{protocol}' is not one of {PROTOCOLS}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = check_timeout(timeout_s)
        self.headers = dict(headers or {})
        self.retry = retry or RetryPolicy()
        self._confirmed_ready: set[str] = set()
        if protocol == "grpc":
            import tritonclient.grpc as triton
        else:
            import tritonclient.http as triton
        self._triton = triton
        # tritonclient's HTTP client runs on gevent, whose connections belong to the thread that opened
        # them: used from a second thread it fails ("Cannot switch to a different thread"). Each thread
        # gets its own HTTP client; the gRPC client is thread-safe and shared.
        self._local = threading.local()
        self._clients: list[Any] = []  # every client opened, closed by close()
        self._clients_lock = threading.Lock()
        _ = self._client  # a bad address fails here, not at the first call

    @property
    def _client(self) -> Any:
        """The tritonclient for this call: one per thread over HTTP, one shared over gRPC."""
        if self.protocol == "grpc" and self._clients:
            return self._clients[0]
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client()
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _new_client(self) -> Any:
        try:
            if self.protocol == "grpc":
                return self._triton.InferenceServerClient(self.url)
            return self._triton.InferenceServerClient(
                self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
        except Exception as error:  # noqa: BLE001 - bad address formats surface here
            raise ServerUnavailable(
                f"cannot connect to a Triton server at '{self.url}' ({self.protocol}): {error}"
            ) from error

    def _call(self, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call` with this transport's headers and time limit; transport failures become client errors."""
        if self.protocol == "grpc":
            kwargs.setdefault("client_timeout", self.timeout_s)
        try:
            return call(*args, headers=self.headers or None, **kwargs)
        except KandinskyClientError:
            raise
        except InferenceServerException as error:
            if _is_timeout(error):
                raise RequestTimeout(
                    f"{what}: no answer from '{self.url}' within {self.timeout_s:g} s"
                ) from error
            if _is_rate_limited(error):
                raise ServerBusy(f"{what}: rate limited by '{self.url}': {error.message()}") from error
            if _is_connection_error(error):
                raise ServerUnavailable(
                    f"{what}: no Triton server answers at '{self.url}': {error.message()}"
                ) from error
            raise
        except Exception as error:  # noqa: BLE001 - refused, reset, DNS: the server is not there
            if _is_timeout(error):
                raise RequestTimeout(
                    f"{what}: no answer from '{self.url}' within {self.timeout_s:g} s"
                ) from error
            raise ServerUnavailable(
                f"{what}: lost the Triton server at '{self.url}' ({self.protocol}): {error!r}"
            ) from error

    def check_live(self) -> None:
        try:
            live = self._call("is_server_live", self._client.is_server_live)
        except InferenceServerException as error:
            raise ServerUnavailable(f"no Triton server answers at '{self.url}': {error.message()}") from error
        except ServerUnavailable as error:
            raise ServerUnavailable(
                f"no Triton server answers at '{self.url}' over {self.protocol}: {error}"
            ) from error
        if not live:
            raise ServerUnavailable(f"the Triton server at '{self.url}' is not live")

    def require_ready(self, models: list[str] | tuple[str, ...]) -> None:
        """Raise ModelNotReady naming every missing model and listing the ready ones.

        A model found ready once is not asked again: every generation calls this, and a model that goes
        away later still fails its inference with Triton's own message.
        """
        unconfirmed = [m for m in models if m not in self._confirmed_ready]
        if not unconfirmed:
            return
        self.check_live()
        missing = [m for m in unconfirmed if not self._safe_ready(m)]
        self._confirmed_ready.update(m for m in unconfirmed if m not in missing)
        if missing:
            raise ModelNotReady(
                f"model(s) {missing} not ready on '{self.url}'; ready models: {self._ready_models()}. "
                "Was the repository generated from a checkpoint that has them?"
            )

    def _safe_ready(self, model: str) -> bool:
        try:
            return bool(self._call("is_model_ready", self._client.is_model_ready, model))
        except InferenceServerException:
            return False

    def _ready_models(self) -> list[str] | str:
        try:
            index = self._call("repository index", self._client.get_model_repository_index)
        except (InferenceServerException, KandinskyClientError):
            return "(the repository index is not available)"
        models = list(index.models) if hasattr(index, "models") else list(index)
        return sorted(
            m["name"] if isinstance(m, dict) else m.name
            for m in models
            if (m.get("state") if isinstance(m, dict) else m.state) == "READY"
        )

    def model_parameters(self, model: str) -> dict[str, Any]:
        """The `parameters` of a model's config, JSON-decoded where they hold JSON."""
        try:
            if self.protocol == "grpc":
                config = self._call("model config", self._client.get_model_config, model, as_json=True)[
                    "config"
                ]
            else:
                config = self._call("model config", self._client.get_model_config, model)
        except InferenceServerException as error:
            raise ModelNotReady(f"cannot read the config of model '{model}': {error.message()}") from error
        parameters = {}
        for key, value in config.get("parameters", {}).items():
            text = value.get("string_value", value.get("stringValue", ""))
            try:
                parameters[key] = json.loads(text)
            except json.JSONDecodeError:
                parameters[key] = text
        return parameters

    def inference_statistics(self, model: str = "") -> dict[str, Any]:
        """Triton's cumulative per-model statistics (all models when `model` is ""), as JSON.

        Both protocols return the same layout: {"model_stats": [{"name", "inference_stats": {"queue":
        {"count", "ns"}, "compute_infer": ...}, "batch_stats": [...]}, ...]}; gRPC's 64-bit counters come
        back as strings. Benchmarks take deltas of these around a measured window.
        """
        try:
            if self.protocol == "grpc":
                return self._call("statistics", self._client.get_inference_statistics, model, as_json=True)
            return self._call("statistics", self._client.get_inference_statistics, model)
        except InferenceServerException as error:
            raise ModelNotReady(
                f"cannot read the statistics of '{model or 'all models'}': {error.message()}"
            ) from error

    def infer(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `spec.name` on `inputs` (keyed by the spec's input names); return every declared output.

        A retryable failure (see retry.py) is tried again: the request is idempotent.
        """
        return with_retries(self.retry, f"'{spec.name}'", lambda: self._infer_once(spec, inputs))

    def _infer_once(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        requests = []
        for name, value in model_inputs(spec, inputs).items():
            request = self._triton.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            request.set_data_from_numpy(value)
            requests.append(request)
        outputs = [self._triton.InferRequestedOutput(t.name) for t in spec.outputs]
        # The server drops the request from its queue when this passes (the client has given up by then).
        queue_timeout_us = int(self.timeout_s * 1e6)
        try:
            result = self._call(
                f"'{spec.name}'",
                self._client.infer,
                spec.name,
                requests,
                outputs=outputs,
                timeout=queue_timeout_us,
            )
        except InferenceServerException as error:
            raise error_from_message(spec.name, error.message() or str(error)) from error
        return {t.name: result.as_numpy(t.name) for t in spec.outputs}

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
