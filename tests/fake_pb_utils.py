"""A stand-in for `triton_python_backend_utils` whose BLS responses live in GPU memory, as on a GPU server.

Python models on this machine's Triton only ever see CPU tensors. On a GPU server a BLS request to a
TensorRT model, to an ONNX Runtime model on a GPU instance, or to an ensemble ending in one, answers in
GPU memory unless the request asks for CPU memory (`preferred_memory`; python_backend's
`ResponseAlloc`), and `Tensor.as_numpy()` on such a tensor raises. This fake reproduces that contract
and nothing else: `InferenceRequest.exec()` forwards the request to a real Triton server (gRPC), and
each output comes back as a GPU tensor unless CPU memory was preferred. The numbers are the real
server's, so a generation run through it can be compared with the client loop bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# python_backend's memory type constants (TRITONSERVER_MemoryType).
TRITONSERVER_MEMORY_CPU = 0
TRITONSERVER_MEMORY_CPU_PINNED = 1
TRITONSERVER_MEMORY_GPU = 2


class TritonModelException(Exception):
    """What python_backend raises from tensor methods (`pb_tensor.cc`)."""


@dataclass(frozen=True)
class PreferredMemory:
    preferred_memory_type: int
    preferred_device_id: int = 0


class Tensor:
    """A tensor in host memory (what python models build and what CPU-resident outputs are)."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name = name
        self._array = np.asarray(array)

    def name(self) -> str:
        return self._name

    def is_cpu(self) -> bool:
        return True

    def as_numpy(self) -> np.ndarray:
        return self._array


class GpuTensor(Tensor):
    """A tensor in GPU memory: readable only through DLPack, never as numpy."""

    def is_cpu(self) -> bool:
        return False

    def as_numpy(self) -> np.ndarray:
        raise TritonModelException("Tensor is stored in GPU and cannot be converted to NumPy.")


class TritonError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors: Sequence[Tensor] = (), error: TritonError | None = None) -> None:
        self._outputs = list(output_tensors)
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


class GpuServerBls:
    """The module-like object passed where the `kandinsky` model passes `triton_python_backend_utils`.

    `url` is a real Triton's gRPC endpoint; `requests` records every BLS request's preferred memory.
    """

    TRITONSERVER_MEMORY_CPU = TRITONSERVER_MEMORY_CPU
    TRITONSERVER_MEMORY_GPU = TRITONSERVER_MEMORY_GPU
    PreferredMemory = PreferredMemory
    Tensor = Tensor
    TritonError = TritonError
    InferenceResponse = InferenceResponse
    get_output_tensor_by_name = staticmethod(get_output_tensor_by_name)

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self._client = grpcclient.InferenceServerClient(url)
        self._grpc = grpcclient
        self.requests: list[tuple[str, PreferredMemory | None]] = []
        outer = self

        class InferenceRequest:
            def __init__(
                self,
                model_name: str,
                inputs: Sequence[Tensor],
                requested_output_names: Sequence[str],
                timeout: int = 0,
                preferred_memory: PreferredMemory | None = None,
                **_: Any,
            ) -> None:
                self.model_name = model_name
                self.inputs = list(inputs)
                self.outputs = list(requested_output_names)
                self.preferred_memory = preferred_memory

            def exec(self) -> InferenceResponse:  # noqa: A003 - python_backend's name
                return outer._exec(self)

        self.InferenceRequest = InferenceRequest

    def _exec(self, request: Any) -> InferenceResponse:
        grpc = self._grpc
        self.requests.append((request.model_name, request.preferred_memory))
        inputs = []
        for tensor in request.inputs:
            array = tensor.as_numpy()
            datatype = "BYTES" if array.dtype == np.object_ else _triton_dtype(array.dtype)
            item = grpc.InferInput(tensor.name(), list(array.shape), datatype)
            item.set_data_from_numpy(array)
            inputs.append(item)
        outputs = [grpc.InferRequestedOutput(name) for name in request.outputs]
        try:
            result = self._client.infer(request.model_name, inputs, outputs=outputs)
        except Exception as error:  # noqa: BLE001 - becomes the response's error, as in python_backend
            return InferenceResponse(error=TritonError(str(error)))
        wants_cpu = (
            request.preferred_memory is not None
            and request.preferred_memory.preferred_memory_type == TRITONSERVER_MEMORY_CPU
        )
        kind = Tensor if wants_cpu else GpuTensor
        return InferenceResponse([kind(name, result.as_numpy(name)) for name in request.outputs])

    def close(self) -> None:
        self._client.close()


def _triton_dtype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)
