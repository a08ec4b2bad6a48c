"""The ControlNet-depth decoder (`kandinsky-community/kandinsky-2-2-controlnet-depth`): its preset part and
the checks its UNet must pass before it is exported.

The released repo is a decoder folder (unet, movq, scheduler) whose UNet has
`addition_embed_type="image_hint"`: diffusers' `ImageHintTimeEmbedding` turns a pixel-space hint
[batch, 3, H, W] into HINT_LATENT_CHANNELS channels at 1/HINT_DOWNSCALE of its size and concatenates them
to the latents, so that UNet takes `in_channels = latent channels + HINT_LATENT_CHANNELS`.
"""

from __future__ import annotations

import gc
import logging
import math
from pathlib import Path
from typing import Any

import torch
from kandinsky_core.components import ModelDims

from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)

CONTROLNET_PART = "controlnet"  # the checkpoint part (and the preset's folder) holding it
CONTROLNET_PIPELINE = "KandinskyV22ControlnetPipeline"
# diffusers' ImageHintTimeEmbedding: three stride-2 convolutions ending in 4 channels (fixed in the class).
HINT_DOWNSCALE = 8
HINT_LATENT_CHANNELS = 4
# Seeds the preset's ControlNet UNet apart from the other parts (so adding it changes none of them).
_SEED_OFFSET = 1009


def controlnet_unet_config(unet: dict[str, Any]) -> dict[str, Any]:
    """The preset's decoder UNet config as the released ControlNet-depth UNet differs from it."""
    return {
        **unet,
        "addition_embed_type": "image_hint",
        "in_channels": unet["in_channels"] + HINT_LATENT_CHANNELS,
    }


def write_controlnet_part(
    unet: dict[str, Any], root: Path, decoder_dir: Path, seed: int, modules: dict[str, list[str]]
) -> Path:
    """Write `<root>/controlnet`: a random-weight hint UNet at the preset's sizes, and the decoder's MoVQ
    and scheduler (the released repo ships its own copies of both). Returns the folder."""
    import json

    import diffusers
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    from .random_weights import randomize_untrained_parameters

    folder = Path(root) / CONTROLNET_PART
    generator = torch.Generator().manual_seed(seed + _SEED_OFFSET)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    logger.info("writing %s", folder / "unet")
    model = UNet2DConditionModel(**controlnet_unet_config(unet))
    randomize_untrained_parameters(model, generator)
    carry_the_hint(model, generator)
    model.save_pretrained(folder / "unet")
    del model
    gc.collect()
    VQModel.from_pretrained(decoder_dir / "movq").save_pretrained(folder / "movq")
    DDPMScheduler.from_pretrained(decoder_dir / "scheduler").save_pretrained(folder / "scheduler")
    index = {"_class_name": CONTROLNET_PIPELINE, "_diffusers_version": diffusers.__version__, **modules}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def carry_the_hint(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Variance-preserving (He) weights for the hint embedding's convolutions.

    With PyTorch's default initialisation each of its eight convolutions shrinks the signal, and a random
    hint changed the tiny UNet's output by 6e-5 of its scale: any hint (or none) would pass a parity
    test. Trained weights do carry the hint; with these it moves the output by ~20% of its scale.
    """
    with torch.no_grad():
        for layer in model.add_embedding.input_hint_block:
            if isinstance(layer, torch.nn.Conv2d):
                fan_in = layer.weight[0].numel()
                layer.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)


class ControlnetMovqMismatch(RuntimeError):
    """The ControlNet repo's MoVQ differs from the decoder's, the one the bundle serves."""


def check_controlnet_movq(checkpoint: Checkpoint) -> None:
    """Refuse a ControlNet whose own MoVQ is not the decoder's.

    diffusers' ControlNet pipelines encode and decode with the ControlNet repo's MoVQ; the served modes use
    the bundle's one MoVQ (the decoder's), which gives the same pixels only if the two are the same model
    (compared as inpaint_movq.py compares the inpainting repo's: config and float32 tensors).
    """
    from .inpaint_movq import MOVQ_SOURCE_PART, MOVQ_SUBFOLDER, movq_digest

    own = movq_digest(checkpoint, CONTROLNET_PART)
    if own is None:
        return
    exported = movq_digest(checkpoint, MOVQ_SOURCE_PART)
    if own != exported:
        raise ControlnetMovqMismatch(
            f"{checkpoint.part(CONTROLNET_PART)}/{MOVQ_SUBFOLDER} differs from "
            f"{checkpoint.part(MOVQ_SOURCE_PART)}/{MOVQ_SUBFOLDER} (sha256 of config and tensors {own[:12]} "
            f"vs {exported[:12]}); the ControlNet modes would decode with the decoder's MoVQ, unlike "
            "diffusers' ControlNet pipelines. Export without the controlnet part"
        )


def check_controlnet_unet(config: dict[str, Any], dims: ModelDims) -> None:
    """Refuse a ControlNet UNet the served graph cannot take: the hint is fed at the image size, so the
    hint embedding's downscale must be the MoVQ's, and its channels must complete the UNet's input."""
    if config.get("addition_embed_type") != "image_hint":
        raise ValueError(
            f"the controlnet UNet has addition_embed_type {config.get('addition_embed_type')!r}; "
            "a Kandinsky 2.2 ControlNet UNet has 'image_hint'"
        )
    if dims.movq_scale_factor != HINT_DOWNSCALE:
        raise ValueError(
            f"the MoVQ scales by {dims.movq_scale_factor}, the ControlNet hint embedding by {HINT_DOWNSCALE}: "
            "the hint (image-sized) would not match the latents"
        )
    expected = dims.latent_channels + HINT_LATENT_CHANNELS
    if config["in_channels"] != expected:
        raise ValueError(
            f"the controlnet UNet has in_channels {config['in_channels']}; expected {expected} "
            f"(latent channels {dims.latent_channels} + {HINT_LATENT_CHANNELS} hint channels)"
        )
