"""The glue every python-backend model shares: config parsing, batching, and error responses.

A request that fails validation gets an error response naming the input and its valid range; the
other requests of the batch still run, and the model keeps serving.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("kandinsky_repository")


class InvalidInput(ValueError):
    """A request's input is outside what the model accepts; the message names the input."""


class BatchingModel:
    """Base TritonPythonModel: gathers inputs, merges compatible requests into one batch, splits results.

    Subclasses implement `setup(parameters)` and `compute(inputs) -> outputs` on numpy arrays whose first
    axis is the batch, and may override `validate(inputs)`.
    """

    merge_requests = True

    def initialize(self, args: dict[str, Any]) -> None:
        self.model_config = json.loads(args["model_config"])
        self.name = self.model_config["name"]
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = [t["name"] for t in self.model_config["input"]]
        self.output_dtypes = {
            t["name"]: _TRITON_TO_NUMPY[t["data_type"]] for t in self.model_config["output"]
        }
        parameters = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        self.setup(parameters)

    def setup(self, parameters: Mapping[str, str]) -> None:  # pragma: no cover - overridden
        pass

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        pass

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses: list[Any] = [None] * len(requests)
        ready: list[tuple[int, dict[str, np.ndarray]]] = []
        for index, request in enumerate(requests):
            try:
                inputs = {}
                for name in self.input_names:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise InvalidInput(f"input '{name}' is missing")
                    inputs[name] = tensor.as_numpy()
                self.validate(inputs)
                ready.append((index, inputs))
            except InvalidInput as error:
                responses[index] = _error_response(pb_utils, f"{self.name}: {error}")

        for group in self._groups(ready):
            try:
                merged = {n: np.concatenate([inp[n] for _, inp in group]) for n in self.input_names}
                outputs = self.compute(merged)
                start = 0
                for index, inputs in group:
                    size = len(inputs[self.input_names[0]])
                    tensors = [
                        pb_utils.Tensor(
                            name,
                            np.ascontiguousarray(value[start : start + size]).astype(
                                self.output_dtypes[name], copy=False
                            ),
                        )
                        for name, value in outputs.items()
                    ]
                    responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                    start += size
            except InvalidInput as error:
                for index, _ in group:
                    responses[index] = _error_response(pb_utils, f"{self.name}: {error}")
            except Exception as error:  # noqa: BLE001 - one failed batch must not take the model down
                logger.exception("%s failed", self.name)
                for index, _ in group:
                    responses[index] = _error_response(pb_utils, f"{self.name}: internal error: {error}")
        return responses

    def _groups(self, ready: list[tuple[int, dict[str, np.ndarray]]]) -> list[list]:
        """Requests whose inputs agree on every non-batch dimension can run as one batch."""
        if not self.merge_requests:
            return [[item] for item in ready]
        groups: dict[tuple, list] = {}
        for item in ready:
            key = tuple(item[1][n].shape[1:] for n in self.input_names)
            groups.setdefault(key, []).append(item)
        return list(groups.values())

    def finalize(self) -> None:
        pass


def _error_response(pb_utils: Any, message: str) -> Any:
    logger.warning("rejected request: %s", message)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


_TRITON_TO_NUMPY = {
    "TYPE_FP32": np.float32,
    "TYPE_FP16": np.float16,
    "TYPE_INT64": np.int64,
    "TYPE_INT32": np.int32,
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_STRING": np.object_,
}


def require_finite(name: str, value: np.ndarray) -> None:
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise InvalidInput(f"input '{name}' contains NaN or Inf")


def require_range(name: str, value: np.ndarray, low: int, high: int) -> None:
    """Integers in [low, high]."""
    if value.size and (value.min() < low or value.max() > high):
        raise InvalidInput(
            f"input '{name}' has values in [{value.min()}, {value.max()}]; valid range is [{low}, {high}]"
        )
