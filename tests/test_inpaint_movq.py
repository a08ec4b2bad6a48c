"""Inpainting with the inpainting repo's own MoVQ where it differs from the decoder's.

diffusers' `KandinskyV22InpaintPipeline` encodes and decodes with `decoder_inpaint/movq`. The tiny preset
ships a copy of the decoder's (shared: no extra models, see test_checkpoint_sources); here that copy is
re-randomised, so the export must serve it as `movq_*_inpaint` and inpainting must match diffusers with it.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from kandinsky_core import components as registry
from kandinsky_core.noise import ReplayNoise
from kandinsky_core.request import INPAINT, OUTPAINT, TEXT_TO_IMAGE

from . import reference
from .conftest import local_triton_server
from .reference import mask, picture

OWN_MOVQ_SEED = 1234  # any seed but the preset's: the inpainting MoVQ gets other weights
PRIOR_STEPS = 2
DECODER_STEPS = 3
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def own_movq_root(tiny_checkpoint_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint (without its ControlNet) whose decoder_inpaint/movq has its own random weights."""
    import torch
    from diffusers import VQModel
    from kandinsky_export.random_weights import randomize_untrained_parameters

    root = tmp_path_factory.mktemp("own-movq") / "checkpoint"
    shutil.copytree(tiny_checkpoint_root, root, ignore=shutil.ignore_patterns("controlnet"))
    folder = root / "decoder_inpaint" / "movq"
    config = VQModel.load_config(folder)
    torch.manual_seed(OWN_MOVQ_SEED)
    movq = VQModel.from_config(config)
    randomize_untrained_parameters(movq, torch.Generator().manual_seed(OWN_MOVQ_SEED))
    shutil.rmtree(folder)
    movq.save_pretrained(folder)
    return root


@pytest.fixture(scope="module")
def own_movq_bundle(own_movq_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kandinsky_export.checkpoint import Checkpoint
    from kandinsky_export.onnx_export import export_bundle

    out = tmp_path_factory.mktemp("own-movq-onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_bundle(Checkpoint.from_root(own_movq_root), out)
    return out


@pytest.fixture(scope="module")
def own_movq_repository(own_movq_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kandinsky_repository.generator.repository import generate_repository

    repository = tmp_path_factory.mktemp("own-movq-repo") / "model_repository"
    generate_repository(own_movq_bundle, repository)
    return repository


@pytest.fixture(scope="module")
def own_movq_server(own_movq_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("triton-own-movq") / "server.log"
    with local_triton_server(own_movq_repository, log) as server:
        yield server
    logger.info("server log: %s", log)


@pytest.fixture(scope="module")
def own_movq_client(own_movq_server):
    from kandinsky_client.pipeline import KandinskyClient

    with KandinskyClient(own_movq_server.grpc_url, protocol="grpc") as client:
        yield client


@pytest.fixture(scope="module")
def own_movq_pipelines(own_movq_root: Path) -> SimpleNamespace:
    prior, _ = reference.load_pipelines(own_movq_root)
    return SimpleNamespace(prior=prior, inpaint=reference.load_inpaint(own_movq_root))


def test_a_different_inpaint_movq_is_exported_and_served_as_its_own(
    own_movq_bundle: Path, own_movq_repository: Path, own_movq_client
) -> None:
    manifest = json.loads((own_movq_bundle / "manifest.json").read_text())
    movq = manifest["movq"]
    assert movq["decoder_inpaint_movq"] == "decoder_inpaint"
    assert movq["digests"]["decoder_inpaint"] != movq["digests"]["decoder"]
    own = {registry.MOVQ_ENCODER_INPAINT.name, registry.MOVQ_DECODER_INPAINT.name}
    assert own <= set(manifest["components"])
    for name in [*own, registry.ENCODE_LATENTS_INPAINT.name, registry.DECODE_IMAGE_INPAINT.name]:
        assert (own_movq_repository / name / "config.pbtxt").is_file(), name
    generator = own_movq_client.generator
    assert own_movq_client.info.inpaint_own_movq
    assert generator.movq(INPAINT) is generator.movq(OUTPAINT) is registry.INPAINT_MOVQ
    assert generator.movq(TEXT_TO_IMAGE) is registry.MOVQ  # the other modes keep the decoder's
    rgb = np.asarray(picture(64, 64, seed=3))[None]
    latents = [
        own_movq_client.transport.infer(spec, {"image_rgb": rgb})["latents"]
        for spec in (registry.ENCODE_LATENTS, registry.ENCODE_LATENTS_INPAINT)
    ]
    assert np.abs(latents[0] - latents[1]).max() > 1e-2  # two different models really are served


def test_inpaint_with_its_own_movq_matches_diffusers(own_movq_client, own_movq_pipelines) -> None:
    """KandinskyV22InpaintPipeline from decoder_inpaint/ (its own MoVQ), over gRPC, pixel for pixel."""
    image = picture(64, 64, seed=5)
    mask_image = mask(64, 64, (16, 16, 48, 40), seed=5)
    steps = {"prior_num_inference_steps": PRIOR_STEPS, "num_inference_steps": DECODER_STEPS}
    expected, image_embeds, _, draws = reference.inpaint(
        own_movq_pipelines.prior,
        own_movq_pipelines.inpaint,
        image=image,
        mask_image=mask_image,
        prompt="a red hat",
        height=64,
        width=64,
        **steps,
    )
    noise = ReplayNoise(draws)
    result = own_movq_client.inpaint(
        image, mask_image, "a red hat", height=64, width=64, **steps, noise=noise
    )
    assert noise.remaining == 0
    np.testing.assert_allclose(result.image_embeds, image_embeds, rtol=1e-4, atol=1e-5)
    got = np.stack([np.asarray(picture_) for picture_ in result.images])
    diff = reference.assert_pixels_match(got, expected)
    logger.info("inpaint with its own MoVQ: max pixel difference %d", diff.max())


def test_the_onnxruntime_flavour_serves_the_own_movq_too(own_movq_bundle: Path, tmp_path: Path) -> None:
    """The GPU flavours take the `movq_*_inpaint` components from the registry like every other network."""
    from kandinsky_core.server_info import INPAINT_MOVQ_PARAMETER
    from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository, read_config

    repository = tmp_path / "model_repository"
    generate_repository(own_movq_bundle, repository, RepositoryOptions(flavour="onnxruntime"))
    for spec in (registry.MOVQ_ENCODER_INPAINT, registry.MOVQ_DECODER_INPAINT):
        config = read_config(repository / spec.name)
        assert config.backend == "onnxruntime", spec.name
        assert [t.name for t in config.input] == [t.name for t in spec.inputs]
        assert [t.name for t in config.output] == [t.name for t in spec.outputs]
    for spec in (registry.ENCODE_LATENTS_INPAINT, registry.DECODE_IMAGE_INPAINT):
        config = read_config(repository / spec.name)
        assert [step.model_name for step in config.ensemble_scheduling.step] == list(spec.steps)
    unet_inpaint = read_config(repository / "unet_inpaint")
    assert unet_inpaint.parameters[INPAINT_MOVQ_PARAMETER].string_value == "true"


def test_the_server_loop_outpaints_with_the_own_movq_too(own_movq_server, own_movq_client) -> None:
    """The `kandinsky` model reads the same `own_movq` parameter: its outpainting equals the client loop's."""
    from kandinsky_client.pipeline import KandinskyClient

    image = picture(48, 40, seed=6)
    options = {"left": 16, "top": 8, "right": 8, "bottom": 8, "seed": 7}
    options |= {"prior_num_inference_steps": PRIOR_STEPS, "num_inference_steps": DECODER_STEPS}
    expected = own_movq_client.outpaint(image, "a wide beach", **options)
    with KandinskyClient(own_movq_server.grpc_url, protocol="grpc", loop="server") as server_loop:
        got = server_loop.outpaint(image, "a wide beach", **options)
    reference.assert_pixels_match(
        np.stack([np.asarray(x) for x in got.images]), np.stack([np.asarray(x) for x in expected.images])
    )
