"""Kandinsky 2.2 generation over Triton: the prior and decoder loops, run on the client.

The loops follow the diffusers pipelines step for step (`KandinskyV22PriorPipeline` and its Emb2Emb
variant, `KandinskyV22Pipeline` and its Img2Img and Inpaint variants): same classifier-free guidance
batch order ([uncond, cond]), same scheduler calls, same random draws in the same order. Each network
evaluation is one Triton request.

There is one denoising loop (`denoise`); the modes differ only in the initial latents, the timesteps,
how a step's model input is built and an optional blend after each step. This module holds the building
blocks (`run_prior`, `run_decoder`, the encoders); the user-facing modes live in `modes.py` and are
methods of `KandinskyClient` through the `GenerationModes` mixin.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import components as registry
from .components import ModelDims
from .errors import ModelNotReady
from .modes import TEXT_TO_IMAGE_MODELS, Generation, GenerationModes
from .noise import NoiseSource
from .schedulers import scheduler_from_config
from .transport import TritonTransport

__all__ = [
    "TEXT_TO_IMAGE_MODELS",
    "Generation",
    "KandinskyClient",
    "ServerInfo",
    "apply_guidance",
    "denoise",
    "strength_timesteps",
]


@dataclass(frozen=True)
class ServerInfo:
    """What the served checkpoint is: sizes and scheduler configs, read from the model configs."""

    dims: ModelDims
    prior_scheduler: dict
    decoder_scheduler: dict
    max_image_size: int
    max_images_per_request: int
    inpaint_scheduler: dict | None = None  # None when the repository has no inpainting UNet
    min_image_size: int = 0  # 0: the checkpoint's size multiple; TensorRT engines accept their profile only
    static_size: tuple[int, int] | None = None  # (height, width) of static-shape engines

    @classmethod
    def read(cls, transport: TritonTransport) -> ServerInfo:
        unet = transport.model_parameters("unet")
        prior = transport.model_parameters("prior")
        try:
            inpaint = transport.model_parameters("unet_inpaint").get("scheduler_config")
        except ModelNotReady:
            inpaint = None
        dims = ModelDims.from_dict(unet["kandinsky_dims"])
        smallest, largest, static = dims.size_multiple, int(unet["max_image_size"]), None
        profile = unet.get("tensorrt_profile")  # written by the tensorrt flavour: the engines' sizes
        if isinstance(profile, dict):
            if profile.get("static_size"):
                static = (int(profile["static_size"][0]), int(profile["static_size"][1]))
            else:
                smallest = max(smallest, int(profile["min_size"]))
                largest = min(largest, int(profile["max_size"]))
        return cls(
            dims=dims,
            prior_scheduler=prior["scheduler_config"],
            decoder_scheduler=unet["scheduler_config"],
            max_image_size=largest,
            max_images_per_request=int(unet["max_images_per_request"]),
            inpaint_scheduler=inpaint,
            min_image_size=smallest,
            static_size=static,
        )


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


def strength_steps(num_inference_steps: int, strength: float) -> int:
    """How many steps a partial denoise runs: diffusers' get_timesteps, min(int(n * strength), n)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def strength_timesteps(timesteps: np.ndarray, num_inference_steps: int, strength: float) -> np.ndarray:
    """The last `strength_steps` timesteps: image-to-image starts part way down the noise schedule."""
    t_start = max(num_inference_steps - strength_steps(num_inference_steps, strength), 0)
    return timesteps[t_start:]


def _timestep_batch(t: int, batch: int) -> np.ndarray:
    return np.full((batch,), t, dtype=np.int64)


def _add_time(timings: dict[str, float] | None, stage: str, start: float) -> None:
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


class KandinskyClient(GenerationModes):
    """Generates images with a Kandinsky 2.2 model served by Triton (see the README for the server).

    The generation modes (`text_to_image`, `variations`, `fuse`, `image_to_image`, `emb2emb`,
    `inpaint`, `outpaint`) come from `GenerationModes`; the methods here are their building blocks.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout_s: float = 600.0) -> None:
        self.transport = TritonTransport(url, protocol, timeout_s)
        self.transport.check_live()
        self._info: ServerInfo | None = None
        self._zero_image_embeds: np.ndarray | None = None

    @property
    def info(self) -> ServerInfo:
        if self._info is None:
            self.transport.require_ready(["prior", "unet"])
            self._info = ServerInfo.read(self.transport)
        return self._info

    # -- encoders --------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenizer + text encoder on the server: text_embeds, last_hidden_state, attention_mask."""
        raw = np.array([p.encode("utf-8") for p in prompts], dtype=np.object_).reshape(-1, 1)
        return self.transport.infer(registry.ENCODE_PROMPT, {"prompt": raw})

    def encode_image(self, image_rgb: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        """uint8 [batch, H, W, 3] -> CLIP image embeddings [batch, embed_dim] (pre-processed on the server)."""
        start = time.perf_counter()
        embeds = self.transport.infer(registry.ENCODE_IMAGE, {"image_rgb": image_rgb})["image_embeds"]
        _add_time(timings, "encode_image", start)
        return embeds

    def encode_latents(self, image_rgb: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        """uint8 [batch, H, W, 3] at the generation size -> MoVQ latents (no quantisation, no scaling)."""
        start = time.perf_counter()
        latents = self.transport.infer(registry.ENCODE_LATENTS, {"image_rgb": image_rgb})["latents"]
        _add_time(timings, "encode_latents", start)
        return latents

    def zero_image_embeds(self, batch: int) -> np.ndarray:
        """The negative image embedding diffusers uses without a negative prompt (a checkpoint constant).

        `prior_postprocess` ships it; it is asked once, with a dummy latent, and cached.
        """
        if self._zero_image_embeds is None:
            dummy = np.zeros((1, self.info.dims.embed_dim), np.float32)
            out = self.transport.infer(registry.PRIOR_POSTPROCESS, {"latents": dummy})
            self._zero_image_embeds = out["zero_image_embeds"]
        return np.repeat(self._zero_image_embeds, batch, axis=0)

    # -- prior -----------------------------------------------------------------------------------

    def run_prior(
        self,
        prompts: Sequence[str],
        uncond_prompts: Sequence[str],
        *,
        num_images_per_prompt: int,
        num_inference_steps: int,
        guidance_scale: float,
        noise: NoiseSource,
        image_embeds: np.ndarray | None = None,
        strength: float = 1.0,
        on_step: Callable[[], None] | None = None,
        timings: dict[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """KandinskyV22PriorPipeline's loop for `prompts`; returns image_embeds and zero_image_embeds.

        With `image_embeds` (KandinskyV22PriorEmb2EmbPipeline) the loop starts from that embedding, tiled
        over the batch and noised at the first of the timesteps `strength` keeps, instead of from noise.
        Like diffusers, the raw CLIP embedding is noised as it is (not normalised with clip_mean/std).
        """
        do_cfg = guidance_scale > 1.0
        start = time.perf_counter()
        encoded = self.encode_prompts(list(uncond_prompts) + list(prompts) if do_cfg else list(prompts))
        conditioning = {
            "proj_embedding": encoded["text_embeds"],
            "encoder_hidden_states": encoded["last_hidden_state"],
            "attention_mask": encoded["attention_mask"],
        }
        conditioning = {k: np.repeat(v, num_images_per_prompt, axis=0) for k, v in conditioning.items()}
        _add_time(timings, "encode_prompt", start)

        start = time.perf_counter()
        scheduler = scheduler_from_config(self.info.prior_scheduler)
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps
        shape = (len(prompts) * num_images_per_prompt, self.info.dims.embed_dim)
        if image_embeds is None:
            latents = noise.randn(shape) * np.float32(scheduler.init_noise_sigma)
        else:
            timesteps = strength_timesteps(timesteps, num_inference_steps, strength)
            if shape[0] % len(image_embeds):
                raise ValueError(
                    f"cannot tile {len(image_embeds)} image embeddings over a batch of {shape[0]}"
                )
            initial = np.tile(image_embeds, (shape[0] // len(image_embeds), 1))  # diffusers: cat([emb] * k)
            latents = scheduler.add_noise(initial, noise.randn(shape), np.repeat(timesteps[:1], shape[0]))

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
            latents, timesteps, scheduler, predict, noise, pass_prev_timestep=True, on_step=on_step
        )
        result = self.transport.infer(registry.PRIOR_POSTPROCESS, {"latents": latents})
        _add_time(timings, "prior", start)
        return result

    def prior_embeddings(
        self,
        prompts: Sequence[str],
        negative_prompt: Sequence[str] | None,
        *,
        num_images_per_prompt: int,
        num_inference_steps: int,
        guidance_scale: float,
        noise: NoiseSource,
        image_embeds: np.ndarray | None = None,
        strength: float = 1.0,
        on_step: Callable[[], None] | None = None,
        timings: dict[str, float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative image embeddings with diffusers' negative-prompt semantics.

        Without a negative prompt the negative embedding is the zero-image embedding. With one, the
        prior also runs on the negative prompts (guided by themselves) and that result is the negative.
        `image_embeds`/`strength` select the Emb2Emb start (see `run_prior`).
        """
        prompts = list(prompts)
        if negative_prompt is None:
            uncond = [""] * len(prompts)
        else:
            prompts = prompts + list(negative_prompt)
            uncond = list(negative_prompt) * 2
        out = self.run_prior(
            prompts,
            uncond,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            noise=noise,
            image_embeds=image_embeds,
            strength=strength,
            on_step=on_step,
            timings=timings,
        )
        if negative_prompt is None:
            return out["image_embeds"], out["zero_image_embeds"]
        positive, negative = np.split(out["image_embeds"], 2)
        return positive, negative

    def skip_prior(self, batch: int, num_inference_steps: int, noise: NoiseSource) -> None:
        """Consume the random draws of a prior run whose result diffusers computes and discards.

        `KandinskyV22PriorPipeline.interpolate` always runs the prior on its `negative_prompt`, even when
        it then returns the zero-image embedding. Skipping the network calls but not the draws keeps every
        later draw (the decoder's) where diffusers has it: the scheduler runs on a constant prediction.
        """
        scheduler = scheduler_from_config(self.info.prior_scheduler)
        scheduler.set_timesteps(num_inference_steps)
        latents = noise.randn((batch, self.info.dims.embed_dim))

        def constant(sample: np.ndarray, t: int) -> np.ndarray:
            return np.zeros_like(sample)

        denoise(latents, scheduler.timesteps, scheduler, constant, noise, pass_prev_timestep=True)

    # -- decoder ---------------------------------------------------------------------------------

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
        image_latents: np.ndarray | None = None,
        strength: float = 1.0,
        keep_mask: np.ndarray | None = None,
        on_step: Callable[[], None] | None = None,
        timings: dict[str, float] | None = None,
    ) -> np.ndarray:
        """The decoder loop of KandinskyV22Pipeline and its variants; returns the final latents.

        - text-to-image: from pure noise.
        - `image_latents` + `strength` (KandinskyV22Img2ImgPipeline): timesteps cut by strength, the image
          latents noised at the first one (one draw of the image's shape, broadcast over the batch).
        - `image_latents` + `keep_mask` [1, 1, h, w], 1 = keep (KandinskyV22InpaintPipeline): the
          inpainting UNet sees [latents, masked image latents, mask]; after each step the known region
          is replaced by the image latents noised to the next timestep.
        """
        start = time.perf_counter()
        inpainting = keep_mask is not None
        if inpainting and image_latents is None:
            raise ValueError("inpainting needs image_latents with keep_mask")
        spec = registry.UNET_INPAINT if inpainting else registry.UNET
        scheduler_config = self.info.inpaint_scheduler if inpainting else self.info.decoder_scheduler
        if scheduler_config is None:
            raise ModelNotReady("the server has no inpainting UNet ('unet_inpaint' parameters missing)")
        scheduler = scheduler_from_config(scheduler_config)
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps
        batch = len(image_embeds)
        shape = (batch, self.info.dims.latent_channels, *self.latent_size(height, width))
        extra_channels = after_step = None

        if image_latents is None or inpainting:
            latents = noise.randn(shape) * np.float32(scheduler.init_noise_sigma)
        else:
            timesteps = strength_timesteps(timesteps, num_inference_steps, strength)
            draw = noise.randn(image_latents.shape)
            latents = scheduler.add_noise(image_latents, draw, np.repeat(timesteps[:1], batch))
            latents = np.ascontiguousarray(np.broadcast_to(latents, shape))

        if inpainting:
            known, keep = image_latents[:1], keep_mask[:1].astype(np.float32)
            masked_image = image_latents * keep
            initial_noise = latents.copy()  # diffusers: noise = torch.clone(latents)

            def extra_channels(model_input: np.ndarray) -> np.ndarray:
                n = len(model_input)
                tiled = [np.broadcast_to(a, (n, *a.shape[1:])) for a in (masked_image, keep)]
                return np.concatenate([model_input, *tiled], axis=1)

            def after_step(latents: np.ndarray, i: int) -> np.ndarray:
                # The final step restores the un-noised image, so diffusers' blend after the loop is a no-op.
                original = known
                if i < len(timesteps) - 1:
                    original = scheduler.add_noise(known, initial_noise, timesteps[i + 1 : i + 2])
                return keep * original + (np.float32(1.0) - keep) * latents

        predict = self._unet_predictor(
            spec, image_embeds, negative_image_embeds, guidance_scale, extra_channels, scheduler_config
        )
        latents = denoise(
            latents, timesteps, scheduler, predict, noise, after_step=after_step, on_step=on_step
        )
        _add_time(timings, "decoder", start)
        return latents

    def _unet_predictor(
        self,
        spec: registry.ComponentSpec,
        image_embeds: np.ndarray,
        negative_image_embeds: np.ndarray,
        guidance_scale: float,
        extra_channels: Callable[[np.ndarray], np.ndarray] | None = None,
        scheduler_config: dict | None = None,
    ) -> Callable[[np.ndarray, int], np.ndarray]:
        """One guided UNet evaluation per call; `extra_channels` appends inpainting's mask channels."""
        do_cfg = guidance_scale > 1.0
        embeds = np.concatenate([negative_image_embeds, image_embeds]) if do_cfg else image_embeds
        channels = self.info.dims.latent_channels
        config = scheduler_config if scheduler_config is not None else self.info.decoder_scheduler
        learned_variance = config.get("variance_type") in ("learned", "learned_range")

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
        _add_time(timings, "decode_image", start)
        return [Image.fromarray(image) for image in rgb]

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """diffusers' downscale_height_and_width: ceil(side / scale**2) * scale."""
        scale = self.info.dims.movq_scale_factor
        return (-(-height // scale**2) * scale, -(-width // scale**2) * scale)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> KandinskyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
