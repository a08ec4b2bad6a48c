"""Every generation mode of Kandinsky 2.2, each matching its diffusers counterpart.

| mode             | diffusers                                                                   |
|------------------|-----------------------------------------------------------------------------|
| `text_to_image`  | KandinskyV22PriorPipeline + KandinskyV22Pipeline                            |
| `variations`     | the image's CLIP embedding (as `interpolate` encodes images) + KandinskyV22Pipeline |
| `fuse`           | KandinskyV22PriorPipeline.interpolate + KandinskyV22Pipeline                |
| `image_to_image` | KandinskyV22PriorPipeline + KandinskyV22Img2ImgPipeline                     |
| `emb2emb`        | KandinskyV22PriorEmb2EmbPipeline + KandinskyV22Pipeline                     |
| `inpaint`        | KandinskyV22PriorPipeline + KandinskyV22InpaintPipeline                     |
| `outpaint`       | `inpaint` on a larger canvas whose new area is the mask                     |

A mode validates its arguments (`InvalidRequest` naming the field), reads its images (`images.py`) and
composes the building blocks of `KandinskyClient` (`pipeline.py`), into which `GenerationModes` is
mixed. Random draws happen in diffusers' order, so a replayed noise source reproduces diffusers' result.
`noise` overrides `seed` (parity tests replay diffusers' draws through it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from . import validation
from .errors import InvalidRequest
from .images import (
    latent_keep_mask,
    load_image,
    load_mask,
    outpaint_canvas,
    repaint_mask,
    resize_for_movq,
    rgb_array,
)
from .noise import NoiseSource, SeededNoise
from .validation import DecoderRequest, TextToImageRequest

if TYPE_CHECKING:
    from .pipeline import KandinskyClient

ImageInput = Image.Image | np.ndarray | Path | str | bytes  # see images.py; a str is a file path
OnStep = Callable[[], None] | None

_PRIOR_MODELS = ["encode_prompt", "prior", "prior_postprocess"]
_DECODER_MODELS = ["unet", "decode_image"]
TEXT_TO_IMAGE_MODELS = _PRIOR_MODELS + _DECODER_MODELS
MODE_MODELS = {
    "text_to_image": TEXT_TO_IMAGE_MODELS,
    "variations": ["encode_image", "prior_postprocess", *_DECODER_MODELS],
    "fuse": ["encode_image", *TEXT_TO_IMAGE_MODELS],
    "image_to_image": ["encode_latents", *TEXT_TO_IMAGE_MODELS],
    "emb2emb": ["encode_image", *TEXT_TO_IMAGE_MODELS],
    "inpaint": ["encode_latents", *_PRIOR_MODELS, "unet_inpaint", "decode_image"],
}


@dataclass
class Generation:
    images: list[Image.Image]
    image_embeds: np.ndarray
    negative_image_embeds: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, measured on the client


class GenerationModes:
    """The user-facing modes of `KandinskyClient`; they call its building blocks through `self`."""

    # -- shared steps ----------------------------------------------------------------------------

    def _start(self: KandinskyClient, mode: str, seed: int | None, noise: NoiseSource | None) -> NoiseSource:
        self.transport.require_ready(MODE_MODELS[mode])
        return noise or SeededNoise(seed)

    def _prior(
        self: KandinskyClient,
        request: TextToImageRequest,
        noise: NoiseSource,
        on_step: OnStep,
        timings: dict[str, float],
        **emb2emb: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.prior_embeddings(
            request.prompt,
            request.negative_prompt,
            num_images_per_prompt=request.num_images_per_prompt,
            num_inference_steps=request.prior_steps,
            guidance_scale=request.prior_guidance_scale,
            noise=noise,
            on_step=on_step,
            timings=timings,
            **emb2emb,
        )

    def _decode(
        self: KandinskyClient,
        request: TextToImageRequest | DecoderRequest,
        image_embeds: np.ndarray,
        negative: np.ndarray,
        noise: NoiseSource,
        on_step: OnStep,
        timings: dict[str, float],
        started: float,
        **variant: Any,
    ) -> Generation:
        """The decoder loop (`variant` picks img2img or inpainting), MoVQ decode, the result."""
        latents = self.run_decoder(
            image_embeds,
            negative,
            height=request.height,
            width=request.width,
            num_inference_steps=request.decoder_steps,
            guidance_scale=request.decoder_guidance_scale,
            noise=noise,
            on_step=on_step,
            timings=timings,
            **variant,
        )
        images = self.decode_latents(latents, timings)
        timings["total"] = time.perf_counter() - started
        return Generation(images, image_embeds, negative, timings)

    # -- modes -----------------------------------------------------------------------------------

    def text_to_image(
        self: KandinskyClient,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        decoder_steps: int = 50,
        decoder_guidance_scale: float = 4.0,
        seed: int | None = None,
        noise: NoiseSource | None = None,
        on_step: OnStep = None,
    ) -> Generation:
        """Prompt(s) -> images, as KandinskyV22PriorPipeline followed by KandinskyV22Pipeline."""
        request = TextToImageRequest.build(self.info, **_arguments(locals()))
        noise = self._start("text_to_image", request.seed, noise)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        image_embeds, negative = self._prior(request, noise, on_step, timings)
        return self._decode(request, image_embeds, negative, noise, on_step, timings, started)

    def variations(
        self: KandinskyClient,
        image: ImageInput,
        *,
        num_images: int = 1,
        height: int = 512,
        width: int = 512,
        decoder_steps: int = 50,
        decoder_guidance_scale: float = 4.0,
        seed: int | None = None,
        noise: NoiseSource | None = None,
        on_step: OnStep = None,
    ) -> Generation:
        """Images like `image`: its CLIP embedding decoded, the zero-image embedding as the negative."""
        picture = load_image(image, "image")
        count = validation.images_per_request("num_images", num_images, self.info)
        request = DecoderRequest.build(self.info, **_arguments(locals()))
        noise = self._start("variations", request.seed, noise)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        image_embeds = np.repeat(self.encode_image(rgb_array(picture), timings), count, axis=0)
        negative = self.zero_image_embeds(count)
        return self._decode(request, image_embeds, negative, noise, on_step, timings, started)

    def interpolate(
        self: KandinskyClient,
        images_and_prompts: Sequence[str | ImageInput],
        weights: Sequence[float],
        *,
        num_images_per_prompt: int = 1,
        prior_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        negative_prior_prompt: str | None = None,
        negative_prompt: str = "",
        noise: NoiseSource,
        on_step: OnStep = None,
        timings: dict[str, float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """KandinskyV22PriorPipeline.interpolate: the weighted sum of the items' image embeddings.

        A prompt (str) runs the prior (with `negative_prior_prompt` as its negative); an image (PIL
        image, array, bytes or a `Path`) is CLIP-encoded. The negative embedding is the zero-image
        embedding when `negative_prompt` is "" (the prior output of `negative_prior_prompt` when that is
        given), else the prior output of `negative_prompt`. Returns (image_embeds, negative_image_embeds).
        """
        items, weights = validation.fusion_inputs(images_and_prompts, weights)
        per_prompt = validation.images_per_request("num_images_per_prompt", num_images_per_prompt, self.info)
        steps = validation.steps(
            "prior_steps", prior_steps, self.info.prior_scheduler, validation.MIN_PRIOR_STEPS
        )
        guidance = validation.number("prior_guidance_scale", prior_guidance_scale)
        if negative_prior_prompt is not None and not isinstance(negative_prior_prompt, str):
            raise InvalidRequest(
                "negative_prior_prompt", f"must be a string or None, got {negative_prior_prompt!r}"
            )
        if not isinstance(negative_prompt, str):
            raise InvalidRequest(
                "negative_prompt",
                f'must be a string ("" for the zero-image embedding), got {negative_prompt!r}',
            )
        pictures = {
            i: load_image(item, f"images_and_prompts[{i}]")
            for i, item in enumerate(items)
            if not isinstance(item, str)
        }
        timings = timings if timings is not None else {}
        negative_prior = None if negative_prior_prompt is None else [negative_prior_prompt]

        def prior(prompt: str) -> tuple[np.ndarray, np.ndarray]:
            return self.prior_embeddings(
                [prompt],
                negative_prior,
                num_images_per_prompt=per_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                noise=noise,
                on_step=on_step,
                timings=timings,
            )

        weighted = []
        for i, (item, weight) in enumerate(zip(items, weights, strict=True)):
            if i in pictures:
                embeds = np.repeat(self.encode_image(rgb_array(pictures[i]), timings), per_prompt, axis=0)
            else:
                embeds = prior(item)[0]
            weighted.append(embeds * np.float32(weight))
        image_embeds = np.sum(np.stack(weighted), axis=0, dtype=np.float32)

        # diffusers always runs the prior once more on `negative_prompt`, and keeps what it needs of it.
        if negative_prompt == "" and negative_prior_prompt is None:
            self.skip_prior(per_prompt, steps, noise)  # it would return the zero-image embedding
            negative = self.zero_image_embeds(per_prompt)
        elif negative_prompt == "":
            negative = prior("")[1]
        else:
            negative = prior(negative_prompt)[0]
        return image_embeds, negative

    def fuse(
        self: KandinskyClient,
        images_and_prompts: Sequence[str | ImageInput],
        weights: Sequence[float],
        *,
        negative_prior_prompt: str | None = None,
        negative_prompt: str = "",
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        decoder_steps: int = 50,
        decoder_guidance_scale: float = 4.0,
        seed: int | None = None,
        noise: NoiseSource | None = None,
        on_step: OnStep = None,
    ) -> Generation:
        """Image fusion: `interpolate` a weighted mix of prompts and images, then decode it."""
        request = DecoderRequest.build(self.info, **_arguments(locals()))
        validation.fusion_inputs(images_and_prompts, weights)  # before any request is sent
        noise = self._start("fuse", request.seed, noise)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        image_embeds, negative = self.interpolate(
            images_and_prompts,
            weights,
            num_images_per_prompt=num_images_per_prompt,
            prior_steps=prior_steps,
            prior_guidance_scale=prior_guidance_scale,
            negative_prior_prompt=negative_prior_prompt,
            negative_prompt=negative_prompt,
            noise=noise,
            on_step=on_step,
            timings=timings,
        )
        return self._decode(request, image_embeds, negative, noise, on_step, timings, started)

    def image_to_image(
        self: KandinskyClient,
        image: ImageInput,
        prompt: str | Sequence[str],
        *,
        strength: float = 0.3,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        prior_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        decoder_steps: int = 50,
        decoder_guidance_scale: float = 4.0,
        seed: int | None = None,
        noise: NoiseSource | None = None,
        on_step: OnStep = None,
    ) -> Generation:
        """Redraw `image` towards the prompt: the decoder starts from the image's latents, noised.

        `strength` in (0, 1] is the part of the decoder schedule that runs (1: the image is only a
        start). Output size: `height`/`width`, by default the image's (which must then be valid); the
        image is resized to it first. (diffusers 0.42.1 passes (width, height) in swapped order to its
        image processor, so for a non-square size it resizes to the transposed shape; here the output has
        the requested height and width.)
        """
        picture = load_image(image, "image")
        height, width = validation.output_size(self.info, height, width, picture.size)
        request = TextToImageRequest.build(self.info, **_arguments(locals()))
        strength = validation.strength("strength", strength, request.decoder_steps)
        noise = self._start("image_to_image", request.seed, noise)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        image_embeds, negative = self._prior(request, noise, on_step, timings)
        image_latents = self.encode_latents(resize_for_movq(picture, height, width), timings)
        return self._decode(
            request,
            image_embeds,
            negative,
            noise,
            on_step,
            timings,
            started,
            image_latents=image_latents,
            strength=strength,
        )

    def emb2emb(
        self: KandinskyClient,
        image: ImageInput,
        prompt: str | Sequence[str],
        *,
        strength: float = 0.3,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        decoder_steps: int = 50,
        decoder_guidance_scale: float = 4.0,
        seed: int | None = None,
        noise: NoiseSource | None = None,
        on_step: OnStep = None,
    ) -> Generation:
        """Image-to-image on the prior side: the prior starts from the image's CLIP embedding.

        `strength` in (0, 1] is the part of the prior schedule that runs; the decoder then runs from
        noise, as text-to-image does.
        """
        picture = load_image(image, "image")
        request = TextToImageRequest.build(self.info, **_arguments(locals()))
        strength = validation.strength("strength", strength, request.prior_steps)
        noise = self._start("emb2emb", request.seed, noise)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        start = np.repeat(
            self.encode_image(rgb_array(picture), timings), request.num_images_per_prompt, axis=0
        )
        image_embeds, negative = self._prior(
            request, noise, on_step, timings, image_embeds=start, strength=strength
        )
        return self._decode(request, image_embeds, negative, noise, on_step, timings, started)

    def inpaint(
        self: KandinskyClient,
        image: ImageInput,
        mask_image: ImageInput,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        prior_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        decoder_steps: int = 50,
        decoder_guidance_scale: float = 4.0,
        seed: int | None = None,
        noise: NoiseSource | None = None,
        on_step: OnStep = None,
    ) -> Generation:
        """Repaint the white part of `mask_image` (same size as `image`) following the prompt.

        Output size: `height`/`width`, by default the image's; image and mask are resized to it.
        """
        picture = load_image(image, "image")
        mask = load_mask(mask_image, picture.size, "mask_image")
        return self._inpaint(picture, mask, _arguments(locals()), noise, on_step)

    def outpaint(
        self: KandinskyClient,
        image: ImageInput,
        prompt: str | Sequence[str],
        *,
        left: int = 0,
        top: int = 0,
        right: int = 0,
        bottom: int = 0,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        prior_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        decoder_steps: int = 50,
        decoder_guidance_scale: float = 4.0,
        seed: int | None = None,
        noise: NoiseSource | None = None,
        on_step: OnStep = None,
    ) -> Generation:
        """Extend `image` by the given pixels on each side and paint the new area following the prompt.

        The canvas (image + margins) must fit the server's maximum image size; the output has the
        canvas size unless `height`/`width` say otherwise. The new area starts as the edge pixels
        repeated (see `images.outpaint_canvas`) and is masked for repainting.
        """
        picture = load_image(image, "image")
        margins = validation.outpaint_margins(self.info, picture.size, left, top, right, bottom)
        canvas, mask = outpaint_canvas(picture, *margins)
        return self._inpaint(canvas, mask, _arguments(locals()), noise, on_step)

    def _inpaint(
        self: KandinskyClient,
        picture: Image.Image,
        mask: Image.Image,
        arguments: dict[str, Any],
        noise: NoiseSource | None,
        on_step: OnStep,
    ) -> Generation:
        height, width = validation.output_size(
            self.info, arguments["height"], arguments["width"], picture.size
        )
        request = TextToImageRequest.build(self.info, **{**arguments, "height": height, "width": width})
        noise = self._start("inpaint", request.seed, noise)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        image_embeds, negative = self._prior(request, noise, on_step, timings)
        image_latents = self.encode_latents(resize_for_movq(picture, height, width), timings)
        keep = latent_keep_mask(repaint_mask(mask, height, width), image_latents.shape[-2:])
        return self._decode(
            request,
            image_embeds,
            negative,
            noise,
            on_step,
            timings,
            started,
            image_latents=image_latents,
            keep_mask=keep,
        )


def _arguments(local_variables: dict[str, Any]) -> dict[str, Any]:
    """A mode's own arguments, for the request builders (which pick the fields they validate)."""
    return {k: v for k, v in local_variables.items() if k not in ("self", "noise", "on_step")}
