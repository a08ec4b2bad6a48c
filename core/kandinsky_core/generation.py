"""The generation core: every Kandinsky 2.2 mode, run against one `infer(model, inputs)` interface.

The loops follow the diffusers pipelines step for step (`KandinskyV22PriorPipeline` and its Emb2Emb
variant, `KandinskyV22Pipeline` and its Img2Img and Inpaint variants): same classifier-free guidance
batch order ([uncond, cond]), same scheduler calls, same random draws in the same order and shapes. Each
network evaluation is one `infer` call, so the same code runs

- on the client, where `infer` is a gRPC/HTTP request (`transport.TritonTransport`), and
- inside the server, where `infer` is a BLS request (the `kandinsky` python model).

There is one denoising loop (`denoise`); modes differ in the initial latents, the timesteps, the model
input of a step and an optional blend after a step (`DecoderStart`). Each mode is one method of
`Generator`, listed in `Generator.MODES`.

| mode             | diffusers                                                                   |
|------------------|-----------------------------------------------------------------------------|
| `text_to_image`  | KandinskyV22PriorPipeline + KandinskyV22Pipeline                            |
| `variations`     | the image's CLIP embedding (as `interpolate` encodes images) + KandinskyV22Pipeline |
| `fuse`           | KandinskyV22PriorPipeline.interpolate + KandinskyV22Pipeline                |
| `image_to_image` | KandinskyV22PriorPipeline + KandinskyV22Img2ImgPipeline                     |
| `emb2emb`        | KandinskyV22PriorEmb2EmbPipeline + KandinskyV22Pipeline                     |
| `inpaint`        | KandinskyV22PriorPipeline + KandinskyV22InpaintPipeline                     |
| `outpaint`       | `inpaint` on a larger canvas whose new area is the mask                     |
| `controlnet`     | KandinskyV22PriorPipeline + KandinskyV22ControlnetPipeline                  |
| `controlnet_image_to_image` | KandinskyV22PriorPipeline + KandinskyV22ControlnetImg2ImgPipeline |
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from PIL import Image

from kandinsky_core import components as registry

from .components import MAX_INPUT_IMAGE_SIDE, ModelSpec
from .errors import InvalidRequest
from .images import (
    fit_within,
    hint_array,
    latent_keep_mask,
    outpaint_canvas,
    repaint_mask,
    resize_for_movq,
    rgb_array,
)
from .noise import NoiseSource, SeededNoise
from .request import (
    CONTROLNET,
    CONTROLNET_IMAGE_TO_IMAGE,
    DECODER_STRENGTH_MODES,
    EMB2EMB,
    FUSE,
    IMAGE_TO_IMAGE,
    INPAINT,
    MODE_MODELS,
    OUTPAINT,
    TEXT_TO_IMAGE,
    VARIATIONS,
    GenerationRequest,
    decoder_unet,
)
from .schedulers import (
    decoder_scheduler_from_config,
    inpaint_known_latents,
    learned_variance,
    prior_scheduler_from_config,
)
from .schedulers import strength_timesteps as scheduler_strength_timesteps
from .server_info import ServerInfo

PRIOR_STAGE = "prior"
DECODER_STAGE = "decoder"

# callback_on_step_end(stage, step, timestep, latents) -> replacement latents or None. It runs after every
# denoising step; it may also raise (e.g. `Cancelled`) to stop the generation.
StepCallback = Callable[[str, int, int, np.ndarray], "np.ndarray | None"]


class Infer(Protocol):
    """One evaluation of a served model: inputs keyed by the spec's input names -> every declared output."""

    def infer(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class Generation:
    """A generation's result: images, the image embeddings the decoder used, the seed, stage timings."""

    images: Any  # output_type "pil": PIL images; "np": float32 [N, H, W, 3] in [0, 1]; "latent": latents
    image_embeds: np.ndarray | None
    negative_image_embeds: np.ndarray | None
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, where the loop ran


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


def decoder_scheduler(info: ServerInfo, request: GenerationRequest) -> Any:
    """A fresh decoder scheduler for `request`: its class and overrides on the UNet's checkpoint config.

    A scheduler object serves one loop (multistep schedulers keep state between steps).
    """
    config = info.decoder_scheduler_config(decoder_unet(request.mode))
    return decoder_scheduler_from_config(config, request.scheduler, request.scheduler_config)


def scheduler_stage(stage: str) -> str:
    """The timings key of a loop's scheduler steps (inside the loop's own stage time)."""
    return f"{stage}_scheduler"


class _Run:
    """One generation's state: its noise, its step callback and its stage timings."""

    def __init__(self, noise: NoiseSource, callback: StepCallback | None) -> None:
        self.noise = noise
        self.callback = callback
        self.timings: dict[str, float] = {}

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def step_end(self, stage: str, step: int, timestep: int, latents: np.ndarray) -> np.ndarray:
        if self.callback is None:
            return latents
        replaced = self.callback(stage, step, timestep, latents)
        if replaced is None:
            return latents
        replaced = np.asarray(replaced, dtype=np.float32)
        if replaced.shape != latents.shape:
            raise InvalidRequest(
                "callback_on_step_end",
                f"returned latents of shape {replaced.shape}; the {stage} latents have shape {latents.shape}",
            )
        return replaced


def denoise(
    latents: np.ndarray,
    timesteps: np.ndarray,
    scheduler: Any,
    predict: Callable[[np.ndarray, int], np.ndarray],
    noise: NoiseSource,
    *,
    pass_prev_timestep: bool = False,
    after_step: Callable[[np.ndarray, int], np.ndarray] | None = None,
    step_end: Callable[[int, int, np.ndarray], np.ndarray] | None = None,
    timed_step: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> np.ndarray:
    """The one denoising loop: predict, scheduler step, optional blend, step callback, for every timestep.

    `pass_prev_timestep`: the UnCLIP scheduler is told the next timestep (None after the last), as
    KandinskyV22PriorPipeline does. `after_step(latents, i)` lets inpainting restore the known region.
    `step_end(i, t, latents)` returns the latents the next step starts from. `timed_step()` wraps each
    scheduler step (its own numpy time, reported next to the model time by the benchmarks).
    """
    for i, t in enumerate(timesteps):
        model_output = predict(latents, int(t))
        with timed_step():
            if pass_prev_timestep:
                prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else None
                latents = scheduler.step(model_output, int(t), latents, noise, prev_timestep=prev)
            else:
                latents = scheduler.step(model_output, int(t), latents, noise)
        if after_step is not None:
            latents = after_step(latents, i)
        if step_end is not None:
            latents = step_end(i, int(t), latents)
    return latents


# What a mode returns: (image_embeds, negative_image_embeds, final decoder latents).
_ModeResult = tuple[np.ndarray, np.ndarray, np.ndarray]


def _timestep_batch(t: int, batch: int) -> np.ndarray:
    return np.full((batch,), t, dtype=np.int64)


@dataclass
class DecoderStart:
    """Where a decoder loop starts and what differs per variant (text-to-image, img2img, inpainting)."""

    spec: registry.ComponentSpec
    scheduler: Any
    timesteps: np.ndarray
    latents: np.ndarray
    extra_channels: Callable[[np.ndarray], np.ndarray] | None = None
    after_step: Callable[[np.ndarray, int], np.ndarray] | None = None
    # Extra UNet inputs with one row that every row of the model batch shares (the ControlNet hint).
    shared_inputs: dict[str, np.ndarray] = field(default_factory=dict)


class Generator:
    """Runs generation requests through an `Infer`; `info` describes the served checkpoint."""

    def __init__(self, infer: Infer, info: ServerInfo, zero_image_embeds: np.ndarray | None = None) -> None:
        self.infer = infer
        self.info = info
        self._zero_image_embeds = zero_image_embeds  # a checkpoint constant, cached after its first use

    # -- entry points ----------------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        noise: NoiseSource | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> Generation:
        """Run a request checked by `validation.check_request`. `noise` overrides its seed (parity tests)."""
        run = _Run(noise or SeededNoise(request.seed), callback_on_step_end)
        with run.timed("total"):
            image_embeds, negative, latents = self.MODES[request.mode](self, request, run)
            images = self.output(latents, request.output_type, run, self.movq(request.mode))
        return Generation(images, image_embeds, negative, request.seed, run.timings)

    def output(
        self, latents: np.ndarray, output_type: str, run: _Run, movq: registry.MovqModels = registry.MOVQ
    ) -> Any:
        """diffusers' output types: PIL images, float images in [0, 1] (NHWC), or the latents themselves."""
        if output_type == "latent":
            return latents
        if output_type == "np":
            with run.timed("decode_image"):
                image = self.infer.infer(movq.decoder, {"latents": latents})["image"]
            return np.clip(image * np.float32(0.5) + np.float32(0.5), 0.0, 1.0).transpose(0, 2, 3, 1)
        return self.decode_latents(latents, run, movq)

    def movq(self, mode: str) -> registry.MovqModels:
        """The MoVQ a mode encodes and decodes with: inpainting and outpainting use the inpainting repo's
        own where the server serves it (it differs from the decoder's), as diffusers' inpaint pipeline does."""
        if mode in (INPAINT, OUTPAINT) and self.info.inpaint_own_movq:
            return registry.INPAINT_MOVQ
        return registry.MOVQ

    def required_models(self, mode: str) -> tuple[str, ...]:
        """The served models `mode` needs here: MODE_MODELS, with the MoVQ ensembles of `movq(mode)`."""
        movq = self.movq(mode)
        own = {
            registry.ENCODE_LATENTS.name: movq.encode_latents.name,
            registry.DECODE_IMAGE.name: movq.decode_image.name,
        }
        return tuple(own.get(name, name) for name in MODE_MODELS[mode])

    def loop_steps(self, request: GenerationRequest) -> dict[str, int]:
        """Steps of one prior loop and of the decoder loop of a checked request (strength cuts them)."""
        prior = prior_scheduler_from_config(self.info.prior_scheduler)
        decoder = decoder_scheduler(self.info, request)
        if request.mode == EMB2EMB:
            prior_steps = scheduler_strength_timesteps(
                prior, request.prior_num_inference_steps, request.strength
            )[1]
        else:
            prior_steps = request.prior_num_inference_steps
        if request.mode in DECODER_STRENGTH_MODES:
            decoder_steps = scheduler_strength_timesteps(
                decoder, request.num_inference_steps, request.strength
            )[1]
        else:
            decoder.set_timesteps(request.num_inference_steps)
            decoder_steps = len(decoder.timesteps)
        return {PRIOR_STAGE: prior_steps, DECODER_STAGE: decoder_steps}

    def total_steps(self, request: GenerationRequest) -> int:
        """How many times a checked request calls the step callback (for progress bars)."""
        if request.mode == VARIATIONS:
            prior_runs = 0
        elif request.mode == FUSE:
            prior_runs = sum(isinstance(item, str) for item in request.images_and_prompts)
            prior_runs += bool(request.negative_prompt) or request.negative_prior_prompt is not None
        else:
            prior_runs = 1
        steps = self.loop_steps(request)
        return prior_runs * steps[PRIOR_STAGE] + steps[DECODER_STAGE]

    # -- modes: (request, run) -> (image_embeds, negative_image_embeds, final decoder latents) -----

    def _text_to_image(self, request: GenerationRequest, run: _Run) -> _ModeResult:
        image_embeds, negative = self._prior_for(request, run)
        return self._from_noise(request, image_embeds, negative, run)

    def _variations(self, request: GenerationRequest, run: _Run) -> _ModeResult:
        count = request.num_images_per_prompt
        image_embeds = np.repeat(self.encode_image(request.image, run), count, axis=0)
        return self._from_noise(request, image_embeds, self.zero_image_embeds(count), run)

    def _fuse(self, request: GenerationRequest, run: _Run) -> _ModeResult:
        image_embeds, negative = self.interpolate(request, run)
        return self._from_noise(request, image_embeds, negative, run)

    def _image_to_image(self, request: GenerationRequest, run: _Run) -> _ModeResult:
        image_embeds, negative = self._prior_for(request, run)
        picture = resize_for_movq(request.image, request.height, request.width)
        start = self.decoder_from_image(request, len(image_embeds), self.encode_latents(picture, run), run)
        return image_embeds, negative, self._decode_from(request, start, image_embeds, negative, run)

    def _emb2emb(self, request: GenerationRequest, run: _Run) -> _ModeResult:
        initial = np.repeat(self.encode_image(request.image, run), request.num_images_per_prompt, axis=0)
        image_embeds, negative = self._prior_for(request, run, initial)
        return self._from_noise(request, image_embeds, negative, run)

    def _inpaint(self, request: GenerationRequest, run: _Run) -> _ModeResult:
        return self._inpaint_picture(request, request.image, request.mask_image, run)

    def _outpaint(self, request: GenerationRequest, run: _Run) -> _ModeResult:
        margins = (request.left, request.top, request.right, request.bottom)
        canvas, mask = outpaint_canvas(request.image, *margins)
        return self._inpaint_picture(request, canvas, mask, run)

    def _inpaint_picture(
        self, request: GenerationRequest, picture: Image.Image, mask: Image.Image, run: _Run
    ) -> _ModeResult:
        image_embeds, negative = self._prior_for(request, run)
        height, width = request.height, request.width
        picture_rgb = resize_for_movq(picture, height, width)
        image_latents = self.encode_latents(picture_rgb, run, self.movq(request.mode))
        keep = latent_keep_mask(repaint_mask(mask, height, width), image_latents.shape[-2:])
        start = self.decoder_inpainting(request, len(image_embeds), image_latents, keep, run)
        return image_embeds, negative, self._decode_from(request, start, image_embeds, negative, run)

    def _from_noise(
        self, request: GenerationRequest, image_embeds: np.ndarray, negative: np.ndarray, run: _Run
    ) -> _ModeResult:
        start = self.decoder_from_noise(request, len(image_embeds), run)
        return image_embeds, negative, self._decode_from(request, start, image_embeds, negative, run)

    def _controlnet(self, request: GenerationRequest, run: _Run) -> _ModeResult:
        """KandinskyV22ControlnetPipeline: text-to-image whose UNet also sees the hint."""
        image_embeds, negative = self._prior_for(request, run)
        start = self.with_hint(self.decoder_from_noise(request, len(image_embeds), run), request)
        return image_embeds, negative, self._decode_from(request, start, image_embeds, negative, run)

    def _controlnet_image_to_image(self, request: GenerationRequest, run: _Run) -> _ModeResult:
        """KandinskyV22ControlnetImg2ImgPipeline: image-to-image whose UNet also sees the hint."""
        image_embeds, negative = self._prior_for(request, run)
        picture = resize_for_movq(request.image, request.height, request.width)
        start = self.decoder_from_image(request, len(image_embeds), self.encode_latents(picture, run), run)
        start = self.with_hint(start, request)
        return image_embeds, negative, self._decode_from(request, start, image_embeds, negative, run)

    @staticmethod
    def with_hint(start: DecoderStart, request: GenerationRequest) -> DecoderStart:
        """`start` on the ControlNet UNet, with the request's hint (checked to have the output's size)."""
        return replace(start, spec=registry.UNET_CONTROLNET, shared_inputs={"hint": hint_array(request.hint)})

    MODES: dict[str, Callable[[Generator, GenerationRequest, _Run], _ModeResult]] = {
        TEXT_TO_IMAGE: _text_to_image,
        VARIATIONS: _variations,
        FUSE: _fuse,
        IMAGE_TO_IMAGE: _image_to_image,
        EMB2EMB: _emb2emb,
        INPAINT: _inpaint,
        OUTPAINT: _outpaint,
        CONTROLNET: _controlnet,
        CONTROLNET_IMAGE_TO_IMAGE: _controlnet_image_to_image,
    }

    # -- encoders --------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenizer + text encoder on the server: text_embeds, last_hidden_state, attention_mask."""
        raw = np.array([p.encode("utf-8") for p in prompts], dtype=np.object_).reshape(-1, 1)
        return self.infer.infer(registry.ENCODE_PROMPT, {"prompt": raw})

    def encode_image(self, picture: Image.Image, run: _Run) -> np.ndarray:
        """An RGB image -> its CLIP image embedding [1, embed_dim] (pre-processed on the server)."""
        with run.timed("encode_image"):
            rgb = rgb_array(fit_within(picture, MAX_INPUT_IMAGE_SIDE))
            return self.infer.infer(registry.ENCODE_IMAGE, {"image_rgb": rgb})["image_embeds"]

    def encode_latents(
        self, image_rgb: np.ndarray, run: _Run, movq: registry.MovqModels = registry.MOVQ
    ) -> np.ndarray:
        """uint8 [batch, H, W, 3] at the generation size -> MoVQ latents (no quantisation, no scaling)."""
        with run.timed("encode_latents"):
            return self.infer.infer(movq.encode_latents, {"image_rgb": image_rgb})["latents"]

    def zero_image_embeds(self, batch: int) -> np.ndarray:
        """The negative image embedding diffusers uses without a negative prompt (a checkpoint constant).

        `prior_postprocess` ships it; it is asked once, with a dummy latent, and cached.
        """
        if self._zero_image_embeds is None:
            dummy = np.zeros((1, self.info.dims.embed_dim), np.float32)
            out = self.infer.infer(registry.PRIOR_POSTPROCESS, {"latents": dummy})
            self._zero_image_embeds = out["zero_image_embeds"]
        return np.repeat(self._zero_image_embeds, batch, axis=0)

    # -- prior -----------------------------------------------------------------------------------

    def _prior_for(
        self, request: GenerationRequest, run: _Run, initial: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The prior on the request's prompts (Emb2Emb from `initial` image embeddings when given)."""
        return self.prior_embeddings(
            request.prompt,
            request.negative_prompt,
            num_images_per_prompt=request.num_images_per_prompt,
            num_inference_steps=request.prior_num_inference_steps,
            guidance_scale=request.prior_guidance_scale,
            run=run,
            initial=initial,
            strength=request.strength if initial is not None else 1.0,
        )

    def run_prior(
        self,
        prompts: Sequence[str],
        uncond_prompts: Sequence[str],
        *,
        num_images_per_prompt: int,
        num_inference_steps: int,
        guidance_scale: float,
        run: _Run,
        initial: np.ndarray | None = None,
        strength: float = 1.0,
    ) -> dict[str, np.ndarray]:
        """KandinskyV22PriorPipeline's loop for `prompts`; returns image_embeds and zero_image_embeds.

        With `initial` image embeddings (KandinskyV22PriorEmb2EmbPipeline) the loop starts from them,
        tiled over the batch and noised at the first of the timesteps `strength` keeps, instead of from
        noise. Like diffusers, the raw CLIP embedding is noised as it is (not normalised with clip_mean/std).
        """
        do_cfg = guidance_scale > 1.0
        with run.timed("encode_prompt"):
            encoded = self.encode_prompts(list(uncond_prompts) + list(prompts) if do_cfg else list(prompts))
            conditioning = {
                "proj_embedding": encoded["text_embeds"],
                "encoder_hidden_states": encoded["last_hidden_state"],
                "attention_mask": encoded["attention_mask"],
            }
            conditioning = {k: np.repeat(v, num_images_per_prompt, axis=0) for k, v in conditioning.items()}

        with run.timed(PRIOR_STAGE):
            scheduler = prior_scheduler_from_config(self.info.prior_scheduler)
            scheduler.set_timesteps(num_inference_steps)
            timesteps = scheduler.timesteps
            shape = (len(prompts) * num_images_per_prompt, self.info.dims.embed_dim)
            if initial is None:
                latents = run.noise.randn(shape) * np.float32(scheduler.init_noise_sigma)
            else:
                timesteps, _ = scheduler_strength_timesteps(scheduler, num_inference_steps, strength)
                if shape[0] % len(initial):
                    raise ValueError(
                        f"cannot tile {len(initial)} image embeddings over a batch of {shape[0]}"
                    )
                tiled = np.tile(initial, (shape[0] // len(initial), 1))  # diffusers: cat([emb] * k)
                latents = scheduler.add_noise(
                    tiled, run.noise.randn(shape), np.repeat(timesteps[:1], shape[0])
                )

            def predict(sample: np.ndarray, t: int) -> np.ndarray:
                model_input = np.concatenate([sample, sample]) if do_cfg else sample
                out = self.infer.infer(
                    registry.PRIOR,
                    {
                        "hidden_states": model_input,
                        "timestep": _timestep_batch(t, len(model_input)),
                        **conditioning,
                    },
                )["predicted_image_embedding"]
                return apply_guidance(out, guidance_scale) if do_cfg else out

            latents = denoise(
                latents,
                timesteps,
                scheduler,
                predict,
                run.noise,
                pass_prev_timestep=True,
                step_end=lambda i, t, x: run.step_end(PRIOR_STAGE, i, t, x),
                timed_step=lambda: run.timed(scheduler_stage(PRIOR_STAGE)),
            )
            return self.infer.infer(registry.PRIOR_POSTPROCESS, {"latents": latents})

    def prior_embeddings(
        self,
        prompts: Sequence[str],
        negative_prompt: Sequence[str] | None,
        *,
        num_images_per_prompt: int,
        num_inference_steps: int,
        guidance_scale: float,
        run: _Run,
        initial: np.ndarray | None = None,
        strength: float = 1.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative image embeddings with diffusers' negative-prompt semantics.

        Without a negative prompt the negative embedding is the zero-image embedding. With one, the
        prior also runs on the negative prompts (guided by themselves) and that result is the negative.
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
            run=run,
            initial=initial,
            strength=strength,
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
        scheduler = prior_scheduler_from_config(self.info.prior_scheduler)
        scheduler.set_timesteps(num_inference_steps)
        latents = noise.randn((batch, self.info.dims.embed_dim))
        denoise(
            latents,
            scheduler.timesteps,
            scheduler,
            lambda x, t: np.zeros_like(x),
            noise,
            pass_prev_timestep=True,
        )

    def interpolate(self, request: GenerationRequest, run: _Run) -> tuple[np.ndarray, np.ndarray]:
        """KandinskyV22PriorPipeline.interpolate: the weighted sum of the items' image embeddings.

        A prompt runs the prior (with `negative_prior_prompt` as its negative); an image is CLIP-encoded.
        The negative embedding is the zero-image embedding when `negative_prompt` is empty (the prior
        output of `negative_prior_prompt` when that is given), else the prior output of `negative_prompt`.
        """
        per_prompt = request.num_images_per_prompt
        negative_prior = None if request.negative_prior_prompt is None else [request.negative_prior_prompt]
        negative_prompt = request.negative_prompt or ""

        def prior(prompt: str) -> tuple[np.ndarray, np.ndarray]:
            return self.prior_embeddings(
                [prompt],
                negative_prior,
                num_images_per_prompt=per_prompt,
                num_inference_steps=request.prior_num_inference_steps,
                guidance_scale=request.prior_guidance_scale,
                run=run,
            )

        weighted = []
        for item, weight in zip(request.images_and_prompts, request.weights, strict=True):
            if isinstance(item, str):
                embeds = prior(item)[0]
            else:
                embeds = np.repeat(self.encode_image(item, run), per_prompt, axis=0)
            weighted.append(embeds * np.float32(weight))
        image_embeds = np.sum(np.stack(weighted), axis=0, dtype=np.float32)

        # diffusers always runs the prior once more on `negative_prompt`, and keeps what it needs of it.
        if negative_prompt == "" and negative_prior is None:
            self.skip_prior(
                per_prompt, request.prior_num_inference_steps, run.noise
            )  # the zero-image embedding
            negative = self.zero_image_embeds(per_prompt)
        elif negative_prompt == "":
            negative = prior("")[1]
        else:
            negative = prior(negative_prompt)[0]
        return image_embeds, negative

    # -- decoder ---------------------------------------------------------------------------------

    def _latent_shape(self, request: GenerationRequest, batch: int) -> tuple[int, ...]:
        return (batch, self.info.dims.latent_channels, *self.info.latent_size(request.height, request.width))

    def _initial_noise(self, request: GenerationRequest, batch: int, run: _Run) -> np.ndarray:
        """Standard-normal start latents: the request's `latents` if given (no draw), else seeded noise."""
        if request.latents is not None:
            return np.array(request.latents, dtype=np.float32)
        return run.noise.randn(self._latent_shape(request, batch))

    def decoder_from_noise(self, request: GenerationRequest, batch: int, run: _Run) -> DecoderStart:
        """KandinskyV22Pipeline: noise scaled by the scheduler's init_noise_sigma, every timestep."""
        scheduler = decoder_scheduler(self.info, request)
        scheduler.set_timesteps(request.num_inference_steps)
        latents = self._initial_noise(request, batch, run) * np.float32(scheduler.init_noise_sigma)
        return DecoderStart(registry.UNET, scheduler, scheduler.timesteps, latents)

    def decoder_from_image(
        self, request: GenerationRequest, batch: int, image_latents: np.ndarray, run: _Run
    ) -> DecoderStart:
        """KandinskyV22Img2ImgPipeline: the timesteps the scheduler keeps for `strength`, the image latents
        noised at the first one (one draw of the image's shape, broadcast over the batch)."""
        scheduler = decoder_scheduler(self.info, request)
        timesteps, _ = scheduler_strength_timesteps(scheduler, request.num_inference_steps, request.strength)
        draw = run.noise.randn(image_latents.shape)
        latents = scheduler.add_noise(image_latents, draw, np.repeat(timesteps[:1], batch))
        latents = np.ascontiguousarray(np.broadcast_to(latents, self._latent_shape(request, batch)))
        return DecoderStart(registry.UNET, scheduler, timesteps, latents)

    def decoder_inpainting(
        self,
        request: GenerationRequest,
        batch: int,
        image_latents: np.ndarray,
        keep_mask: np.ndarray,
        run: _Run,
    ) -> DecoderStart:
        """KandinskyV22InpaintPipeline: the UNet sees [latents, masked image latents, keep mask]; after
        each step the known region (keep_mask [1, 1, h, w], 1 = keep) is replaced by the image latents
        noised to the next timestep.

        The re-noising uses the loop's standard-normal draw. diffusers passes the draw already scaled by
        init_noise_sigma, which is the same for every scheduler but the Euler ones (init_noise_sigma > 1),
        where it would over-noise the known region; we follow the intent (see docs/schedulers.md).
        """
        scheduler = decoder_scheduler(self.info, request)
        scheduler.set_timesteps(request.num_inference_steps)
        timesteps = scheduler.timesteps
        initial_noise = self._initial_noise(request, batch, run)  # diffusers: noise = torch.clone(latents)
        latents = initial_noise * np.float32(scheduler.init_noise_sigma)
        known, keep = image_latents[:1], keep_mask[:1].astype(np.float32)
        masked_image = image_latents * keep

        def extra_channels(model_input: np.ndarray) -> np.ndarray:
            n = len(model_input)
            tiled = [np.broadcast_to(a, (n, *a.shape[1:])) for a in (masked_image, keep)]
            return np.concatenate([model_input, *tiled], axis=1)

        def after_step(latents: np.ndarray, i: int) -> np.ndarray:
            # The final step restores the un-noised image, so diffusers' blend after the loop is a no-op.
            original = inpaint_known_latents(scheduler, known, initial_noise, timesteps, i)
            return keep * original + (np.float32(1.0) - keep) * latents

        return DecoderStart(registry.UNET_INPAINT, scheduler, timesteps, latents, extra_channels, after_step)

    def _decode_from(
        self,
        request: GenerationRequest,
        start: DecoderStart,
        image_embeds: np.ndarray,
        negative_image_embeds: np.ndarray,
        run: _Run,
    ) -> np.ndarray:
        """The decoder loop from `start`, guided by the embeddings; returns the final latents."""
        with run.timed(DECODER_STAGE):
            predict = self._unet_predictor(start, image_embeds, negative_image_embeds, request.guidance_scale)
            return denoise(
                start.latents,
                start.timesteps,
                start.scheduler,
                predict,
                run.noise,
                after_step=start.after_step,
                step_end=lambda i, t, x: run.step_end(DECODER_STAGE, i, t, x),
                timed_step=lambda: run.timed(scheduler_stage(DECODER_STAGE)),
            )

    def _unet_predictor(
        self,
        start: DecoderStart,
        image_embeds: np.ndarray,
        negative_image_embeds: np.ndarray,
        guidance_scale: float,
    ) -> Callable[[np.ndarray, int], np.ndarray]:
        """One guided UNet evaluation per call; inpainting appends its mask channels to the input."""
        do_cfg = guidance_scale > 1.0
        embeds = np.concatenate([negative_image_embeds, image_embeds]) if do_cfg else image_embeds
        channels = self.info.dims.latent_channels
        keep_variance = learned_variance(start.scheduler)

        def predict(sample: np.ndarray, t: int) -> np.ndarray:
            scaled = start.scheduler.scale_model_input(sample, t)  # identity but for the Euler schedulers
            model_input = np.concatenate([scaled, scaled]) if do_cfg else scaled
            if start.extra_channels is not None:
                model_input = start.extra_channels(model_input)
            shared = {  # diffusers repeats the hint over the batch and over [uncond, cond]
                name: np.broadcast_to(value, (len(model_input), *value.shape[1:]))
                for name, value in start.shared_inputs.items()
            }
            out = self.infer.infer(
                start.spec,
                {
                    "sample": model_input,
                    "timestep": _timestep_batch(t, len(model_input)),
                    "image_embeds": embeds,
                    **shared,
                },
            )["noise_pred"]
            if do_cfg:
                out = apply_guidance(out, guidance_scale, channels)
            return out if keep_variance else out[:, :channels]

        return predict

    def decode_latents(
        self, latents: np.ndarray, run: _Run, movq: registry.MovqModels = registry.MOVQ
    ) -> list[Image.Image]:
        with run.timed("decode_image"):
            rgb = self.infer.infer(movq.decode_image, {"latents": latents})["image_rgb"]
        return [Image.fromarray(image) for image in rgb]
