"""ControlNet depth (`kandinsky-2-2-controlnet-depth`): the preset part, its exported UNet, the two modes
against their diffusers pipelines, and the hint's checks.

Parity as in test_modes: diffusers runs with every random draw recorded, the client replays them; uint8
pixels within `reference.assert_pixels_match`, embeddings within rtol 1e-4. The server loop's equality
with the client loop is in test_server_generation (its MODE_CASES), bad hints on the server in its
BAD_FIELDS.
"""

from __future__ import annotations

import io
import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from kandinsky_core.errors import InvalidRequest
from kandinsky_core.noise import ReplayNoise
from kandinsky_core.request import CONTROLNET, CONTROLNET_IMAGE_TO_IMAGE, GenerationRequest
from kandinsky_core.validation import check_request
from PIL import Image

from . import reference
from .reference import picture

PRIOR_STEPS = 3
DECODER_STEPS = 4
logger = logging.getLogger(__name__)


def depth_map(height: int, width: int, seed: int = 0) -> Image.Image:
    """A grayscale "depth map" (what transformers' depth-estimation pipeline returns is an "L" image)."""
    return picture(height, width, seed=seed).convert("L")


@pytest.fixture(scope="module")
def pipelines(tiny_checkpoint_root):
    from diffusers import KandinskyV22PriorPipeline

    prior = KandinskyV22PriorPipeline.from_pretrained(tiny_checkpoint_root / "prior")
    return SimpleNamespace(
        prior=reference._quiet(prior),
        controlnet=reference.load_controlnet(tiny_checkpoint_root),
        img2img=reference.load_controlnet_img2img(tiny_checkpoint_root),
    )


def assert_matches(name: str, result, reference_run, noise: ReplayNoise) -> None:
    expected, image_embeds, negative_embeds, _ = reference_run
    assert noise.remaining == 0, "the client drew fewer random tensors than diffusers"
    got = np.stack([np.asarray(image) for image in result.images])
    np.testing.assert_allclose(result.image_embeds, image_embeds, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.negative_image_embeds, negative_embeds, rtol=1e-4, atol=1e-5)
    diff = reference.assert_pixels_match(got, expected)
    logger.info(
        "%s: max pixel difference %d, %.2f%% of values differ",
        name,
        diff.max(),
        100 * float((diff >= 1).mean()),
    )


# -- the checkpoint part and its export --------------------------------------------------------------


def test_preset_part_is_the_released_controlnet_layout(tiny_checkpoint_root, tiny_checkpoint):
    from diffusers import KandinskyV22ControlnetPipeline

    pipe = KandinskyV22ControlnetPipeline.from_pretrained(tiny_checkpoint_root / "controlnet")
    decoder_unet = tiny_checkpoint.config("unet")
    assert pipe.unet.config.addition_embed_type == "image_hint"
    assert pipe.unet.config.in_channels == decoder_unet["in_channels"] + 4  # latents + embedded hint
    assert list(pipe.unet.config.block_out_channels) == list(decoder_unet["block_out_channels"])
    assert tiny_checkpoint.has("controlnet")
    assert tiny_checkpoint.scheduler_config("controlnet") == tiny_checkpoint.scheduler_config("decoder")


def test_controlnet_unet_is_exported_with_a_passed_parity_check(tiny_bundle):
    from kandinsky_export.onnx_export import onnx_session, run_session

    bundle, reports = tiny_bundle
    controlnet = [r for r in reports if r.component == "unet_controlnet"]
    assert controlnet and all(r.passed for r in controlnet)
    assert controlnet[0].shapes["hint"][1:] == [3, 128, 192]  # checked at a size the trace did not use
    logger.info("unet_controlnet ONNX vs PyTorch: max abs %.2e", controlnet[0].max_abs_error)

    # The hint reaches the output (a graph that ignored it would pass the parity check on its own).
    session = onnx_session(bundle / "unet_controlnet" / "model.onnx")
    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([500, 500], np.int64),
        "image_embeds": rng.standard_normal((2, 32)).astype(np.float32),
        "hint": np.zeros((2, 3, 64, 64), np.float32),
    }
    flat = run_session(session, inputs)["noise_pred"]
    bumpy = run_session(session, {**inputs, "hint": rng.uniform(0, 1, (2, 3, 64, 64)).astype(np.float32)})
    assert np.abs(flat - bumpy["noise_pred"]).max() > 1e-2


def test_a_unet_the_served_graph_cannot_take_is_refused(tiny_checkpoint):
    from kandinsky_export.controlnet import check_controlnet_unet

    config = tiny_checkpoint.config("unet_controlnet")
    check_controlnet_unet(config, tiny_checkpoint.dims)
    with pytest.raises(ValueError, match="addition_embed_type 'image'"):
        check_controlnet_unet(tiny_checkpoint.config("unet"), tiny_checkpoint.dims)
    with pytest.raises(ValueError, match="in_channels 5; expected 8"):
        check_controlnet_unet({**config, "in_channels": 5}, tiny_checkpoint.dims)
    with pytest.raises(ValueError, match="MoVQ scales by 4"):
        check_controlnet_unet(config, replace(tiny_checkpoint.dims, movq_scale_factor=4))


def test_a_controlnet_with_another_movq_is_refused(tiny_checkpoint_root, tmp_path):
    """diffusers' ControlNet pipelines decode with the ControlNet repo's own MoVQ; the bundle serves the
    decoder's, so the export refuses a ControlNet whose MoVQ is a different model."""
    import shutil

    import torch
    from diffusers import VQModel
    from kandinsky_export.checkpoint import Checkpoint
    from kandinsky_export.controlnet import ControlnetMovqMismatch
    from kandinsky_export.onnx_export import export_component

    root = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint_root, root)
    movq = VQModel.from_pretrained(root / "controlnet" / "movq")
    with torch.no_grad():
        movq.decoder.conv_out.bias.add_(0.1)
    movq.save_pretrained(root / "controlnet" / "movq")
    with pytest.raises(ControlnetMovqMismatch, match="differs from"):
        export_component(Checkpoint.from_root(root), "unet_controlnet", tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "unet_controlnet" / "model.onnx").exists()


# -- the modes against diffusers ---------------------------------------------------------------------


def test_controlnet_matches_diffusers(client, pipelines):
    hint = depth_map(64, 64, seed=21)
    case = {
        "negative_prompt": "blurry",
        "num_images_per_prompt": 2,
        "prior_num_inference_steps": PRIOR_STEPS,
        "num_inference_steps": DECODER_STEPS,
    }
    run = reference.controlnet(
        pipelines.prior, pipelines.controlnet, hint=hint, prompt="a robot", height=64, width=64, **case
    )
    noise = ReplayNoise(run[3])
    result = client.controlnet("a robot", hint, **case, noise=noise)  # height/width from the hint
    assert_matches(f"controlnet[{client.transport.protocol}]", result, run, noise)
    assert result.images[0].size == (64, 64)


def test_controlnet_non_square_rgb_hint_matches_diffusers(grpc_client, pipelines):
    hint = picture(64, 128, seed=22)  # an RGB hint keeps its three channels
    steps = {"prior_num_inference_steps": PRIOR_STEPS, "num_inference_steps": DECODER_STEPS}
    run = reference.controlnet(
        pipelines.prior, pipelines.controlnet, hint=hint, prompt="a robot", height=64, width=128, **steps
    )
    noise = ReplayNoise(run[3])
    result = grpc_client.controlnet("a robot", hint, height=64, width=128, **steps, noise=noise)
    assert_matches("controlnet-64x128", result, run, noise)
    assert result.images[0].size == (128, 64)


CONTROLNET_IMG2IMG_CASES = [
    pytest.param(
        {"image": (80, 80), "hint": (64, 64), "strength": 0.5, "num_images_per_prompt": 2}, id="square-two"
    ),
    pytest.param(
        {"image": (50, 70), "hint": (64, 128), "strength": 0.75, "negative_prompt": "blurry"},
        id="64x128-negative",
    ),
]


@pytest.mark.parametrize("case", CONTROLNET_IMG2IMG_CASES)
def test_controlnet_image_to_image_matches_diffusers(client, pipelines, case):
    case = dict(case)
    image = picture(*case.pop("image"), seed=23)
    height, width = case.pop("hint")
    hint = depth_map(height, width, seed=24)
    steps = {"prior_num_inference_steps": PRIOR_STEPS, "num_inference_steps": DECODER_STEPS}
    run = reference.controlnet_image_to_image(
        pipelines.prior,
        pipelines.img2img,
        image=image,
        hint=hint,
        prompt="a watercolor",
        height=height,
        width=width,
        **steps,
        **case,
    )
    noise = ReplayNoise(run[3])
    result = client.controlnet_image_to_image(image, "a watercolor", hint, **steps, **case, noise=noise)
    assert_matches(f"controlnet_image_to_image[{client.transport.protocol}]", result, run, noise)
    assert result.images[0].size == (width, height)


# -- the hint's checks -------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BAD_HINTS = [
    pytest.param({"hint": depth_map(64, 64), "height": 128}, "must have the output's size 64x128", id="size"),
    pytest.param({"hint": picture(64, 64).convert("RGBA")}, "has an alpha channel", id="rgba"),
    pytest.param({"hint": depth_map(64, 64).convert("LA")}, "has an alpha channel", id="gray-alpha"),
    pytest.param({"hint": np.zeros((64, 64, 2), np.uint8)}, "2 channels; a hint has 1", id="2-channels"),
    pytest.param({"hint": np.zeros((64, 64, 4), np.uint8)}, "4 channels; a hint has 1", id="4-channels"),
    pytest.param(
        {"hint": _png(Image.fromarray(np.zeros((64, 64), np.uint16)))}, "has PIL mode I", id="16-bit"
    ),
    pytest.param({"hint": b"\x89PNG not really"}, "is not a readable image file", id="unreadable"),
    pytest.param({"hint": np.zeros((64, 64), np.float32)}, "image arrays must be uint8", id="float-array"),
    pytest.param({}, "is required by mode controlnet", id="missing"),
]


@pytest.mark.parametrize(("fields", "fragment"), BAD_HINTS)
def test_bad_hints_are_refused_naming_the_field(grpc_client, fields, fragment):
    request = GenerationRequest(mode=CONTROLNET, prompt="a robot", **fields)
    with pytest.raises(InvalidRequest) as error:
        check_request(request, grpc_client.info)
    assert error.value.field == "hint" and fragment in str(error.value), str(error.value)


def test_controlnet_image_to_image_takes_its_size_from_the_hint(grpc_client):
    request = GenerationRequest(
        mode=CONTROLNET_IMAGE_TO_IMAGE, prompt="x", image=picture(80, 40), hint=depth_map(64, 128)
    )
    checked = check_request(request, grpc_client.info)
    assert (checked.height, checked.width) == (64, 128)
    assert checked.hint.mode == "RGB" and checked.hint.size == (128, 64)
    with pytest.raises(InvalidRequest, match="hint: is 128x64 pixels"):
        check_request(request.with_values(width=64), grpc_client.info)


def test_a_server_without_the_controlnet_unet_refuses_the_modes(grpc_client):
    info = replace(grpc_client.info, controlnet_scheduler=None)
    with pytest.raises(InvalidRequest, match="mode: ControlNet needs the 'unet_controlnet' model"):
        check_request(GenerationRequest(mode=CONTROLNET, prompt="x", hint=depth_map(64, 64)), info)


def test_the_cli_builds_controlnet_requests(tmp_path: Path):
    from kandinsky_client.cli import build_parser, request_from_args

    args = build_parser().parse_args(["controlnet", "depth.png", "a robot", "-o", str(tmp_path / "r.png")])
    request = request_from_args(args)
    assert (request.mode, request.hint, request.prompt) == (CONTROLNET, "depth.png", "a robot")
    argv = ["controlnet-img2img", "photo.png", "depth.png", "a robot", "--strength", "0.6", "-o", "r.png"]
    request = request_from_args(build_parser().parse_args(argv))
    assert request.mode == CONTROLNET_IMAGE_TO_IMAGE and request.image == "photo.png"
    assert (request.hint, request.strength) == ("depth.png", 0.6)
