"""One definition per mode (`kandinsky_core.modes`), one decoder scheduler per request.

- Everything a mode is made of comes from its definition: a toy mode defined here (fusion, then
  image-to-image) gets an API method, a CLI subcommand, its field checks, a wire round trip and its step
  count without any other code knowing it, and generates on both loops.
- The definitions give the served modes exactly what they had before they were written this way.
- A request builds one decoder scheduler (and one prior scheduler) on each loop: its check, its step
  counts and its loops share them.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kandinsky_client.cli import build_parser, request_from_args
from kandinsky_client.pipeline import KandinskyClient, add_mode_methods
from kandinsky_core import components as registry
from kandinsky_core.errors import InvalidRequest
from kandinsky_core.generation import DECODER_STAGE, PRIOR_STAGE, Plan
from kandinsky_core.modes import (
    DECODER_UNET,
    FROM_IMAGE,
    FUSION,
    MODES,
    Command,
    Method,
    Mode,
)
from kandinsky_core.request import GenerationRequest, field_specs, mode_fields, required_fields
from kandinsky_core.server_info import ServerInfo
from kandinsky_core.validation import check_request, plan_request
from kandinsky_core.wire import ResponseOptions, input_specs, request_from_inputs, request_inputs
from kandinsky_export.presets import DECODER_SCHEDULER, PRIOR_SCHEDULER

from .conftest import TINY_DIMS
from .reference import picture
from .test_server_generation import MODE_CASES

# Fusion's embeddings decoded from a noised image: a mode the project does not serve, made of its parts.
TOY = Mode(
    "fuse_image_to_image",
    "KandinskyV22PriorPipeline.interpolate + KandinskyV22Img2ImgPipeline",
    FUSION,
    FROM_IMAGE,
    DECODER_UNET,
    Method(
        ("image", "images_and_prompts", "weights"),
        "Redraw `image` towards a weighted mix of prompts and images.",
    ),
    Command(
        "fuse-img2img", ("image", "images_and_prompts"), "redraw an image towards a mix of prompts and images"
    ),
)
IMAGE = picture(64, 64, seed=21)
FOX = picture(40, 48, seed=22)
# The tiny preset's sizes (export/kandinsky_export/presets.py) with the released scheduler configs.
INFO = ServerInfo(
    dims=TINY_DIMS,
    prior_scheduler=PRIOR_SCHEDULER,
    decoder_scheduler=DECODER_SCHEDULER,
    max_image_size=1024,
    max_images_per_request=4,
)
TOY_OPTIONS = {
    "image": IMAGE,
    "images_and_prompts": ["a fox", FOX, "a castle"],
    "weights": [0.5, 0.2, 0.3],
    "negative_prior_prompt": "dark",
    "strength": 0.5,
    "prior_num_inference_steps": 3,
    "num_inference_steps": 4,
}


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Mode:
    """TOY among the modes for one test (the registry is restored afterwards)."""
    monkeypatch.setitem(MODES, TOY.name, TOY)
    return TOY


class _RecordingClient(KandinskyClient):
    """A client without a server: `generate` records the request a mode method built."""

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def generate(self, request: GenerationRequest, **extras: Any) -> Any:  # type: ignore[override]
        self.requests.append(request)
        return extras


# -- a new mode is one definition --------------------------------------------------------------------


def test_a_new_mode_gets_its_api_method(toy: Mode) -> None:
    client_class = type("Client", (_RecordingClient,), {})
    add_mode_methods(client_class)  # what importing the client does for KandinskyClient
    method = client_class.fuse_image_to_image
    assert str(inspect.signature(method)) == (
        "(self, image: 'Any', images_and_prompts: 'Any', weights: 'Any', **options: 'Any') -> 'Generation'"
    )
    assert inspect.getdoc(method) == toy.method.doc
    assert not hasattr(KandinskyClient, toy.name)  # only the class it was added to

    client = client_class()
    noise = object()
    extras = client.fuse_image_to_image(IMAGE, ["a fox"], weights=[1.0], strength=0.6, noise=noise)
    assert extras == {"noise": noise}
    assert client.requests[-1] == GenerationRequest(
        mode=toy.name, image=IMAGE, images_and_prompts=["a fox"], weights=[1.0], strength=0.6
    )
    with pytest.raises(TypeError, match=r"fuse_image_to_image\(\) missing a required argument: 'weights'"):
        client.fuse_image_to_image(IMAGE, ["a fox"])
    with pytest.raises(InvalidRequest) as error:
        client.fuse_image_to_image(IMAGE, ["a fox"], [1.0], mask=IMAGE)
    assert error.value.field == "mask"
    assert "valid parameters: mode, negative_prompt, image, images_and_prompts, weights" in str(error.value)


def test_a_new_mode_gets_its_cli_subcommand(toy: Mode, tmp_path: Path) -> None:
    parser = build_parser()
    argv = ["fuse-img2img", "photo.png", "a fox", "@fox.png", "--weights", "0.4", "0.6", "-o", "out.png"]
    request = request_from_args(parser.parse_args([*argv, "--strength", "0.6"]))
    assert request == GenerationRequest(
        mode=toy.name,
        image="photo.png",
        images_and_prompts=["a fox", Path("fox.png")],
        weights=[0.4, 0.6],
        strength=0.6,
    )
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    toy_parser = sub.choices["fuse-img2img"]
    flags = {option for action in toy_parser._actions for option in action.option_strings}
    assert {"--strength", "--negative-prior-prompt", "--weights"} <= flags
    assert not flags & {"--mask-image", "--hint", "--left", "--latents"}  # other modes' fields
    with pytest.raises(SystemExit):  # --weights is required
        parser.parse_args(argv[:4] + ["-o", "out.png"])


def test_a_new_mode_gets_its_field_checks(toy: Mode) -> None:
    assert mode_fields(toy.name)[:6] == [
        "mode",
        "negative_prompt",
        "image",
        "images_and_prompts",
        "weights",
        "negative_prior_prompt",
    ]
    assert required_fields(toy.name) == ["image", "images_and_prompts", "weights"]
    request = GenerationRequest(mode=toy.name, **TOY_OPTIONS)
    for field, change, message in [
        ("image", {"image": None}, "is required by mode fuse_image_to_image"),
        ("weights", {"weights": None}, "is required by mode fuse_image_to_image"),
        (
            "mask_image",
            {"mask_image": IMAGE},
            "is not used by mode fuse_image_to_image; it applies to: inpaint",
        ),
        ("latents", {"latents": np.zeros((1, 4, 8, 8))}, "is not used by mode fuse_image_to_image"),
        ("prompt", {"prompt": "x"}, "it applies to: text_to_image, image_to_image"),
        ("strength", {"strength": 0.1}, "keeps int(4 x 0.1) = 0 denoising steps"),  # the decoder's steps
    ]:
        with pytest.raises(InvalidRequest) as error:
            check_request(request.with_values(**change), INFO)
        assert error.value.field == field
        assert message in str(error.value)
    checked = check_request(request, INFO)
    assert (checked.height, checked.width) == IMAGE.size  # the decoder's picture sets the size
    assert checked.images_and_prompts[0] == "a fox" and checked.images_and_prompts[1].mode == "RGB"


def test_a_new_mode_goes_over_the_wire(toy: Mode) -> None:
    assert toy.fields <= {name for name, _, _ in input_specs()}
    request = GenerationRequest(mode=toy.name, **TOY_OPTIONS, seed=3)
    received, _ = request_from_inputs(request_inputs(request, ResponseOptions()))
    assert received.mode == toy.name
    client_side, server_side = check_request(request, INFO), check_request(received, INFO)
    for name in toy.fields - {"image", "images_and_prompts"}:
        assert getattr(server_side, name) == getattr(client_side, name), name
    assert np.array_equal(np.asarray(server_side.image), np.asarray(client_side.image))


def test_a_new_mode_gets_its_step_count(toy: Mode) -> None:
    plan = plan_request(GenerationRequest(mode=toy.name, **TOY_OPTIONS), INFO)
    # Fusion runs the prior on each of its 2 prompts and on the negative; img2img keeps int(4 x 0.5) steps.
    assert plan.loop_steps == {PRIOR_STAGE: 3, DECODER_STAGE: 2}
    assert plan.total_steps == 3 * 3 + 2
    assert toy.models == (
        registry.ENCODE_LATENTS.name,
        registry.ENCODE_IMAGE.name,
        registry.ENCODE_PROMPT.name,
        registry.PRIOR.name,
        registry.PRIOR_POSTPROCESS.name,
        registry.UNET.name,
        registry.DECODE_IMAGE.name,
    )


def test_a_new_mode_generates_on_both_loops(toy: Mode, grpc_client, server_model) -> None:
    """The client loop runs the toy from its parts (its embeddings are fusion's, drawn first from the same
    seed), calling back once per counted step; the `kandinsky` model, run in this process, agrees."""
    request = GenerationRequest(mode=toy.name, **TOY_OPTIONS, seed=9)
    steps: list[str] = []
    result = grpc_client.generate(request, callback_on_step_end=lambda stage, *_: steps.append(stage))
    assert len(steps) == grpc_client.total_steps(request) == 11
    assert result.images[0].size == IMAGE.size
    fused = grpc_client.fuse(
        **{k: v for k, v in TOY_OPTIONS.items() if k not in ("image", "strength")},
        height=64,
        width=64,
        seed=9,
    )
    np.testing.assert_array_equal(result.image_embeds, fused.image_embeds)
    np.testing.assert_array_equal(result.negative_image_embeds, fused.negative_image_embeds)

    served = server_model(request)
    assert np.array_equal(np.asarray(served.images[0]), np.asarray(result.images[0]))


# -- the served modes, as they were ------------------------------------------------------------------

_PRIOR_MODELS = ("encode_prompt", "prior", "prior_postprocess")
# What each mode needed, as listed before the modes were definitions.
SERVED_MODELS = {
    "text_to_image": (*_PRIOR_MODELS, "unet", "decode_image"),
    "variations": ("encode_image", "prior_postprocess", "unet", "decode_image"),
    "fuse": ("encode_image", *_PRIOR_MODELS, "unet", "decode_image"),
    "image_to_image": ("encode_latents", *_PRIOR_MODELS, "unet", "decode_image"),
    "emb2emb": ("encode_image", *_PRIOR_MODELS, "unet", "decode_image"),
    "inpaint": ("encode_latents", *_PRIOR_MODELS, "unet_inpaint", "decode_image"),
    "outpaint": ("encode_latents", *_PRIOR_MODELS, "unet_inpaint", "decode_image"),
    "controlnet": (*_PRIOR_MODELS, "unet_controlnet", "decode_image"),
    "controlnet_image_to_image": ("encode_latents", *_PRIOR_MODELS, "unet_controlnet", "decode_image"),
}
_PRIOR = ("negative_prompt", "prior_num_inference_steps", "prior_guidance_scale", "prior_scheduler")
# The fields each mode takes beyond the common ones, and those it requires, as they were.
SERVED_FIELDS = {
    "text_to_image": ({"prompt", *_PRIOR, "latents"}, {"prompt"}),
    "variations": ({"image", "latents"}, {"image"}),
    "fuse": (
        {"images_and_prompts", "weights", "negative_prior_prompt", *_PRIOR, "latents"},
        {"images_and_prompts", "weights"},
    ),
    "image_to_image": ({"prompt", *_PRIOR, "image", "strength"}, {"prompt", "image"}),
    "emb2emb": ({"prompt", *_PRIOR, "image", "strength", "latents"}, {"prompt", "image"}),
    "inpaint": ({"prompt", *_PRIOR, "image", "mask_image", "latents"}, {"prompt", "image", "mask_image"}),
    "outpaint": (
        {"prompt", *_PRIOR, "image", "left", "top", "right", "bottom", "latents"},
        {"prompt", "image"},
    ),
    "controlnet": ({"prompt", *_PRIOR, "hint", "latents"}, {"prompt", "hint"}),
    "controlnet_image_to_image": (
        {"prompt", *_PRIOR, "image", "strength", "hint"},
        {"prompt", "image", "hint"},
    ),
}
COMMON = {
    "mode",
    "num_images_per_prompt",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "scheduler",
    "scheduler_config",
    "output_type",
}


def test_the_definitions_give_each_served_mode_what_it_had() -> None:
    assert list(MODES) == list(SERVED_MODELS)
    for name, mode in MODES.items():
        fields, required = SERVED_FIELDS[name]
        assert mode.fields == COMMON | fields, name
        assert mode.required == required, name
        assert mode.models == SERVED_MODELS[name], name
        # its API method and CLI subcommand take fields of the request that it uses
        assert set(mode.method.args) | set(mode.command.args) <= mode.fields <= set(field_specs())
        signature = inspect.signature(getattr(KandinskyClient, name))
        assert list(signature.parameters) == ["self", *mode.method.args, "options"]
    commands = [mode.command.name for mode in MODES.values()]
    assert len(set(commands)) == len(commands)


def test_a_definition_refuses_parts_that_do_not_fit() -> None:
    from kandinsky_core.modes import INPAINTING, PROMPT_PRIOR, Decoder

    with pytest.raises(ValueError, match="noising or inpainting needs a picture"):
        Decoder("bad", strength=True)
    with pytest.raises(ValueError, match="a picture is either noised or inpainted"):
        Decoder("bad", picture="image", strength=True, inpainting=True)

    with pytest.raises(ValueError, match="inpainting start needs the inpainting UNet"):
        Mode("bad", "", PROMPT_PRIOR, INPAINTING, DECODER_UNET, Method(("prompt",), ""), Command("b", (), ""))
    with pytest.raises(ValueError, match=r"method arguments \['hint'\] are not fields of the mode"):
        Mode("bad", "", PROMPT_PRIOR, FROM_IMAGE, DECODER_UNET, Method(("hint",), ""), Command("b", (), ""))


# -- one scheduler per request -----------------------------------------------------------------------


@pytest.fixture
def built_schedulers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every scheduler built through the factory, by the request field that selects it
    ("scheduler" for the decoder's, "prior_scheduler" for the prior's)."""
    from kandinsky_core.schedulers import factory

    built: list[str] = []
    original = factory.scheduler_from_config

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(kwargs.get("field", "scheduler"))
        return original(*args, **kwargs)

    monkeypatch.setattr(factory, "scheduler_from_config", counting)
    return built


@pytest.fixture(scope="module")
def server_model(tiny_repository, triton_server, grpc_client):
    """Runs a request through the `kandinsky` model in this process (its BLS calls go to the session's
    Triton), as Triton runs it; returns the final `Generation`."""
    from kandinsky_core.wire import generation_from_outputs

    from .test_gpu_serving import _generation_model, _GpuServer, _Request

    bls = _GpuServer(triton_server.grpc_url)
    with pytest.MonkeyPatch.context() as patch:
        model = _generation_model(tiny_repository, bls, patch)

        def serve(request: GenerationRequest):
            served = _Request(request_inputs(request, ResponseOptions(progress=True)))
            model.execute([served])
            assert served.sender.done.wait(120), "the generation did not finish"
            final, _ = served.sender.responses[-1]
            assert not final.has_error(), final.error().message()
            outputs = {tensor.name(): tensor.as_numpy() for tensor in final.output_tensors()}
            return generation_from_outputs(outputs, grpc_client.info.dims.embed_dim)

        yield serve
        model.finalize()
    bls.close()


@pytest.mark.parametrize(("mode", "options"), MODE_CASES)
def test_one_decoder_scheduler_per_request_on_each_loop(
    grpc_client, server_model, built_schedulers, mode, options
) -> None:
    """The check, the step counts and the loop share one decoder scheduler and one prior scheduler;
    before, a request built its decoder scheduler up to four times on each side."""
    request = GenerationRequest.build(mode, seed=5, **options)
    prior = 1 if MODES[mode].embeddings.uses_prior else 0
    expected = ["scheduler"] + ["prior_scheduler"] * prior

    steps = []
    client_loop = grpc_client.generate(request, callback_on_step_end=lambda *step: steps.append(step))
    assert sorted(built_schedulers, reverse=True) == expected, "client loop"
    built_schedulers.clear()

    server_loop = server_model(request)  # the server's check, progress counts and loop
    assert sorted(built_schedulers, reverse=True) == expected, "server loop"
    assert np.array_equal(np.asarray(server_loop.images[0]), np.asarray(client_loop.images[0]))
    built_schedulers.clear()

    plan = grpc_client.plan(request)  # as the CLI does: the plan sizes the progress bar, then runs
    assert plan.total_steps == len(steps)
    again = grpc_client.generate(plan)
    assert sorted(built_schedulers, reverse=True) == expected, "plan, then generate"
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(client_loop.images[0]))


def test_a_plan_runs_again_with_a_multistep_scheduler(grpc_client) -> None:
    """A multistep scheduler keeps state between steps; a plan's second run starts it over."""
    request = GenerationRequest.build(
        "text_to_image",
        prompt="a cat",
        scheduler="DPMSolverMultistepScheduler",
        height=64,
        width=64,
        num_inference_steps=4,
        prior_num_inference_steps=3,
        seed=8,
    )
    plan = grpc_client.plan(request)
    assert isinstance(plan, Plan)
    first, second = grpc_client.generate(plan), grpc_client.generate(plan)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(grpc_client.generate(request).images[0]))
