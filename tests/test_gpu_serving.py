"""GPU-only serving behaviour, checked here with stand-ins (see docs/gpu.md for what only a GPU can show).

- BLS outputs in GPU memory: the `kandinsky` model runs against `fake_pb_utils.GpuServerBls`, whose BLS
  responses come from the real CPU Triton of the session but stay "in GPU memory" unless the request
  prefers CPU memory, as python_backend does for TensorRT and GPU ONNX Runtime callees.
- The batching window: every per-step model of every GPU flavour must send a lone request at once.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import json_format
from kandinsky_core.request import TEXT_TO_IMAGE, GenerationRequest
from kandinsky_core.wire import MODEL_NAME, ResponseOptions, decode_images, request_inputs
from kandinsky_repository.generator.configs import read_config

from . import fake_pb_utils

REQUEST = {
    "prompt": "a red fox in the snow",
    "negative_prompt": "blurry",
    "height": 64,
    "width": 64,
    "prior_num_inference_steps": 2,
    "num_inference_steps": 3,
    "seed": 11,
}


class _Sender:
    def __init__(self) -> None:
        self.responses: list[tuple[Any, int]] = []
        self.done = threading.Event()

    def send(self, response: Any = None, flags: int = 0) -> None:
        self.responses.append((response, flags))
        if flags:
            self.done.set()


class _Request:
    """What the `kandinsky` model reads of a Triton request."""

    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        self.inputs = {name: fake_pb_utils.Tensor(name, value) for name, value in inputs.items()}
        self.sender = _Sender()

    def get_response_sender(self) -> _Sender:
        return self.sender

    def parameters(self) -> str:
        return "{}"

    def timeout(self) -> int:
        return 0

    def is_cancelled(self) -> bool:
        return False


class _GpuServer(fake_pb_utils.GpuServerBls):
    """The BLS stand-in plus what the `kandinsky` model needs of the module for its own responses."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class TritonError(fake_pb_utils.TritonError):
        INVALID_ARG, CANCELLED, UNAVAILABLE, INTERNAL = 3, 1, 14, 13

        def __init__(self, message: str, code: int = 13) -> None:
            super().__init__(message)
            self.code = code

    class InferenceResponse(fake_pb_utils.InferenceResponse):
        def __init__(self, output_tensors=(), error=None) -> None:  # noqa: ANN001 - python_backend's signature
            super().__init__(output_tensors, error)

    @staticmethod
    def get_input_tensor_by_name(request: _Request, name: str) -> fake_pb_utils.Tensor | None:
        return request.inputs.get(name)


def _generation_model(repository: Path, bls: _GpuServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The repository's `kandinsky` model class, initialised as Triton does, importing `bls` as pb_utils."""
    from kandinsky_repository.python_models.kandinsky_model import KandinskyGeneration

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", bls)
    config = json_format.MessageToDict(read_config(repository / MODEL_NAME), preserving_proto_field_name=True)
    model = KandinskyGeneration()
    model.initialize({"model_config": json.dumps(config)})
    return model


def test_the_server_loop_reads_bls_outputs_that_a_gpu_callee_leaves_in_gpu_memory(
    tiny_repository: Path, triton_server, grpc_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU every network answers a BLS request in GPU memory unless CPU memory is preferred; the
    server loop must ask for host memory (it did not: every request failed at its first call) and then
    give exactly the client loop's result."""
    bls = _GpuServer(triton_server.grpc_url)
    model = _generation_model(tiny_repository, bls, monkeypatch)
    try:
        request = GenerationRequest.build(TEXT_TO_IMAGE, **REQUEST)
        served = _Request(request_inputs(request, ResponseOptions(progress=True, preview_every=1)))
        model.execute([served])
        assert served.sender.done.wait(120), "the generation did not finish"
    finally:
        model.finalize()
        bls.close()
    final, flags = served.sender.responses[-1]
    assert flags == _GpuServer.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert not final.has_error(), final.error().message()
    outputs = {tensor.name(): tensor.as_numpy() for tensor in final.output_tensors()}
    server_images = decode_images(outputs["image"])

    client = grpc_client.text_to_image(**REQUEST)
    assert np.array_equal(np.asarray(server_images[0]), np.asarray(client.images[0]))
    # every network call (steps, encoders, previews, decode) asked for host memory
    assert {name for name, _ in bls.requests} >= {"encode_prompt", "prior", "unet", "decode_image"}
    assert all(
        memory is not None and memory.preferred_memory_type == fake_pb_utils.TRITONSERVER_MEMORY_CPU
        for _, memory in bls.requests
    )
    previews = [
        r for r, _ in served.sender.responses[:-1] if any(t.name() == "preview" for t in r.output_tensors())
    ]
    assert len(previews) == REQUEST["num_inference_steps"]


def test_the_timed_flavour_serves_both_loops_at_the_modelled_step_times(tiny_bundle, tmp_path: Path) -> None:
    """The tensorrt flavour's configuration on this CPU, each network sleeping its modelled H100 time:
    both loops generate, and every UNet execution took at least the modelled time of its batch."""
    from kandinsky_client.pipeline import KandinskyClient
    from kandinsky_core.components import COMPONENTS
    from kandinsky_core.gpu_costs import modelled_seconds
    from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository

    from .conftest import local_triton_server

    repository = tmp_path / "timed"
    generate_repository(tiny_bundle[0], repository, RepositoryOptions(flavour="timed", gpu="h100"))
    request = {**REQUEST, "height": 512, "width": 512}
    with local_triton_server(repository, tmp_path / "triton.log") as server:
        stats_client = KandinskyClient(server.grpc_url)
        before = _unet_batches(stats_client)  # the warm-ups, one per engine profile
        for loop in ("client", "server"):
            with KandinskyClient(server.grpc_url, loop=loop) as client:
                result = client.text_to_image(**request)
                assert result.images[0].size == (512, 512)
        after = _unet_batches(stats_client)
        stats_client.close()
    executed = {
        rows: (count - before.get(rows, (0, 0))[0], ns - before.get(rows, (0, 0))[1])
        for rows, (count, ns) in after.items()
    }
    assert sum(count for count, _ in executed.values()) == 2 * request["num_inference_steps"]
    for rows, (count, ns) in executed.items():
        assert rows <= COMPONENTS["unet"].max_batch_size
        assert ns >= count * modelled_seconds("unet", rows, 512, 512, "h100") * 1e9


def _unet_batches(client: Any) -> dict[int, tuple[int, int]]:
    """UNet executions so far: batch rows -> (count, compute ns), from Triton's statistics."""
    stats = client.transport.inference_statistics("unet")["model_stats"][0]
    return {
        int(b["batch_size"]): (int(b["compute_infer"]["count"]), int(b["compute_infer"]["ns"]))
        for b in stats["batch_stats"]
    }
