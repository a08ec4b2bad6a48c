"""One connection to a Triton server over gRPC or HTTP, speaking in numpy arrays named by the registry.

Request tensors are cast and shaped from the component registry, so the client cannot send a tensor the
served model does not declare. Transport errors become `ServerUnavailable`, `ModelNotReady` or
`InferenceFailed` with the server's message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .components import BATCH, ModelSpec
from .errors import InferenceFailed, InvalidRequest, ModelNotReady, ServerUnavailable

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


def _numpy_dtype(dtype: str) -> Any:
    return np.object_ if dtype == "bytes" else np.dtype(dtype)


class TritonTransport:
    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout_s: float = 600.0) -> None:
        if protocol not in PROTOCOLS:
            raise InvalidRequest("protocol", f"'{protocol}' is not one of {PROTOCOLS}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self._confirmed_ready: set[str] = set()
        if protocol == "grpc":
            import tritonclient.grpc as triton
        else:
            import tritonclient.http as triton
        self._triton = triton
        try:
            if protocol == "grpc":
                self._client = triton.InferenceServerClient(self.url)
            else:
                self._client = triton.InferenceServerClient(
                    self.url, connection_timeout=timeout_s, network_timeout=timeout_s
                )
        except Exception as error:  # noqa: BLE001 - bad address formats surface here
            raise ServerUnavailable(
                f"cannot connect to a Triton server at '{self.url}' ({protocol}): {error}"
            ) from error

    def check_live(self) -> None:
        try:
            live = self._client.is_server_live()
        except Exception as error:  # noqa: BLE001 - refused, DNS, timeouts: all mean "not there"
            raise ServerUnavailable(
                f"no Triton server answers at '{self.url}' over {self.protocol}: {error}"
            ) from error
        if not live:
            raise ServerUnavailable(f"the Triton server at '{self.url}' is not live")

    def require_ready(self, models: list[str]) -> None:
        """Raise ModelNotReady naming every missing model and listing the ready ones.

        A model found ready once is not asked again: every request calls this, and a model that goes
        away later still fails its inference with Triton's own message.
        """
        unconfirmed = [m for m in models if m not in self._confirmed_ready]
        if not unconfirmed:
            return
        self.check_live()
        missing = [m for m in unconfirmed if not self._safe_ready(m)]
        self._confirmed_ready.update(m for m in unconfirmed if m not in missing)
        if missing:
            ready = sorted(
                m["name"] if isinstance(m, dict) else m.name
                for m in self._repository_index()
                if (m.get("state") if isinstance(m, dict) else m.state) == "READY"
            )
            raise ModelNotReady(
                f"model(s) {missing} not ready on '{self.url}'; ready models: {ready}. "
                "Was the repository generated from a checkpoint that has them?"
            )

    def _safe_ready(self, model: str) -> bool:
        try:
            return bool(self._client.is_model_ready(model))
        except InferenceServerException:
            return False

    def _repository_index(self) -> list[Any]:
        index = self._client.get_model_repository_index()
        return list(index.models) if hasattr(index, "models") else list(index)

    def model_parameters(self, model: str) -> dict[str, Any]:
        """The `parameters` of a model's config, JSON-decoded where they hold JSON."""
        try:
            if self.protocol == "grpc":
                config = self._client.get_model_config(model, as_json=True)["config"]
            else:
                config = self._client.get_model_config(model)
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
                return self._client.get_inference_statistics(model, as_json=True)
            return self._client.get_inference_statistics(model)
        except InferenceServerException as error:
            raise ModelNotReady(
                f"cannot read the statistics of '{model or 'all models'}': {error.message()}"
            ) from error

    def infer(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `spec.name` on `inputs` (keyed by the spec's input names); return every declared output."""
        requests = []
        for tensor in spec.inputs:
            value = np.asarray(inputs[tensor.name], dtype=_numpy_dtype(tensor.dtype))
            if tensor.shape == (BATCH,):
                value = value.reshape(-1, 1)  # served as dims [1] reshaped to a per-item scalar
            request = self._triton.InferInput(tensor.name, list(value.shape), np_to_triton_dtype(value.dtype))
            request.set_data_from_numpy(np.ascontiguousarray(value))
            requests.append(request)
        outputs = [self._triton.InferRequestedOutput(t.name) for t in spec.outputs]
        try:
            if self.protocol == "grpc":
                result = self._client.infer(
                    spec.name, requests, outputs=outputs, client_timeout=self.timeout_s
                )
            else:
                result = self._client.infer(spec.name, requests, outputs=outputs)
        except InferenceServerException as error:
            raise InferenceFailed(spec.name, error.message() or str(error)) from error
        except Exception as error:  # noqa: BLE001 - connection lost mid-request
            raise ServerUnavailable(
                f"lost the Triton server at '{self.url}' during '{spec.name}': {error}"
            ) from error
        return {t.name: result.as_numpy(t.name) for t in spec.outputs}

    def close(self) -> None:
        self._client.close()
