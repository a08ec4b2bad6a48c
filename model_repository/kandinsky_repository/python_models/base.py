"""The glue every python-backend model shares: config parsing, batching, and error responses.

A request that fails validation gets an error response naming the input and its valid range, with
Triton's INVALID_ARG code (HTTP 400, gRPC INVALID_ARGUMENT); the other requests of the batch still run,
and the model keeps serving. Failures of the model itself stay INTERNAL.

Order of the checks, cheapest first, so that a hostile request costs as little as possible:
1. `request.is_cancelled()`: a request the client abandoned (gRPC cancel, an expired queue timeout) is
   answered CANCELLED without any work; checked again before each merged batch runs;
2. `validate_shapes(shapes)`: the declared shapes only, before any tensor data is read or converted;
3. `validate(inputs)`: the values;
4. after `compute`: every floating-point output must be finite (NaN/Inf from extreme but finite
   inputs is refused, not returned as success).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from kandinsky_core.components import DTYPES

logger = logging.getLogger("kandinsky_repository")


class InvalidInput(ValueError):
    """A request's input is outside what the model accepts; the message names the input."""


class BatchingModel:
    """Base TritonPythonModel: gathers inputs, merges compatible requests into one batch, splits results.

    Subclasses implement `setup(parameters)` and `compute(inputs) -> outputs` on numpy arrays whose first
    axis is the batch, and may override `validate_shapes(shapes)` and `validate(inputs)`.
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

    def validate_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Check the declared shapes; runs before any input data is converted or read."""

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        pass

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses: list[Any] = [None] * len(requests)
        ready: list[tuple[int, dict[str, np.ndarray]]] = []
        for index, request in enumerate(requests):
            if request.is_cancelled():
                responses[index] = _cancelled_response(pb_utils, self.name)
                continue
            try:
                tensors = {}
                for name in self.input_names:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise InvalidInput(f"input '{name}' is missing")
                    tensors[name] = tensor
                self.validate_shapes({name: tuple(t.shape()) for name, t in tensors.items()})
                inputs = {name: t.as_numpy() for name, t in tensors.items()}
                self.validate(inputs)
                ready.append((index, inputs))
            except InvalidInput as error:
                responses[index] = _error_response(pb_utils, f"{self.name}: {error}")

        for group in self._groups(ready):
            live = []
            for index, inputs in group:  # cancelled while an earlier batch ran: skip it too
                if requests[index].is_cancelled():
                    responses[index] = _cancelled_response(pb_utils, self.name)
                else:
                    live.append((index, inputs))
            for part in self.split_group(live) if live else ():
                self._run_group(pb_utils, part, responses)
        return responses

    def _run_group(self, pb_utils: Any, group: list, responses: list[Any]) -> None:
        try:
            merged = {n: np.concatenate([inp[n] for _, inp in group]) for n in self.input_names}
            outputs = self.compute(merged)
        except InvalidInput as error:
            for index, _ in group:
                responses[index] = _error_response(pb_utils, f"{self.name}: {error}")
            return
        except Exception as error:  # noqa: BLE001 - one failed batch must not take the model down
            logger.exception("%s failed", self.name)
            for index, _ in group:
                responses[index] = _error_response(
                    pb_utils, f"{self.name}: internal error: {error}", invalid=False
                )
            return
        start = 0
        for index, inputs in group:
            size = len(inputs[self.input_names[0]])
            parts = {name: value[start : start + size] for name, value in outputs.items()}
            start += size
            try:
                for name, value in parts.items():
                    require_finite_output(name, value)
            except InvalidInput as error:
                responses[index] = _error_response(pb_utils, f"{self.name}: {error}")
                continue
            tensors = [
                pb_utils.Tensor(
                    name, np.ascontiguousarray(value).astype(self.output_dtypes[name], copy=False)
                )
                for name, value in parts.items()
            ]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)

    def split_group(self, group: list[tuple[int, dict[str, np.ndarray]]]) -> list[list]:
        """The parts of a merged group that run as one batch each (all of it unless a subclass bounds the
        batch, e.g. by memory: requests that each fit may not fit together)."""
        return [group]

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


def _error_response(pb_utils: Any, message: str, *, invalid: bool = True) -> Any:
    """An error response: INVALID_ARG (HTTP 400) for bad input, INTERNAL (HTTP 500) otherwise."""
    logger.warning("rejected request: %s", message)
    code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _cancelled_response(pb_utils: Any, model: str) -> Any:
    logger.info("%s: skipped a cancelled request", model)
    error = pb_utils.TritonError(f"{model}: request cancelled", pb_utils.TritonError.CANCELLED)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


# Triton's config dtypes as numpy's, from the registry's one dtype table.
_TRITON_TO_NUMPY = {d.triton: np.dtype(np.object_ if d.name == "bytes" else d.name) for d in DTYPES.values()}


def require_finite(name: str, value: np.ndarray) -> None:
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise InvalidInput(f"input '{name}' contains NaN or Inf")


def require_finite_output(name: str, value: np.ndarray) -> None:
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise InvalidInput(
            f"output '{name}' is not finite (NaN or Inf): the input values are outside what the model "
            "can compute with"
        )


def require_side(name: str, axis: str, size: int, largest: int, smallest: int = 1) -> None:
    """One image side within [smallest, largest], in the message format every limit uses."""
    if size > largest:
        raise InvalidInput(f"input '{name}' {axis} is {size}; at most {largest}")
    if size < smallest:
        raise InvalidInput(f"input '{name}' {axis} is {size}; at least {smallest}")


def require_range(name: str, value: np.ndarray, low: int, high: int) -> None:
    """Integers in [low, high]."""
    if value.size and (value.min() < low or value.max() > high):
        raise InvalidInput(
            f"input '{name}' has values in [{value.min()}, {value.max()}]; valid range is [{low}, {high}]"
        )
