"""The served text-to-image result equals diffusers' prior + decoder pipelines on the same checkpoint.

Identical initial noise: the diffusers run records every tensor it draws; the client replays them.
Tolerance: `reference.assert_pixels_match` (the reasons are written there).
"""

from __future__ import annotations

import numpy as np
import pytest
from kandinsky_core.noise import ReplayNoise

from .reference import assert_pixels_match, load_pipelines, text_to_image

PRIOR_STEPS = 3
DECODER_STEPS = 4


@pytest.fixture(scope="module")
def reference_pipelines(tiny_checkpoint_root):
    return load_pipelines(tiny_checkpoint_root)


CASES = [
    pytest.param({"prompt": "a photo of a cat", "height": 64, "width": 64, "seed": 0}, id="64x64-seed0"),
    pytest.param(
        {"prompt": "a castle in the mountains", "height": 64, "width": 128, "seed": 1}, id="64x128-seed1"
    ),
    pytest.param(
        {
            "prompt": "a red fox",
            "negative_prompt": "blurry, low quality",
            "height": 128,
            "width": 64,
            "seed": 2,
        },
        id="negative-prompt",
    ),
    pytest.param(
        {
            "prompt": ["a dog", "an owl at night"],
            "height": 64,
            "width": 64,
            "seed": 3,
            "num_images_per_prompt": 2,
        },
        id="two-prompts-two-images",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_served_text_to_image_matches_diffusers(client, reference_pipelines, case):
    prior, decoder = reference_pipelines
    expected, image_embeds, negative_embeds, draws = text_to_image(
        prior, decoder, prior_num_inference_steps=PRIOR_STEPS, num_inference_steps=DECODER_STEPS, **case
    )
    noise = ReplayNoise(draws)
    kwargs = {k: v for k, v in case.items() if k != "seed"}
    result = client.text_to_image(
        **kwargs, prior_num_inference_steps=PRIOR_STEPS, num_inference_steps=DECODER_STEPS, noise=noise
    )
    assert noise.remaining == 0, "the client drew fewer random tensors than diffusers"
    got = np.stack([np.asarray(image) for image in result.images])
    assert got.shape == expected.shape
    np.testing.assert_allclose(result.image_embeds, image_embeds, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.negative_image_embeds, negative_embeds, rtol=1e-4, atol=1e-5)
    assert_pixels_match(got, expected)
