"""Served generation with a swapped decoder scheduler equals diffusers with the same swap.

diffusers users write `pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`;
our request says `scheduler="DPMSolverMultistepScheduler"` (and `scheduler_config` overrides). Both run
on the same tiny checkpoint with replayed noise; pixels within `reference.assert_pixels_match`, image
embeddings within rtol 1e-4 (the prior is unchanged). The schedulers' own step-for-step equality with
diffusers is in test_schedulers.py; the Euler schedulers are not compared here because diffusers'
Kandinsky pipelines never call their `scale_model_input`, which the served loop does (docs/schedulers.md).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from kandinsky_core.errors import InvalidRequest
from kandinsky_core.noise import ReplayNoise

from . import reference
from .reference import mask, picture, swapped_scheduler

STEPS = {"prior_num_inference_steps": 3, "num_inference_steps": 5}
SCHEDULERS = [
    pytest.param("DDIMScheduler", None, id="ddim"),
    pytest.param("DPMSolverMultistepScheduler", None, id="dpm++"),
    pytest.param("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, id="dpm++karras"),
]


@pytest.fixture(scope="module")
def pipelines(tiny_checkpoint_root):
    prior, decoder = reference.load_pipelines(tiny_checkpoint_root)
    return SimpleNamespace(
        prior=prior,
        decoder=decoder,
        img2img=reference.load_img2img(tiny_checkpoint_root),
        inpaint=reference.load_inpaint(tiny_checkpoint_root),
    )


def _check(result, run, noise) -> None:
    expected, image_embeds, negative_embeds, _ = run
    assert noise.remaining == 0, "the client drew fewer random tensors than diffusers"
    np.testing.assert_allclose(result.image_embeds, image_embeds, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.negative_image_embeds, negative_embeds, rtol=1e-4, atol=1e-5)
    reference.assert_pixels_match(np.stack([np.asarray(i) for i in result.images]), expected)


@pytest.mark.parametrize(("name", "overrides"), SCHEDULERS)
def test_text_to_image_with_a_swapped_scheduler(client, pipelines, name, overrides):
    case = {"prompt": "a red fox", "height": 64, "width": 64, "seed": 4, **STEPS}
    with swapped_scheduler(pipelines.decoder, name, overrides):
        run = reference.text_to_image(pipelines.prior, pipelines.decoder, **case)
    noise = ReplayNoise(run[3])
    kwargs = {k: v for k, v in case.items() if k != "seed"}
    result = client.text_to_image(**kwargs, scheduler=name, scheduler_config=overrides, noise=noise)
    _check(result, run, noise)
    # Not vacuous: another deterministic scheduler on the same noise gives another image.
    other = "DDIMScheduler" if name != "DDIMScheduler" else "DPMSolverMultistepScheduler"
    different = client.text_to_image(**kwargs, scheduler=other, noise=ReplayNoise(run[3]))
    assert np.abs(np.asarray(different.images[0], int) - np.asarray(result.images[0], int)).max() > 10


@pytest.mark.parametrize("strength", [0.4, 0.8])
@pytest.mark.parametrize(("name", "overrides"), SCHEDULERS)
def test_image_to_image_with_a_swapped_scheduler(client, pipelines, name, overrides, strength):
    image = picture(64, 64, seed=9)
    case = {
        "image": image,
        "prompt": "a watercolor",
        "strength": strength,
        "height": 64,
        "width": 64,
        **STEPS,
    }
    with swapped_scheduler(pipelines.img2img, name, overrides):
        run = reference.image_to_image(pipelines.prior, pipelines.img2img, **case)
    noise = ReplayNoise(run[3])
    args = (case.pop("image"), case.pop("prompt"))
    _check(
        client.image_to_image(*args, **case, scheduler=name, scheduler_config=overrides, noise=noise),
        run,
        noise,
    )


@pytest.mark.parametrize(("name", "overrides"), SCHEDULERS)
def test_inpaint_with_a_swapped_scheduler(client, pipelines, name, overrides):
    image, mask_image = picture(64, 64, seed=10), mask(64, 64, (16, 16, 48, 40), seed=10)
    case = {"prompt": "a red hat", "height": 64, "width": 64, **STEPS}
    with swapped_scheduler(pipelines.inpaint, name, overrides):
        run = reference.inpaint(
            pipelines.prior, pipelines.inpaint, image=image, mask_image=mask_image, **case
        )
    noise = ReplayNoise(run[3])
    result = client.inpaint(
        image, mask_image, **case, scheduler=name, scheduler_config=overrides, noise=noise
    )
    _check(result, run, noise)


@pytest.mark.parametrize(
    ("options", "field", "fragment"),
    [
        ({"scheduler": "HeunDiscreteScheduler"}, "scheduler", "valid names: DDPMScheduler"),
        (
            {"scheduler": "DPMSolverMultistepScheduler", "scheduler_config": {"solver_order": 3}},
            "scheduler_config.solver_order",
            "valid",
        ),
        (
            {"scheduler": "DDIMScheduler", "scheduler_config": {"no_such_key": 1}},
            "scheduler_config.no_such_key",
            "valid keys",
        ),
        ({"scheduler_config": "{not json"}, "scheduler_config", "is not valid JSON"),
        ({"scheduler_config": [1, 2]}, "scheduler_config", "must be an object"),
        ({"prior_scheduler": "DDIMScheduler"}, "prior_scheduler", "prev_timestep"),
        ({"output_type": "pt"}, "output_type", "valid values: pil, np, latent"),
        ({"latents": np.zeros((1, 4, 9, 9), np.float32)}, "latents", "this request needs (1, 4, 8, 8)"),
    ],
)
def test_bad_scheduler_and_output_options_are_refused(grpc_client, options, field, fragment):
    with pytest.raises(InvalidRequest) as error:
        grpc_client.text_to_image("x", height=64, width=64, **STEPS, **options)
    assert error.value.field == field
    assert fragment in str(error.value)


def test_latents_and_output_types_follow_diffusers(grpc_client, server_loop_clients):
    """`latents` replaces the seeded start (no draw); "np" is the float image, "latent" the latents."""
    dims = grpc_client.info.dims
    start = np.random.default_rng(0).standard_normal((1, dims.latent_channels, 8, 8), dtype=np.float32)
    common = {"height": 64, "width": 64, **STEPS, "seed": 1}
    pil = grpc_client.text_to_image("x", latents=start, **common)
    as_np = grpc_client.text_to_image("x", latents=start, output_type="np", **common)
    latent = grpc_client.text_to_image("x", latents=start, output_type="latent", **common)
    assert as_np.images.shape == (1, 64, 64, 3) and as_np.images.dtype == np.float32
    assert latent.images.shape == start.shape
    assert np.abs(np.round(as_np.images[0] * 255) - np.asarray(pil.images[0], np.float32)).max() <= 1
    other = grpc_client.text_to_image("x", latents=start + 1, **common)
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(pil.images[0]))
    for server in server_loop_clients.values():
        for output_type in ("np", "latent"):
            served = server.text_to_image("x", latents=start, output_type=output_type, **common)
            expected = as_np.images if output_type == "np" else latent.images
            np.testing.assert_allclose(served.images, expected, rtol=0, atol=1e-6)
