"""One connection to a Triton server over gRPC or HTTP, speaking in numpy arrays named by the registry.

Request tensors are cast and shaped from the component registry, so the client cannot send a tensor the
served model does not declare. Every call, readiness checks included, is bounded by `timeout_s`; the
same limit goes to the server as the request's queue timeout, so a request the client gave up on is
dropped from the server's queue rather than run (and gRPC cancels the call when its deadline passes).
Every failure is classified by `kandinsky_core.errors.classify_exception` (`ServerUnavailable`,
`RequestTimeout`, `ModelNotReady`, `ServerBusy`, `InvalidRequest`, `InferenceFailed` with the server's
message) and retried as the transport's `RetryPolicy` says; readiness checks and metadata calls too.

One exception to retrying: while nothing has ever answered at the address, a refused connection is
raised at once (a wrong address fails fast); once a server has answered, a refusal means it is
restarting, and is retried like any other transient failure.
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
    ServerBusy,
    ServerUnavailable,
    classify_exception,
    classify_http,
)
from tritonclient.utils import np_to_triton_dtype

from .retry import RetryPolicy, with_retries

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_TIMEOUT_S = 600.0

T = TypeVar("T")


def check_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise InvalidRequest("timeout_s", f"is {value!r}; it must be a number of seconds > 0")
    return float(value)


def grpc_channel_args() -> list[tuple[str, Any]]:
    """tritonclient's default gRPC channel options, plus a reconnect back-off as short as the retry
    policy's: grpc's own grows to 120 s between connection attempts, so after a restart a client could
    sit out several seconds of a server that is back (measured: up to 4 s)."""
    import tritonclient.grpc as grpcclient

    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", int(RetryPolicy.backoff_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(RetryPolicy.max_backoff_s * 1000)),
    ]


def _transient(error: KandinskyClientError) -> bool:
    """A failure of the way to the server (busy, unavailable, reset), not an answer about the request."""
    return isinstance(error, ServerBusy | ServerUnavailable)


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
        self._answered = False  # whether anything has answered at this address yet (see the module doc)
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
                return self._triton.InferenceServerClient(self.url, channel_args=grpc_channel_args())
            return self._triton.InferenceServerClient(
                self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
        except Exception as error:  # noqa: BLE001 - bad address formats surface here
            raise ServerUnavailable(
                f"cannot connect to a Triton server at '{self.url}' ({self.protocol}): {error}", refused=True
            ) from error

    def _retry_if(self, error: KandinskyClientError) -> bool:
        """Retryable, except a refusal while nothing has ever answered here (a wrong address)."""
        return error.retryable and (self._answered or not getattr(error, "refused", False))

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """`call()` under this transport's retry policy."""
        return with_retries(self.retry, what, call, retry_if=self._retry_if)

    def _call(self, model: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One `call` with this transport's headers and time limit; failures become client errors.

        `model`: the model the call is about ("" for server-level calls), named in the messages.
        """
        if self.protocol == "grpc":
            kwargs.setdefault("client_timeout", self.timeout_s)
        try:
            result = call(*args, headers=self.headers or None, **kwargs)
        except Exception as error:  # noqa: BLE001 - classified; anything else propagates unchanged
            classified = classify_exception(error, model=model, url=self.url, timeout_s=self.timeout_s)
            if classified is None:
                raise
            self._answered = self._answered or not getattr(classified, "refused", False)
            if classified is not error:
                raise classified from error
            raise
        self._answered = True
        return result

    def _http_get(self, model: str, path: str) -> KandinskyClientError | None:
        """GET `path` on the HTTP API: None on 200, else the answer classified. (tritonclient's
        `is_server_live`/`is_model_ready` return False for any other answer, a gateway's 429 or 503
        included, so the status is read here, through its client's GET.)"""

        def get(headers: Mapping[str, str] | None) -> Any:
            return self._client._get(request_uri=path, headers=headers, query_params=None)

        response = self._call(model, get)
        if response.status_code == 200:
            return None
        return classify_http(
            response.status_code,
            response.read(),
            model=model,
            url=self.url,
            retry_after_header=response.get("retry-after"),
        )

    def check_live(self) -> None:
        """Raise ServerUnavailable unless a server answers live (transient failures retried)."""
        self._retrying("live check", self._check_live_once)

    def _check_live_once(self) -> None:
        if self.protocol == "http":
            error = self._http_get("", "v2/health/live")
            if error is not None:
                raise error
            return
        if not self._call("", self._client.is_server_live):
            raise ServerUnavailable(f"the Triton server at '{self.url}' is not live")

    def require_ready(self, models: list[str] | tuple[str, ...]) -> None:
        """Raise ModelNotReady naming every missing model and listing the ready ones.

        A model found ready once is not asked again: every generation calls this, and a model that goes
        away later still fails its inference with Triton's own message. A server that answers "not
        ready" is not asked again (a missing model is not coming); a busy or restarting one is.
        """
        unconfirmed = [m for m in models if m not in self._confirmed_ready]
        if not unconfirmed:
            return
        self.check_live()
        missing = [m for m in unconfirmed if not self._retrying(f"'{m}' ready", lambda m=m: self._ready(m))]
        self._confirmed_ready.update(m for m in unconfirmed if m not in missing)
        if missing:
            raise ModelNotReady(
                f"model(s) {missing} not ready on '{self.url}'; ready models: {self._ready_models()}. "
                "Was the repository generated from a checkpoint that has them?"
            )

    def _ready(self, model: str) -> bool:
        """Whether `model` is ready; transient failures raise (to be retried), other answers say no."""
        try:
            if self.protocol == "http":
                error = self._http_get(model, f"v2/models/{model}/ready")
                if error is not None:
                    raise error
                return True
            return bool(self._call(model, self._client.is_model_ready, model))
        except KandinskyClientError as error:
            if _transient(error):
                raise
            return False

    def _ready_models(self) -> list[str] | str:
        try:
            index = self._retrying(
                "repository index",
                lambda: self._call("", self._client.get_model_repository_index),
            )
        except KandinskyClientError:
            return "(the repository index is not available)"
        models = list(index.models) if hasattr(index, "models") else list(index)
        return sorted(
            m["name"] if isinstance(m, dict) else m.name
            for m in models
            if (m.get("state") if isinstance(m, dict) else m.state) == "READY"
        )

    def _metadata(self, what: str, model: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A metadata call: transient failures retried, any other answer raised as ModelNotReady at once
        (an absent optional model is an answer, not a failure to wait out)."""

        def once() -> T:
            return self._call(model, call, *args, **kwargs)

        try:
            return with_retries(
                self.retry, what, once, retry_if=lambda e: _transient(e) and self._retry_if(e)
            )
        except KandinskyClientError as error:
            if _transient(error) or isinstance(error, ModelNotReady):
                raise
            raise ModelNotReady(f"cannot read the {what} of '{model or 'all models'}': {error}") from error

    def model_parameters(self, model: str) -> dict[str, Any]:
        """The `parameters` of a model's config, JSON-decoded where they hold JSON."""
        if self.protocol == "grpc":
            config = self._metadata("config", model, self._client.get_model_config, model, as_json=True)[
                "config"
            ]
        else:
            config = self._metadata("config", model, self._client.get_model_config, model)
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
        call = self._client.get_inference_statistics
        if self.protocol == "grpc":
            return self._metadata("statistics", model, call, model, as_json=True)
        return self._metadata("statistics", model, call, model)

    def infer(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `spec.name` on `inputs` (keyed by the spec's input names); return every declared output.

        A retryable failure (see retry.py) is tried again: the request is idempotent.
        """
        return self._retrying(f"'{spec.name}'", lambda: self._infer_once(spec, inputs))

    def _infer_once(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        requests = []
        for name, value in model_inputs(spec, inputs).items():
            request = self._triton.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            request.set_data_from_numpy(value)
            requests.append(request)
        outputs = [self._triton.InferRequestedOutput(t.name) for t in spec.outputs]
        # The server drops the request from its queue when this passes (the client has given up by then).
        queue_timeout_us = int(self.timeout_s * 1e6)
        result = self._call(
            spec.name,
            self._client.infer,
            spec.name,
            requests,
            outputs=outputs,
            timeout=queue_timeout_us,
        )
        return {t.name: result.as_numpy(t.name) for t in spec.outputs}

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
