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

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from kandinsky_core.errors import InvalidRequest
from kandinsky_core.generation import Generation, Generator, Plan, StepCallback
from kandinsky_core.modes import MODES, Mode
from kandinsky_core.noise import NoiseSource
from kandinsky_core.request import GenerationRequest
from kandinsky_core.server_info import ServerInfo
from kandinsky_core.validation import plan_request
from kandinsky_core.wire import MODEL_NAME

from .remote import PreviewCallback, RemoteGenerator
from .retry import NO_RETRY, RetryPolicy, with_retries
from .transport import DEFAULT_TIMEOUT_S, TritonTransport

__all__ = ["LOOPS", "Generation", "GenerationRequest", "KandinskyClient", "Plan", "ServerInfo"]

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
        return self.plan(request).request

    def plan(self, request: GenerationRequest) -> Plan:
        """`request` checked and planned: its schedulers and step counts (`total_steps`), ready for
        `generate` (which then neither checks nor builds a scheduler again)."""
        return plan_request(request, self.info)

    def total_steps(self, request: GenerationRequest) -> int:
        """How many denoising steps (step callbacks) the request runs, for progress bars."""
        return self.plan(request).total_steps

    def generate(
        self,
        request: GenerationRequest | Plan,
        *,
        callback_on_step_end: StepCallback | None = None,
        noise: NoiseSource | None = None,
        on_preview: PreviewCallback | None = None,
        preview_every: int = 0,
    ) -> Generation:
        """Run one request (or its `plan`) on this client's loop."""
        plan = request if isinstance(request, Plan) else self.plan(request)
        checked = plan.request
        if self.loop == "client":
            if on_preview is not None:
                raise InvalidRequest("on_preview", "previews come from the server loop (loop='server')")
            self.transport.require_ready(self.generator.required_models(checked.mode))
            return self.generator.generate(plan, noise, callback_on_step_end)
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
                plan.source.with_values(seed=checked.seed),
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

    # The mode methods (`text_to_image`, `inpaint`, ...: one per mode, named after it) are made from the
    # modes' definitions (`kandinsky_core.modes`) by `add_mode_methods` below.

    def _run(self, mode: str, options: dict[str, Any]) -> Generation:
        extras = {
            k: options.pop(k)
            for k in ("callback_on_step_end", "noise", "on_preview", "preview_every")
            if k in options
        }
        return self.generate(GenerationRequest.build(mode, **options), **extras)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> KandinskyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mode_method(mode: Mode) -> Callable[..., Generation]:
    """The `KandinskyClient` method of `mode`, from its definition: its positional parameters (request
    fields), then any request field as a keyword; named, documented and inspectable as a written one."""
    parameters = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *(
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="Any")
            for n in mode.method.args
        ),
        inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD, annotation="Any"),
    ]
    # String annotations: what the written methods had under `from __future__ import annotations`.
    signature = inspect.Signature(parameters, return_annotation="Generation")

    def method(self: KandinskyClient, *args: Any, **options: Any) -> Generation:
        try:
            bound = signature.bind(self, *args, **options)
        except TypeError as error:
            raise TypeError(f"{method.__qualname__}() {error}") from None
        named = {name: bound.arguments[name] for name in mode.method.args}
        return self._run(mode.name, {**named, **bound.arguments.get("options", {})})

    method.__name__ = mode.name
    method.__qualname__ = f"{KandinskyClient.__qualname__}.{mode.name}"
    method.__doc__ = mode.method.doc
    method.__signature__ = signature  # type: ignore[attr-defined]
    return method


def add_mode_methods(cls: type[KandinskyClient]) -> None:
    """Give `cls` the method of every mode in `MODES` it lacks (KandinskyClient gets them on import)."""
    for mode in MODES.values():
        if not hasattr(cls, mode.name):
            setattr(cls, mode.name, mode_method(mode))


add_mode_methods(KandinskyClient)
