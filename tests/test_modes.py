"""Every served generation mode equals its diffusers pipeline on the same tiny checkpoint and noise.

As in test_text_to_image_parity: diffusers runs with every random draw recorded, the client replays
the draws (and must use all of them, in the same order and shapes); uint8 pixels must agree within the
bounds of `reference.assert_pixels_match` and embeddings within rtol 1e-4. Fixture images are made by `reference.picture`/`reference.mask`.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from kandinsky_core.noise import ReplayNoise
from PIL import Image

from . import reference
from .reference import mask, picture

PRIOR_STEPS = 3
DECODER_STEPS = 4
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def pipelines(tiny_checkpoint_root):
    prior, decoder = reference.load_pipelines(tiny_checkpoint_root)
    return SimpleNamespace(
        prior=prior,
        decoder=decoder,
        img2img=reference.load_img2img(tiny_checkpoint_root),
        inpaint=reference.load_inpaint(tiny_checkpoint_root),
        emb2emb=reference.load_emb2emb(tiny_checkpoint_root),
    )


def assert_matches(name: str, result, reference_run, noise: ReplayNoise) -> None:
    expected, image_embeds, negative_embeds, _ = reference_run
    assert noise.remaining == 0, "the client drew fewer random tensors than diffusers"
    got = np.stack([np.asarray(image) for image in result.images])
    assert got.shape == expected.shape
    np.testing.assert_allclose(result.image_embeds, image_embeds, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.negative_image_embeds, negative_embeds, rtol=1e-4, atol=1e-5)
    diff = reference.assert_pixels_match(got, expected)
    embed_error = max(
        float(np.abs(result.image_embeds - image_embeds).max()),
        float(np.abs(result.negative_image_embeds - negative_embeds).max()),
    )
    logger.info("%s: max pixel difference %d, embedding max abs error %.2e", name, diff.max(), embed_error)


def test_variations_match_diffusers(client, pipelines):
    image = picture(40, 48, seed=1)  # not square, not the encoder's size: exercises resize and crop
    run = reference.variations(
        pipelines.prior,
        pipelines.decoder,
        image=image,
        num_images_per_prompt=2,
        height=64,
        width=64,
        num_inference_steps=4,
    )
    noise = ReplayNoise(run[3])
    result = client.variations(
        image, num_images_per_prompt=2, height=64, width=64, num_inference_steps=4, noise=noise
    )
    assert_matches(f"variations[{client.transport.protocol}]", result, run, noise)


FUSE_CASES = [
    pytest.param({}, id="zero-image-negative"),
    pytest.param({"negative_prior_prompt": "blurry", "num_images_per_prompt": 2}, id="negative-prior-prompt"),
    pytest.param({"negative_prompt": "low quality"}, id="negative-prompt"),
]


@pytest.mark.parametrize("case", FUSE_CASES)
def test_fuse_matches_diffusers_interpolate(grpc_client, pipelines, case):
    items = ["a red fox", picture(48, 40, seed=2), "a castle at night"]
    weights = [0.5, 0.3, 0.2]
    size = {
        "height": 64,
        "width": 64,
        "prior_num_inference_steps": PRIOR_STEPS,
        "num_inference_steps": DECODER_STEPS,
    }
    run = reference.fuse(
        pipelines.prior, pipelines.decoder, images_and_prompts=items, weights=weights, **size, **case
    )
    noise = ReplayNoise(run[3])
    result = grpc_client.fuse(items, weights, **size, **case, noise=noise)
    assert_matches("fuse", result, run, noise)


IMG2IMG_CASES = [
    pytest.param(
        {"image": (80, 80), "height": 64, "width": 64, "strength": 0.5, "num_images_per_prompt": 2},
        id="square-two-images",
    ),
    pytest.param(
        {"image": (50, 70), "height": 64, "width": 128, "strength": 0.75, "negative_prompt": "blurry"},
        id="64x128-negative",
    ),
]


@pytest.mark.parametrize("case", IMG2IMG_CASES)
def test_image_to_image_matches_diffusers(grpc_client, pipelines, case):
    case = dict(case)
    image = picture(*case.pop("image"), seed=3)
    steps = {"prior_num_inference_steps": PRIOR_STEPS, "num_inference_steps": DECODER_STEPS}
    run = reference.image_to_image(
        pipelines.prior, pipelines.img2img, image=image, prompt="a watercolor", **steps, **case
    )
    noise = ReplayNoise(run[3])
    result = grpc_client.image_to_image(image, "a watercolor", **steps, **case, noise=noise)
    assert_matches("image_to_image", result, run, noise)
    assert result.images[0].size == (case["width"], case["height"])


EMB2EMB_CASES = [
    pytest.param({"strength": 0.5, "num_images_per_prompt": 2}, id="half-two-images"),
    pytest.param({"strength": 1.0, "negative_prompt": "dark"}, id="full-negative"),
]


@pytest.mark.parametrize("case", EMB2EMB_CASES)
def test_emb2emb_matches_diffusers(grpc_client, pipelines, case):
    image = picture(56, 36, seed=4)
    size = {"height": 64, "width": 64, "prior_num_inference_steps": 4, "num_inference_steps": DECODER_STEPS}
    run = reference.emb2emb(
        pipelines.emb2emb, pipelines.decoder, image=image, prompt="a snowy owl", **size, **case
    )
    noise = ReplayNoise(run[3])
    result = grpc_client.emb2emb(image, "a snowy owl", **size, **case, noise=noise)
    assert_matches("emb2emb", result, run, noise)


INPAINT_CASES = [
    pytest.param({"image": (64, 64), "box": (16, 16, 48, 40), "height": 64, "width": 64}, id="64x64"),
    pytest.param(
        {
            "image": (80, 120),
            "box": (10, 60, 70, 110),
            "height": 64,
            "width": 128,
            "negative_prompt": "blurry",
            "num_images_per_prompt": 2,
        },
        id="resized-64x128-two-images",
    ),
]


@pytest.mark.parametrize("case", INPAINT_CASES)
def test_inpaint_matches_diffusers(grpc_client, pipelines, case):
    case = dict(case)
    image_size = case.pop("image")
    image = picture(*image_size, seed=5)
    mask_image = mask(*image_size, case.pop("box"), seed=5)
    steps = {"prior_num_inference_steps": PRIOR_STEPS, "num_inference_steps": DECODER_STEPS}
    run = reference.inpaint(
        pipelines.prior,
        pipelines.inpaint,
        image=image,
        mask_image=mask_image,
        prompt="a red hat",
        **steps,
        **case,
    )
    noise = ReplayNoise(run[3])
    result = grpc_client.inpaint(image, mask_image, "a red hat", **steps, **case, noise=noise)
    assert_matches("inpaint", result, run, noise)


def test_outpaint_is_inpainting_of_the_extended_canvas(grpc_client, pipelines):
    image = picture(48, 40, seed=6)  # height 48, width 40
    left, top, right, bottom = 16, 8, 8, 8
    # The definition, written out independently of the client: edge pixels repeated, new area masked.
    canvas = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    new_area = np.full(canvas.shape[:2], 255, np.uint8)
    new_area[top : top + 48, left : left + 40] = 0
    steps = {"prior_num_inference_steps": PRIOR_STEPS, "num_inference_steps": DECODER_STEPS}
    run = reference.inpaint(
        pipelines.prior,
        pipelines.inpaint,
        image=Image.fromarray(canvas),
        mask_image=Image.fromarray(new_area),
        prompt="a wide beach",
        height=64,
        width=64,
        **steps,
    )
    noise = ReplayNoise(run[3])
    result = grpc_client.outpaint(
        image, "a wide beach", left=left, top=top, right=right, bottom=bottom, **steps, noise=noise
    )
    assert_matches("outpaint", result, run, noise)
    assert result.images[0].size == (64, 64)
