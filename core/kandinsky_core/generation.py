"""The generation core: every Kandinsky 2.2 mode, run against one `infer(model, inputs)` interface.

The loops follow the diffusers pipelines step for step (`KandinskyV22PriorPipeline` and its Emb2Emb
variant, `KandinskyV22Pipeline` and its Img2Img and Inpaint variants): same classifier-free guidance
batch order ([uncond, cond]), same scheduler calls, same random draws in the same order and shapes. Each
network evaluation is one `infer` call, so the same code runs

- on the client, where `infer` is a gRPC/HTTP request (`transport.TritonTransport`), and
- inside the server, where `infer` is a BLS request (the `kandinsky` python model).

There is one denoising loop (`denoise`). A mode (`modes.py`) is made of parts: how the image
embeddings are made (`Embeddings`: the prior on a prompt, an image's CLIP embedding, fusion, Emb2Emb),
how the decoder loop starts (`Decoder`: noise, a noised picture, inpainting) and its UNet. A `Plan` is a
checked request with the schedulers and timesteps of its loops, made once per request: the step counts
of progress reports come from it, and `Generator.generate` runs it part by part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
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
from .modes import (
    CANVAS_PICTURE,
    FUSION,
    IMAGE_EMBEDDING,
    IMAGE_PRIOR,
    MODES,
    PROMPT_PRIOR,
    Decoder,
    Mode,
    fusion_runs_negative_prior,
)
from .noise import NoiseSource, SeededNoise
from .request import GenerationRequest
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


def new_decoder_scheduler(info: ServerInfo, request: GenerationRequest) -> Any:
    """A new decoder scheduler for `request`: its class and overrides on its mode's UNet's checkpoint config.

    A request builds one, in its check (`validation.plan_request`); its `Plan` keeps it for the loop.
    """
    config = info.decoder_scheduler_config(MODES[request.mode].unet.spec.name)
    return decoder_scheduler_from_config(config, request.scheduler, request.scheduler_config)


def _loop_timesteps(scheduler: Any, num_inference_steps: int, strength: float | None) -> np.ndarray:
    """The timesteps one loop runs: every one, or the last part that `strength` keeps (diffusers'
    get_timesteps, as the image-to-image pipelines and Emb2Emb start)."""
    if strength is None:
        scheduler.set_timesteps(num_inference_steps)
        return scheduler.timesteps
    return scheduler_strength_timesteps(scheduler, num_inference_steps, strength)[0]


@dataclass(frozen=True, eq=False)
class Plan:
    """A checked request with its mode, the schedulers of its loops and their timesteps, made once.

    The step counts (`loop_steps`, `total_steps`) come from these timesteps, and the loops run these
    very scheduler objects on them. The one decoder loop uses `decoder_scheduler` (`start_decoder` resets
    its state first: the multistep schedulers keep state between steps, so a plan may run again). Every
    prior loop of the request (fusion runs several) shares `prior_scheduler`: it is always UnCLIP, whose
    `step` keeps no state (the next timestep is passed in).
    """

    request: GenerationRequest  # checked (validation.check_request)
    mode: Mode
    decoder_scheduler: Any
    decoder_timesteps: np.ndarray  # image-to-image: the part of the schedule that `strength` keeps
    prior_scheduler: Any | None  # None when the mode runs no prior
    prior_timesteps: np.ndarray | None  # of each prior loop; Emb2Emb: the part that `strength` keeps
    source: GenerationRequest  # the request as given, before normalisation (what the server loop sends)

    @classmethod
    def of(
        cls,
        request: GenerationRequest,
        info: ServerInfo,
        decoder_scheduler: Any = None,
        source: GenerationRequest | None = None,
    ) -> Plan:
        """The plan of a checked `request`; `decoder_scheduler` is the one its check built (else built here)."""
        mode = MODES[request.mode]
        if decoder_scheduler is None:
            decoder_scheduler = new_decoder_scheduler(info, request)
        strength = request.strength
        decoder_timesteps = _loop_timesteps(
            decoder_scheduler, request.num_inference_steps, strength if mode.decoder.strength else None
        )
        prior_scheduler = prior_timesteps = None
        if mode.embeddings.uses_prior:
            prior_scheduler = prior_scheduler_from_config(info.prior_scheduler)
            prior_timesteps = _loop_timesteps(
                prior_scheduler,
                request.prior_num_inference_steps,
                strength if mode.embeddings.strength else None,
            )
        return cls(
            request,
            mode,
            decoder_scheduler,
            decoder_timesteps,
            prior_scheduler,
            prior_timesteps,
            request if source is None else source,
        )

    @property
    def prior_runs(self) -> int:
        """Prior loops that call the step callback (fusion: one per prompt item, plus the negative's)."""
        return self.mode.embeddings.prior_runs(self.request)

    @property
    def loop_steps(self) -> dict[str, int]:
        """Steps of one prior loop and of the decoder loop."""
        prior = 0 if self.prior_timesteps is None else len(self.prior_timesteps)
        return {PRIOR_STAGE: prior, DECODER_STAGE: len(self.decoder_timesteps)}

    @property
    def total_steps(self) -> int:
        """How many times the generation calls the step callback (for progress bars)."""
        steps = self.loop_steps
        return self.prior_runs * steps[PRIOR_STAGE] + steps[DECODER_STAGE]

    def start_decoder(self) -> tuple[Any, np.ndarray]:
        """The decoder scheduler with its loop state reset, and the loop's timesteps.

        `set_timesteps` starts a scheduler over; the stored timesteps came from the very same call (the
        strength slicing only reads the schedule), so they still hold.
        """
        self.decoder_scheduler.set_timesteps(self.request.num_inference_steps)
        return self.decoder_scheduler, self.decoder_timesteps


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


def decoder_picture(request: GenerationRequest, part: Decoder) -> tuple[Image.Image, Image.Image | None]:
    """The picture a decoder loop starts from and its mask (white = repaint; None outside inpainting):
    the input image, or for outpainting the image on its extended canvas with the new area masked."""
    if part.picture == CANVAS_PICTURE:
        return outpaint_canvas(request.image, request.left, request.top, request.right, request.bottom)
    return request.image, request.mask_image


class Generator:
    """Runs generation requests through an `Infer`; `info` describes the served checkpoint."""

    def __init__(self, infer: Infer, info: ServerInfo, zero_image_embeds: np.ndarray | None = None) -> None:
        self.infer = infer
        self.info = info
        self._zero_image_embeds = zero_image_embeds  # a checkpoint constant, cached after its first use

    # -- entry points ----------------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest | Plan,
        noise: NoiseSource | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> Generation:
        """Run a plan (`validation.plan_request`), or a request checked by `validation.check_request`
        (planned here). `noise` overrides its seed (parity tests)."""
        plan = request if isinstance(request, Plan) else Plan.of(request, self.info)
        request = plan.request
        run = _Run(noise or SeededNoise(request.seed), callback_on_step_end)
        with run.timed("total"):
            image_embeds, negative = self.embeddings(plan, run)
            start = self.decoder_start(plan, len(image_embeds), run)
            latents = self._decode_from(request, start, image_embeds, negative, run)
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
        if MODES[mode].decoder.inpainting and self.info.inpaint_own_movq:
            return registry.INPAINT_MOVQ
        return registry.MOVQ

    def required_models(self, mode: str) -> tuple[str, ...]:
        """The served models `mode` needs here: its definition's, with the MoVQ ensembles of `movq(mode)`."""
        movq = self.movq(mode)
        own = {
            registry.ENCODE_LATENTS.name: movq.encode_latents.name,
            registry.DECODE_IMAGE.name: movq.decode_image.name,
        }
        return tuple(own.get(name, name) for name in MODES[mode].models)

    def embeddings(self, plan: Plan, run: _Run) -> tuple[np.ndarray, np.ndarray]:
        """The image embeddings and their negatives, made as the mode's `Embeddings` part says."""
        part, request = plan.mode.embeddings, plan.request
        if part is PROMPT_PRIOR:
            return self._prior_for(plan, run)
        if part is IMAGE_PRIOR:  # Emb2Emb: the prior starts from the image's embedding
            count = request.num_images_per_prompt
            initial = np.repeat(self.encode_image(request.image, run), count, axis=0)
            return self._prior_for(plan, run, initial)
        if part is IMAGE_EMBEDDING:
            count = request.num_images_per_prompt
            image_embeds = np.repeat(self.encode_image(request.image, run), count, axis=0)
            return image_embeds, self.zero_image_embeds(count)
        if part is FUSION:
            return self.interpolate(plan, run)
        raise ValueError(f"mode {plan.mode.name}: no generation code for embeddings {part.name!r}")

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
        self, plan: Plan, run: _Run, initial: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The prior on the request's prompts (Emb2Emb from `initial` image embeddings when given)."""
        request = plan.request
        return self.prior_embeddings(
            request.prompt, request.negative_prompt, plan=plan, run=run, initial=initial
        )

    def run_prior(
        self,
        prompts: Sequence[str],
        uncond_prompts: Sequence[str],
        *,
        plan: Plan,
        run: _Run,
        initial: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """KandinskyV22PriorPipeline's loop for `prompts`; returns image_embeds and zero_image_embeds.

        It runs the plan's prior scheduler on the plan's prior timesteps, with the request's images per
        prompt and guidance scale. With `initial` image embeddings (KandinskyV22PriorEmb2EmbPipeline) the
        loop starts from them, tiled over the batch and noised at the first of the timesteps (those
        `strength` keeps), instead of from noise. Like diffusers, the raw CLIP embedding is noised as it
        is (not normalised with clip_mean/std).
        """
        num_images_per_prompt = plan.request.num_images_per_prompt
        guidance_scale = plan.request.prior_guidance_scale
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
            scheduler, timesteps = plan.prior_scheduler, plan.prior_timesteps
            shape = (len(prompts) * num_images_per_prompt, self.info.dims.embed_dim)
            if initial is None:
                latents = run.noise.randn(shape) * np.float32(scheduler.init_noise_sigma)
            else:
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
        plan: Plan,
        run: _Run,
        initial: np.ndarray | None = None,
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
        out = self.run_prior(prompts, uncond, plan=plan, run=run, initial=initial)
        if negative_prompt is None:
            return out["image_embeds"], out["zero_image_embeds"]
        positive, negative = np.split(out["image_embeds"], 2)
        return positive, negative

    def skip_prior(self, plan: Plan, batch: int, noise: NoiseSource) -> None:
        """Consume the random draws of a prior run whose result diffusers computes and discards.

        `KandinskyV22PriorPipeline.interpolate` always runs the prior on its `negative_prompt`, even when
        it then returns the zero-image embedding. Skipping the network calls but not the draws keeps every
        later draw (the decoder's) where diffusers has it: the scheduler runs on a constant prediction.
        """
        latents = noise.randn((batch, self.info.dims.embed_dim))
        denoise(
            latents,
            plan.prior_timesteps,
            plan.prior_scheduler,
            lambda x, t: np.zeros_like(x),
            noise,
            pass_prev_timestep=True,
        )

    def interpolate(self, plan: Plan, run: _Run) -> tuple[np.ndarray, np.ndarray]:
        """KandinskyV22PriorPipeline.interpolate: the weighted sum of the items' image embeddings.

        A prompt runs the prior (with `negative_prior_prompt` as its negative); an image is CLIP-encoded.
        The negative embedding is the zero-image embedding when `negative_prompt` is empty (the prior
        output of `negative_prior_prompt` when that is given), else the prior output of `negative_prompt`.
        """
        request = plan.request
        per_prompt = request.num_images_per_prompt
        negative_prior = None if request.negative_prior_prompt is None else [request.negative_prior_prompt]
        negative_prompt = request.negative_prompt or ""

        def prior(prompt: str) -> tuple[np.ndarray, np.ndarray]:
            return self.prior_embeddings([prompt], negative_prior, plan=plan, run=run)

        weighted = []
        for item, weight in zip(request.images_and_prompts, request.weights, strict=True):
            if isinstance(item, str):
                embeds = prior(item)[0]
            else:
                embeds = np.repeat(self.encode_image(item, run), per_prompt, axis=0)
            weighted.append(embeds * np.float32(weight))
        image_embeds = np.sum(np.stack(weighted), axis=0, dtype=np.float32)

        # diffusers always runs the prior once more on `negative_prompt`, and keeps what it needs of it.
        if not fusion_runs_negative_prior(request):
            self.skip_prior(plan, per_prompt, run.noise)  # the zero-image embedding
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

    def decoder_start(self, plan: Plan, batch: int, run: _Run) -> DecoderStart:
        """Where the decoder loop starts, as the mode's `Decoder` part says, on the mode's UNet (with the
        request's hint, which only the ControlNet modes take)."""
        request, part = plan.request, plan.mode.decoder
        scheduler, timesteps = plan.start_decoder()
        extra_channels = after_step = None
        if part.picture is None:  # KandinskyV22Pipeline: noise scaled by init_noise_sigma
            latents = self._initial_noise(request, batch, run) * np.float32(scheduler.init_noise_sigma)
        else:
            picture, mask = decoder_picture(request, part)
            rgb = resize_for_movq(picture, request.height, request.width)
            image_latents = self.encode_latents(rgb, run, self.movq(request.mode))
            if part.inpainting:
                repaint = repaint_mask(mask, request.height, request.width)
                keep = latent_keep_mask(repaint, image_latents.shape[-2:])
                latents, extra_channels, after_step = self.inpainting_start(
                    request, scheduler, timesteps, batch, image_latents, keep, run
                )
            else:
                latents = self.noised_image(request, scheduler, timesteps, batch, image_latents, run)
        hint = {} if request.hint is None else {"hint": hint_array(request.hint)}
        return DecoderStart(
            plan.mode.unet.spec, scheduler, timesteps, latents, extra_channels, after_step, hint
        )

    def noised_image(
        self,
        request: GenerationRequest,
        scheduler: Any,
        timesteps: np.ndarray,
        batch: int,
        image_latents: np.ndarray,
        run: _Run,
    ) -> np.ndarray:
        """KandinskyV22Img2ImgPipeline: the image latents noised at the first of the timesteps `strength`
        keeps (one draw of the image's shape, broadcast over the batch)."""
        draw = run.noise.randn(image_latents.shape)
        latents = scheduler.add_noise(image_latents, draw, np.repeat(timesteps[:1], batch))
        return np.ascontiguousarray(np.broadcast_to(latents, self._latent_shape(request, batch)))

    def inpainting_start(
        self,
        request: GenerationRequest,
        scheduler: Any,
        timesteps: np.ndarray,
        batch: int,
        image_latents: np.ndarray,
        keep_mask: np.ndarray,
        run: _Run,
    ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, int], np.ndarray]]:
        """KandinskyV22InpaintPipeline: the UNet sees [latents, masked image latents, keep mask]; after
        each step the known region (keep_mask [1, 1, h, w], 1 = keep) is replaced by the image latents
        noised to the next timestep. Returns (start latents, extra_channels, after_step).

        The re-noising uses the loop's standard-normal draw. diffusers passes the draw already scaled by
        init_noise_sigma, which is the same for every scheduler but the Euler ones (init_noise_sigma > 1),
        where it would over-noise the known region; we follow the intent (see docs/schedulers.md).
        """
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

        return latents, extra_channels, after_step

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
