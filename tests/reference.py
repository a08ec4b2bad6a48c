"""The diffusers pipelines as the oracle, with every random draw recorded for replay by the client."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# Every module that draws noise in the Kandinsky 2.2 pipelines binds `randn_tensor` at import.
_RANDN_MODULES = [
    "diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_prior",
    "diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2",
    "diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_img2img",
    "diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting",
    "diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_prior_emb2emb",
    "diffusers.schedulers.scheduling_unclip",
    "diffusers.schedulers.scheduling_ddpm",
]


@contextlib.contextmanager
def recorded_noise() -> Iterator[list[np.ndarray]]:
    """Record, in order, every tensor the pipelines draw with `randn_tensor`."""
    draws: list[np.ndarray] = []
    patched = []
    for name in _RANDN_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "randn_tensor"):
            continue
        original = module.randn_tensor

        def recording(*args, _original=original, **kwargs):
            tensor = _original(*args, **kwargs)
            draws.append(tensor.detach().cpu().float().numpy().copy())
            return tensor

        module.randn_tensor = recording
        patched.append((module, original))
    try:
        yield draws
    finally:
        for module, original in patched:
            module.randn_tensor = original


def load_pipelines(root: Path):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    prior = KandinskyV22PriorPipeline.from_pretrained(root / "prior").to(torch.float32)
    decoder = KandinskyV22Pipeline.from_pretrained(root / "decoder").to(torch.float32)
    prior.set_progress_bar_config(disable=True)
    decoder.set_progress_bar_config(disable=True)
    return prior, decoder


def text_to_image(
    prior,
    decoder,
    *,
    prompt,
    negative_prompt=None,
    height,
    width,
    prior_steps,
    decoder_steps,
    prior_guidance_scale=4.0,
    decoder_guidance_scale=4.0,
    num_images_per_prompt=1,
    seed=0,
):
    """Reference uint8 images and the noise drawn, for the prior + decoder pipelines."""
    generator = torch.Generator().manual_seed(seed)
    with recorded_noise() as draws, torch.inference_mode():
        embeds = prior(
            prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=prior_steps,
            guidance_scale=prior_guidance_scale,
            generator=generator,
        )
        images = decoder(
            image_embeds=embeds.image_embeds,
            negative_image_embeds=embeds.negative_image_embeds,
            height=height,
            width=width,
            num_inference_steps=decoder_steps,
            guidance_scale=decoder_guidance_scale,
            generator=generator,
            output_type="np",
        ).images
    uint8 = (images * 255).round().astype(np.uint8)
    return uint8, embeds.image_embeds.numpy(), embeds.negative_image_embeds.numpy(), list(draws)
