"""The GPU path end to end (marker `gpu`): tiny preset -> FP16 -> TensorRT engines (or ONNX Runtime's CUDA
provider where TensorRT is absent) -> the GPU flavour repository -> Triton -> text_to_image, compared with
the CPU flavour's result within the FP16 tolerance.

It needs an NVIDIA GPU and a Triton with the GPU backends (the NGC image: `python3 -m pytest -m gpu` inside
`kandinsky22-triton:25.01-prepare` with the tests copied in). Elsewhere it is skipped, with the reason.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

STEPS = {"prior_num_inference_steps": 4, "num_inference_steps": 4}
SIZE = 512  # the engines' default profile starts at 512 px


def _gpu() -> str | None:
    from kandinsky_export.tensorrt_engine import gpu_identity

    try:
        return gpu_identity()["name"]
    except RuntimeError:
        return None


def _flavour() -> tuple[str | None, str]:
    """(flavour, why not) for this machine: tensorrt where TensorRT and its Triton backend exist, else
    onnxruntime where ONNX Runtime has the CUDA provider and Triton its onnxruntime backend."""
    if _gpu() is None:
        return None, "no NVIDIA GPU visible to nvidia-smi or torch.cuda"
    try:
        from kandinsky_repository.server import find_triton

        install = find_triton()
    except RuntimeError as error:
        return None, f"no Triton server: {error}"
    backends = install.backend_dir or Path("/opt/tritonserver/backends")
    if importlib.util.find_spec("tensorrt") is not None and (backends / "tensorrt").is_dir():
        return "tensorrt", ""
    import onnxruntime

    if (
        "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        and (backends / "onnxruntime").is_dir()
    ):
        return "onnxruntime", ""
    return (
        None,
        f"this Triton ({install.binary}) has neither the tensorrt nor the onnxruntime backend with CUDA",
    )


FLAVOUR, WHY_NOT = _flavour()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(FLAVOUR is None, reason=WHY_NOT)]


def test_the_gpu_flavour_serves_what_the_cpu_flavour_serves(tiny_bundle, grpc_client, tmp_path: Path) -> None:
    from kandinsky_client.pipeline import KandinskyClient
    from kandinsky_export.fp16 import FP16_TOLERANCE, convert_bundle
    from kandinsky_repository.generate import RepositoryOptions, generate_repository
    from kandinsky_repository.server import TritonServer, free_port

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    convert_bundle(bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if FLAVOUR == "tensorrt":
        from kandinsky_export.tensorrt_engine import build_engines

        results = build_engines(bundle)
        assert all(r.action == "built" for r in results)
    repository = tmp_path / "repository"
    generate_repository(bundle, repository, RepositoryOptions(flavour=FLAVOUR))

    request = {"prompt": "a red fox", "height": SIZE, "width": SIZE, "seed": 7, "output_type": "np", **STEPS}
    cpu = grpc_client.text_to_image(**request)  # the CPU flavour of the same bundle (the session's server)
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    with TritonServer(repository, **ports) as server, KandinskyClient(server.grpc_url) as gpu_client:
        gpu = gpu_client.text_to_image(**request)
    # The prior's output (image embeddings) within the FP16 tolerance of its scale; the images (float,
    # [0, 1]) within the same tolerance on average: FP16 moves single pixels more, never the picture.
    scale = max(1.0, float(np.abs(cpu.image_embeds).max()))
    assert float(np.abs(gpu.image_embeds - cpu.image_embeds).max()) / scale <= FP16_TOLERANCE
    assert float(np.abs(np.asarray(gpu.images) - np.asarray(cpu.images)).mean()) <= FP16_TOLERANCE
