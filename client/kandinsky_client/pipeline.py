"""Kandinsky 2.2 generation over Triton: the prior and decoder loops, run on the client.

The loops follow the diffusers pipelines step for step (`KandinskyV22PriorPipeline`,
`KandinskyV22Pipeline`): same classifier-free guidance batch order ([uncond, cond]), same scheduler
calls, same random draws in the same order. Each network evaluation is one Triton request.

There is one denoising loop (`denoise`); the modes differ only in the initial latents, the timesteps,
how a step's model input is built and an optional blend after each step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import components as registry
from .components import ModelDims
from .noise import NoiseSource, SeededNoise
from .schedulers import scheduler_from_config
from .transport import TritonTransport
from .validation import TextToImageRequest

TEXT_TO_IMAGE_MODELS = ["encode_prompt", "prior", "prior_postprocess", "unet", "decode_image"]


@dataclass(frozen=True)
class ServerInfo:
    """What the served checkpoint is: sizes and scheduler configs, read from the model configs."""

    dims: ModelDims
    prior_scheduler: dict
    decoder_scheduler: dict
    max_image_size: int
    max_images_per_request: int

    @classmethod
    def read(cls, transport: TritonTransport) -> ServerInfo:
        unet = transport.model_parameters("unet")
        prior = transport.model_parameters("prior")
        return cls(
            dims=ModelDims.from_dict(unet["kandinsky_dims"]),
            prior_scheduler=prior["scheduler_config"],
            decoder_scheduler=unet["scheduler_config"],
            max_image_size=int(unet["max_image_size"]),
            max_images_per_request=int(unet["max_images_per_request"]),
        )


@dataclass
class Generation:
    images: list[Image.Image]
    image_embeds: np.ndarray
    negative_image_embeds: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, measured on the client


def apply_guidance(output: np.ndarray, guidance_scale: float, channels: int | None = None) -> np.ndarray:
    """uncond + g * (cond - uncond) on a [uncond, cond] batch, as the diffusers pipelines compute it.

    With `channels`, only the first `channels` channels are guided (the UNet's noise); the learned
    variance of the conditional half is appended after them, as diffusers does before `scheduler.step`.
    """
    guided = output if channels is None else output[:, :channels]
    uncond, cond = np.split(guided, 2)
    result = uncond + np.float32(guidance_scale) * (cond - uncond)
    if channels is not None:
        _, variance_cond = np.split(output[:, channels:], 2)
        result = np.concatenate([result, variance_cond], axis=1)
    return result.astype(np.float32, copy=False)


def denoise(
    latents: np.ndarray,
    timesteps: np.ndarray,
    scheduler: object,
    predict: Callable[[np.ndarray, int], np.ndarray],
    noise: NoiseSource,
    *,
    pass_prev_timestep: bool = False,
    after_step: Callable[[np.ndarray, int], np.ndarray] | None = None,
    on_step: Callable[[], None] | None = None,
) -> np.ndarray:
    """The one denoising loop: predict, scheduler step, optional blend, for every timestep.

    `pass_prev_timestep`: the UnCLIP scheduler is told the next timestep (None after the last), as
    KandinskyV22PriorPipeline does. `after_step(latents, i)` lets inpainting restore the known region.
    """
    for i, t in enumerate(timesteps):
        model_output = predict(latents, int(t))
        if pass_prev_timestep:
            prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else None
            latents = scheduler.step(model_output, int(t), latents, noise, prev_timestep=prev)
        else:
            latents = scheduler.step(model_output, int(t), latents, noise)
        if after_step is not None:
            latents = after_step(latents, i)
        if on_step is not None:
            on_step()
    return latents


def _timestep_batch(t: int, batch: int) -> np.ndarray:
    return np.full((batch,), t, dtype=np.int64)


class KandinskyClient:
    """Generates images with a Kandinsky 2.2 model served by Triton (see the README for the server)."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout_s: float = 600.0) -> None:
        self.transport = TritonTransport(url, protocol, timeout_s)
        self.transport.check_live()
        self._info: ServerInfo | None = None

    @property
    def info(self) -> ServerInfo:
        if self._info is None:
            self.transport.require_ready(["prior", "unet"])
            self._info = ServerInfo.read(self.transport)
        return self._info

    # -- building blocks -------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenizer + text encoder on the server: text_embeds, last_hidden_state, attention_mask."""
        raw = np.array([p.encode("utf-8") for p in prompts], dtype=np.object_).reshape(-1, 1)
        return self.transport.infer(registry.ENCODE_PROMPT, {"prompt": raw})

    def run_prior(
        self,
        prompts: Sequence[str],
        uncond_prompts: Sequence[str],
        *,
        num_images_per_prompt: int,
        num_inference_steps: int,
        guidance_scale: float,
        noise: NoiseSource,
        on_step: Callable[[], None] | None = None,
        timings: dict[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """KandinskyV22PriorPipeline's loop for `prompts`; returns image_embeds and zero_image_embeds."""
        timings = timings if timings is not None else {}
        do_cfg = guidance_scale > 1.0
        start = time.perf_counter()
        encoded = self.encode_prompts(list(uncond_prompts) + list(prompts) if do_cfg else list(prompts))
        conditioning = {
            "proj_embedding": encoded["text_embeds"],
            "encoder_hidden_states": encoded["last_hidden_state"],
            "attention_mask": encoded["attention_mask"],
        }
        conditioning = {k: np.repeat(v, num_images_per_prompt, axis=0) for k, v in conditioning.items()}
        timings["encode_prompt"] = timings.get("encode_prompt", 0.0) + time.perf_counter() - start

        start = time.perf_counter()
        scheduler = scheduler_from_config(self.info.prior_scheduler)
        scheduler.set_timesteps(num_inference_steps)
        batch = len(prompts) * num_images_per_prompt
        latents = noise.randn((batch, self.info.dims.embed_dim)) * np.float32(scheduler.init_noise_sigma)

        def predict(sample: np.ndarray, t: int) -> np.ndarray:
            model_input = np.concatenate([sample, sample]) if do_cfg else sample
            out = self.transport.infer(
                registry.PRIOR,
                {
                    "hidden_states": model_input,
                    "timestep": _timestep_batch(t, len(model_input)),
                    **conditioning,
                },
            )["predicted_image_embedding"]
            return apply_guidance(out, guidance_scale) if do_cfg else out

        latents = denoise(
            latents, scheduler.timesteps, scheduler, predict, noise, pass_prev_timestep=True, on_step=on_step
        )
        result = self.transport.infer(registry.PRIOR_POSTPROCESS, {"latents": latents})
        timings["prior"] = timings.get("prior", 0.0) + time.perf_counter() - start
        return result

    def prior_embeddings(
        self, request: TextToImageRequest, noise: NoiseSource, on_step=None, timings=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative image embeddings with diffusers' negative-prompt semantics.

        Without a negative prompt the negative embedding is the zero-image embedding. With one, the
        prior also runs on the negative prompts (guided by themselves) and that result is the negative.
        """
        prompts = list(request.prompt)
        if request.negative_prompt is None:
            uncond = [""] * len(prompts)
        else:
            prompts = prompts + list(request.negative_prompt)
            uncond = list(request.negative_prompt) * 2
        out = self.run_prior(
            prompts,
            uncond,
            num_images_per_prompt=request.num_images_per_prompt,
            num_inference_steps=request.prior_steps,
            guidance_scale=request.prior_guidance_scale,
            noise=noise,
            on_step=on_step,
            timings=timings,
        )
        if request.negative_prompt is None:
            return out["image_embeds"], out["zero_image_embeds"]
        image_embeds, negative = np.split(out["image_embeds"], 2)
        return image_embeds, negative

    def run_decoder(
        self,
        image_embeds: np.ndarray,
        negative_image_embeds: np.ndarray,
        *,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        noise: NoiseSource,
        on_step: Callable[[], None] | None = None,
        timings: dict[str, float] | None = None,
    ) -> np.ndarray:
        """KandinskyV22Pipeline's loop from pure noise; returns the final latents."""
        timings = timings if timings is not None else {}
        start = time.perf_counter()
        dims = self.info.dims
        scheduler = scheduler_from_config(self.info.decoder_scheduler)
        scheduler.set_timesteps(num_inference_steps)
        shape = (len(image_embeds), dims.latent_channels, *self.latent_size(height, width))
        latents = noise.randn(shape) * np.float32(scheduler.init_noise_sigma)
        predict = self._unet_predictor(registry.UNET, image_embeds, negative_image_embeds, guidance_scale)
        latents = denoise(latents, scheduler.timesteps, scheduler, predict, noise, on_step=on_step)
        timings["decoder"] = timings.get("decoder", 0.0) + time.perf_counter() - start
        return latents

    def _unet_predictor(
        self,
        spec: registry.ComponentSpec,
        image_embeds: np.ndarray,
        negative_image_embeds: np.ndarray,
        guidance_scale: float,
        extra_channels: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Callable[[np.ndarray, int], np.ndarray]:
        """One guided UNet evaluation per call; `extra_channels` appends inpainting's mask channels."""
        do_cfg = guidance_scale > 1.0
        embeds = np.concatenate([negative_image_embeds, image_embeds]) if do_cfg else image_embeds
        channels = self.info.dims.latent_channels
        learned_variance = self.info.decoder_scheduler.get("variance_type") in ("learned", "learned_range")

        def predict(sample: np.ndarray, t: int) -> np.ndarray:
            model_input = np.concatenate([sample, sample]) if do_cfg else sample
            if extra_channels is not None:
                model_input = extra_channels(model_input)
            out = self.transport.infer(
                spec,
                {
                    "sample": model_input,
                    "timestep": _timestep_batch(t, len(model_input)),
                    "image_embeds": embeds,
                },
            )["noise_pred"]
            if do_cfg:
                out = apply_guidance(out, guidance_scale, channels)
            return out if learned_variance else out[:, :channels]

        return predict

    def decode_latents(
        self, latents: np.ndarray, timings: dict[str, float] | None = None
    ) -> list[Image.Image]:
        start = time.perf_counter()
        rgb = self.transport.infer(registry.DECODE_IMAGE, {"latents": latents})["image_rgb"]
        if timings is not None:
            timings["decode_image"] = timings.get("decode_image", 0.0) + time.perf_counter() - start
        return [Image.fromarray(image) for image in rgb]

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """diffusers' downscale_height_and_width: ceil(side / scale**2) * scale."""
        scale = self.info.dims.movq_scale_factor
        return (-(-height // scale**2) * scale, -(-width // scale**2) * scale)

    # -- modes -----------------------------------------------------------------------------------

    def text_to_image(
        self,
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
        on_step: Callable[[], None] | None = None,
    ) -> Generation:
        """Prompt(s) -> images, as KandinskyV22PriorPipeline followed by KandinskyV22Pipeline.

        `noise` overrides `seed` (parity tests replay the reference's draws through it).
        """
        request = TextToImageRequest.build(
            self.info,
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            height=height,
            width=width,
            prior_steps=prior_steps,
            prior_guidance_scale=prior_guidance_scale,
            decoder_steps=decoder_steps,
            decoder_guidance_scale=decoder_guidance_scale,
            seed=seed,
        )
        self.transport.require_ready(TEXT_TO_IMAGE_MODELS)
        noise = noise or SeededNoise(request.seed)
        timings: dict[str, float] = {}
        total = time.perf_counter()
        image_embeds, negative = self.prior_embeddings(request, noise, on_step, timings)
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
        )
        images = self.decode_latents(latents, timings)
        timings["total"] = time.perf_counter() - total
        return Generation(images, image_embeds, negative, timings)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> KandinskyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
