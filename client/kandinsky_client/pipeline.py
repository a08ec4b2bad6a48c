"""`KandinskyClient`: every Kandinsky 2.2 generation mode against a Triton server, on either loop.

- `loop="client"` (default): the denoising loops run here, one Triton request per network evaluation
  (`generation.Generator` over `transport.TritonTransport`). It is the parity and debugging path, and
  the only one that can replay recorded noise or replace latents from a step callback.
- `loop="server"`: one streamed request per generation to the server's `kandinsky` model, which runs
  the same `Generator` next to the models (`remote.RemoteGenerator`).

Both take the same arguments (the fields of `request.GenerationRequest`, named as in diffusers) and
return the same `Generation`; both check the request here first, with the same messages the server uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kandinsky_core.errors import InvalidRequest
from kandinsky_core.generation import Generation, Generator, StepCallback
from kandinsky_core.noise import NoiseSource
from kandinsky_core.request import (
    CONTROLNET,
    CONTROLNET_IMAGE_TO_IMAGE,
    EMB2EMB,
    FUSE,
    IMAGE_TO_IMAGE,
    INPAINT,
    OUTPAINT,
    TEXT_TO_IMAGE,
    VARIATIONS,
    GenerationRequest,
)
from kandinsky_core.server_info import ServerInfo
from kandinsky_core.validation import check_request
from kandinsky_core.wire import MODEL_NAME

from .remote import PreviewCallback, RemoteGenerator
from .retry import NO_RETRY, RetryPolicy, with_retries
from .transport import DEFAULT_TIMEOUT_S, TritonTransport

__all__ = ["LOOPS", "Generation", "GenerationRequest", "KandinskyClient", "ServerInfo"]

LOOPS = ("client", "server")


class KandinskyClient:
    """Generates images with a Kandinsky 2.2 model served by Triton (see the README for the server).

    Every mode method takes the request fields as keywords (`num_inference_steps`, `guidance_scale`,
    `height`, `seed`, ...; see `GenerationRequest`), plus:
    - `callback_on_step_end(stage, step, timestep, latents)`: after every denoising step; `stage` is
      "prior" or "decoder", `step` the 0-based index in that loop. On the client loop it gets the latents
      and may return replacements; on the server loop `latents` is None. Raising from it cancels.
    - `noise`: a `NoiseSource` replacing the seeded draws (client loop only; parity tests use it).
    - `on_preview(stage, step, images)` and `preview_every`: preview images from the server loop.

    `retry` (retry.py) says which failures are tried again: each step of the client loop, or a whole
    server-side generation (its step callback then sees the steps again).
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        loop: str = "client",
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if loop not in LOOPS:
            raise InvalidRequest("loop", f"is {loop!r}; valid values: {', '.join(LOOPS)}")
        headers = dict(headers or {})
        if token:
            headers["authorization"] = f"Bearer {token}"  # lowercase: gRPC metadata keys must be
        self.loop = loop
        self.retry = retry or RetryPolicy()
        self.transport = TritonTransport(url, protocol, timeout_s, headers, self.retry)
        self.transport.check_live()
        self._info: ServerInfo | None = None
        self._generator: Generator | None = None

    @property
    def info(self) -> ServerInfo:
        if self._info is None:
            self.transport.require_ready(["prior", "unet"])
            self._info = ServerInfo.read(self.transport.model_parameters)
        return self._info

    @property
    def generator(self) -> Generator:
        """The client-side loop (also usable directly, e.g. for its building blocks)."""
        if self._generator is None:
            self._generator = Generator(self.transport, self.info)
        return self._generator

    def check(self, request: GenerationRequest) -> GenerationRequest:
        """`request` checked against this server's limits and normalised (InvalidRequest otherwise)."""
        return check_request(request, self.info)

    def total_steps(self, request: GenerationRequest) -> int:
        """How many denoising steps (step callbacks) the request runs, for progress bars."""
        return self.generator.total_steps(self.check(request))

    def generate(
        self,
        request: GenerationRequest,
        *,
        callback_on_step_end: StepCallback | None = None,
        noise: NoiseSource | None = None,
        on_preview: PreviewCallback | None = None,
        preview_every: int = 0,
    ) -> Generation:
        """Run one request on this client's loop."""
        checked = self.check(request)
        if self.loop == "client":
            if on_preview is not None:
                raise InvalidRequest("on_preview", "previews come from the server loop (loop='server')")
            self.transport.require_ready(self.generator.required_models(checked.mode))
            return self.generator.generate(checked, noise, callback_on_step_end)
        if noise is not None:
            raise InvalidRequest("noise", "replayed noise needs the client-side loop (loop='client')")
        self.transport.require_ready([MODEL_NAME])
        remote = RemoteGenerator(
            self.transport.url,
            self.transport.protocol,
            self.transport.timeout_s,
            self.transport.headers,
            self.info.dims.embed_dim,
        )

        # The seed drawn by the check goes to the server, so the result is the same on any try or replica.
        def attempt() -> Generation:
            return remote.generate(
                request.with_values(seed=checked.seed),
                callback_on_step_end=callback_on_step_end,
                on_preview=on_preview,
                preview_every=preview_every,
                shapes=self._output_shapes(checked),
            )

        policy = self.retry if self.retry.retry_generations else NO_RETRY
        return with_retries(policy, "generation", attempt)

    def _output_shapes(self, checked: GenerationRequest) -> dict[str, tuple[int, ...]]:
        batch = (1 if checked.prompt is None else len(checked.prompt)) * checked.num_images_per_prompt
        latent = self.info.latent_size(checked.height, checked.width)
        return {
            "image_np": (batch, checked.height, checked.width, 3),
            "latents": (batch, self.info.dims.latent_channels, *latent),
        }

    def _run(self, mode: str, options: dict[str, Any]) -> Generation:
        extras = {
            k: options.pop(k)
            for k in ("callback_on_step_end", "noise", "on_preview", "preview_every")
            if k in options
        }
        return self.generate(GenerationRequest.build(mode, **options), **extras)

    # -- modes (the keywords are GenerationRequest fields; see the class docstring) ----------------

    def text_to_image(self, prompt: Any, **options: Any) -> Generation:
        """Prompt(s) -> images, as KandinskyV22PriorPipeline followed by KandinskyV22Pipeline."""
        return self._run(TEXT_TO_IMAGE, {"prompt": prompt, **options})

    def variations(self, image: Any, **options: Any) -> Generation:
        """Images like `image`: its CLIP embedding decoded, the zero-image embedding as the negative."""
        return self._run(VARIATIONS, {"image": image, **options})

    def fuse(self, images_and_prompts: Any, weights: Any, **options: Any) -> Generation:
        """KandinskyV22PriorPipeline.interpolate of weighted prompts and images, then decoded."""
        return self._run(FUSE, {"images_and_prompts": images_and_prompts, "weights": weights, **options})

    def image_to_image(self, image: Any, prompt: Any, **options: Any) -> Generation:
        """Redraw `image` towards the prompt; `strength` in (0, 1] is the part of the decoder schedule run.

        The output has `height`/`width`, by default the image's; the image is resized to it first.
        (diffusers 0.42.1 passes (width, height) swapped to its image processor, so for a non-square size
        it resizes to the transposed shape; here the output has the requested height and width.)
        """
        return self._run(IMAGE_TO_IMAGE, {"image": image, "prompt": prompt, **options})

    def emb2emb(self, image: Any, prompt: Any, **options: Any) -> Generation:
        """Image-to-image on the prior side: the prior starts from the image's CLIP embedding."""
        return self._run(EMB2EMB, {"image": image, "prompt": prompt, **options})

    def inpaint(self, image: Any, mask_image: Any, prompt: Any, **options: Any) -> Generation:
        """Repaint the white part of `mask_image` (the image's size) following the prompt."""
        return self._run(INPAINT, {"image": image, "mask_image": mask_image, "prompt": prompt, **options})

    def outpaint(self, image: Any, prompt: Any, **options: Any) -> Generation:
        """Extend `image` by `left`/`top`/`right`/`bottom` pixels and paint the new area (edge pixels
        repeated, then masked); the canvas must fit the server's maximum image size."""
        return self._run(OUTPAINT, {"image": image, "prompt": prompt, **options})

    def controlnet(self, prompt: Any, hint: Any, **options: Any) -> Generation:
        """Text-to-image following a depth map, as KandinskyV22PriorPipeline + KandinskyV22ControlnetPipeline.

        `hint` is the depth map (grayscale or RGB image, bright = near, e.g. transformers'
        depth-estimation output) at the output size; `height`/`width` default to its size. It reaches
        the UNet as pixel / 255 on 3 channels, as diffusers' documented `make_hint` prepares it.
        """
        return self._run(CONTROLNET, {"prompt": prompt, "hint": hint, **options})

    def controlnet_image_to_image(self, image: Any, prompt: Any, hint: Any, **options: Any) -> Generation:
        """Redraw `image` following the prompt and a depth map (KandinskyV22ControlnetImg2ImgPipeline);
        `strength` as in `image_to_image`. The image is resized to the output size, the hint is not."""
        return self._run(
            CONTROLNET_IMAGE_TO_IMAGE, {"image": image, "prompt": prompt, "hint": hint, **options}
        )

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> KandinskyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
