"""The GPU path end to end (marker `gpu`): tiny preset -> FP16 -> the GPU flavour repositories this machine
can serve (tensorrt: engines for every network, the UNet's included; onnxruntime: the CUDA provider) ->
Triton -> text_to_image on both loops (client and server), compared with the CPU flavour's result within
the FP16 tolerance, and the two loops with each other.

It needs an NVIDIA GPU and a Triton with the GPU backends (the NGC image: `python3 -m pytest -m gpu` inside
`kandinsky22-triton:25.01-prepare` with the tests copied in). Elsewhere each case is skipped, with the reason.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

STEPS = {"prior_num_inference_steps": 4, "num_inference_steps": 4}
SIZE = 512  # the engines' profiles start at 512 px
FLAVOURS = ("tensorrt", "onnxruntime")


def _gpu() -> str | None:
    from kandinsky_export.tensorrt_engine import gpu_identity

    try:
        return gpu_identity()["name"]
    except RuntimeError:
        return None


def _why_not(flavour: str) -> str:
    """Why this machine cannot serve `flavour` ("" when it can)."""
    if _gpu() is None:
        return "no NVIDIA GPU visible to nvidia-smi or torch.cuda"
    try:
        from kandinsky_repository.serving.triton import find_triton

        install = find_triton()
    except RuntimeError as error:
        return f"no Triton server: {error}"
    backends = install.backend_dir or Path("/opt/tritonserver/backends")
    if not (backends / flavour).is_dir():
        return f"this Triton ({install.binary}) has no {flavour} backend"
    if flavour == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt module is not installed (engines cannot be built)"
    if flavour == "onnxruntime":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "this onnxruntime has no CUDAExecutionProvider (the FP16 check needs it)"
    return ""


pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if _gpu() is None:
        pytest.skip("no NVIDIA GPU visible to nvidia-smi or torch.cuda")
    from kandinsky_export.fp16 import convert_bundle

    bundle = tmp_path_factory.mktemp("gpu") / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    convert_bundle(bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return bundle


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_gpu_flavour_serves_what_the_cpu_flavour_serves_on_both_loops(
    flavour: str, fp16_bundle: Path, grpc_client, tmp_path: Path
) -> None:
    why_not = _why_not(flavour)
    if why_not:
        pytest.skip(why_not)
    from kandinsky_client.pipeline import KandinskyClient
    from kandinsky_export.fp16 import FP16_TOLERANCE
    from kandinsky_repository.generator.configs import read_config
    from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository
    from kandinsky_repository.serving.triton import TritonServer, free_port

    bundle = tmp_path / "bundle"
    shutil.copytree(fp16_bundle, bundle)
    if flavour == "tensorrt":
        from kandinsky_export.tensorrt_engine import build_engines

        results = build_engines(bundle)  # every network, each checked against its ONNX at each profile
        assert {r.component for r in results} >= {"unet", "prior", "movq_decoder"}
        assert all(r.metadata["check"]["passed"] for r in results)
    repository = tmp_path / "repository"
    generate_repository(bundle, repository, RepositoryOptions(flavour=flavour))
    if flavour == "tensorrt":
        assert read_config(repository / "unet").platform == "tensorrt_plan"

    request = {"prompt": "a red fox", "height": SIZE, "width": SIZE, "seed": 7, "output_type": "np", **STEPS}
    cpu = grpc_client.text_to_image(**request)  # the CPU flavour of the same bundle (the session's server)
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    results = {}
    with TritonServer(repository, log_file=tmp_path / "triton.log", **ports) as server:
        for loop in ("client", "server"):
            with KandinskyClient(server.grpc_url, loop=loop) as gpu_client:
                results[loop] = gpu_client.text_to_image(**request)
    # The prior's output (image embeddings) within the FP16 tolerance of its scale; the images (float,
    # [0, 1]) within the same tolerance on average: FP16 moves single pixels more, never the picture.
    scale = max(1.0, float(np.abs(cpu.image_embeds).max()))
    for loop, gpu in results.items():
        assert float(np.abs(gpu.image_embeds - cpu.image_embeds).max()) / scale <= FP16_TOLERANCE, loop
        assert float(np.abs(np.asarray(gpu.images) - np.asarray(cpu.images)).mean()) <= FP16_TOLERANCE, loop
    # the same requests on the same GPU at concurrency 1: the loops agree far inside that tolerance
    difference = np.abs(np.asarray(results["server"].images) - np.asarray(results["client"].images))
    assert float(difference.max()) <= FP16_TOLERANCE
