"""A short real run of the bundle's own FP32 graphs, recording what each component is fed.

The FP16 check (`fp16.py`) must see the inputs a component really gets: a MoVQ decoder fed N(0, 1) noise
instead of the UNet's denoised latents, or a UNet fed random latents at a size no one generates, says
little about where FP16 overflows. This runs the generation core (`kandinsky_core.generation`, the
code the server runs) over ONNX Runtime sessions of the bundle's FP32 files and the served models'
numpy pre/post-processing, at the size asked (the engines' optimum), and records every network call:

- text_encoder, prior, unet, movq_decoder: a text-to-image generation with a negative prompt;
- image_encoder, movq_encoder: the generated image, encoded as the image modes encode an input image;
- unet_inpaint (and the inpainting repo's own MoVQ, where exported): an inpainting generation on that
  image with a centred mask (when the bundle has it);
- unet_controlnet: a ControlNet generation with that image's luminance as the depth hint (when present),
  left undecoded so that the MoVQ decoder's verdict does not change with whether a ControlNet is served
  (with it decoded, the tiny preset's random MoVQ overflowed in FP16 on those latents: 255 levels off).

`check_inputs` then picks, per component, a batch from those calls (the first, middle and last denoising
step for the per-step models). Nothing here needs torch: it runs wherever the bundle is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kandinsky_core import bundle as layout
from kandinsky_core import components as registry
from kandinsky_core.components import COMPONENTS, MAX_IMAGES_PER_REQUEST, ModelDims, ModelSpec
from kandinsky_core.generation import Generator
from kandinsky_core.processing import (
    ClipPreprocessing,
    clip_preprocess,
    load_tokenizer,
    movq_preprocess,
    to_uint8_rgb,
    tokenize,
)
from kandinsky_core.request import CONTROLNET, INPAINT, TEXT_TO_IMAGE, GenerationRequest
from kandinsky_core.server_info import ServerInfo
from kandinsky_core.validation import check_request
from PIL import Image

PROMPT = "a photograph of a red fox in the snow at sunrise, highly detailed"
NEGATIVE_PROMPT = "blurry, low quality"
PRIOR_STEPS = 4
DECODER_STEPS = 4
SEED = 0


@dataclass
class RecordedRun:
    """Every network call of the run, by component, in call order."""

    size: tuple[int, int]
    calls: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def record(self, component: str, inputs: Mapping[str, np.ndarray]) -> None:
        self.calls.setdefault(component, []).append({k: np.array(v) for k, v in inputs.items()})


def onnx_file(bundle: Path, component: str, precision: str = "fp32") -> Path:
    """The ONNX file of `component` in `precision`: fp32, fp16, or default (the bundle's measured choice)."""
    entry = json.loads(layout.manifest_path(bundle).read_text())["components"][component]
    if precision == "default":
        precision = entry.get("default_precision", "fp32")
    if precision == "fp32":
        return Path(bundle) / component / layout.ONNX_FILE
    return Path(bundle) / component / entry["variants"][precision]["path"]


class BundleInfer:
    """`Infer` over a bundle: its ONNX graphs on ONNX Runtime (FP32 unless `precision` says otherwise),
    and the served models' numpy code for tokenizing and pre/post-processing."""

    def __init__(
        self, bundle: Path, providers: Sequence[str] = ("CPUExecutionProvider",), precision: str = "fp32"
    ) -> None:
        self.bundle = Path(bundle)
        self.providers = list(providers)
        self.precision = precision
        self.tokenizer = load_tokenizer(self.bundle / layout.TOKENIZER_DIR)
        self.clip = ClipPreprocessing.from_file(self.bundle / layout.IMAGE_PROCESSOR_CONFIG)
        constants = self.bundle / layout.CONSTANTS_DIR
        self.clip_mean = np.load(constants / "clip_mean.npy").astype(np.float32)
        self.clip_std = np.load(constants / "clip_std.npy").astype(np.float32)
        self.zero_image_embeds = np.load(constants / "zero_image_embeds.npy").astype(np.float32)
        self.sessions: dict[str, Any] = {}
        self.recording: RecordedRun | None = None

    def network(self, name: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        from .onnx_export import onnx_session, run_session

        spec = COMPONENTS[name]
        feed = {
            t.name: np.asarray(inputs[t.name], dtype=t.dtype).reshape(_shape(t, inputs)) for t in spec.inputs
        }
        if self.recording is not None:
            self.recording.record(name, feed)
        if name not in self.sessions:
            self.sessions[name] = onnx_session(onnx_file(self.bundle, name, self.precision), self.providers)
        return run_session(self.sessions[name], feed)

    def infer(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = spec.name
        if name in COMPONENTS:
            return self.network(name, inputs)
        if name == registry.ENCODE_PROMPT.name:
            prompts = [
                p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in np.ravel(inputs["prompt"])
            ]
            tokens = tokenize(self.tokenizer, prompts)
            return {**self.network("text_encoder", tokens), "attention_mask": tokens["attention_mask"]}
        if name == registry.PRIOR_POSTPROCESS.name:
            latents = np.asarray(inputs["latents"], np.float32)
            return {
                "image_embeds": latents * self.clip_std + self.clip_mean,
                "zero_image_embeds": np.repeat(self.zero_image_embeds[None, :], len(latents), axis=0),
            }
        if name in (registry.DECODE_IMAGE.name, registry.DECODE_IMAGE_INPAINT.name):
            decoder = spec.steps[0]  # the decoder's MoVQ, or the inpainting repo's own
            return {"image_rgb": to_uint8_rgb(self.network(decoder, inputs)["image"])}
        if name == registry.ENCODE_IMAGE.name:
            pixels = clip_preprocess(np.asarray(inputs["image_rgb"], np.uint8), self.clip)
            return self.network("image_encoder", {"pixel_values": pixels})
        if name in (registry.ENCODE_LATENTS.name, registry.ENCODE_LATENTS_INPAINT.name):
            encoder = spec.steps[-1]
            return self.network(encoder, {"image": movq_preprocess(np.asarray(inputs["image_rgb"]))})
        raise KeyError(f"the bundle runner does not serve '{name}'")


def _shape(tensor: registry.TensorSpec, inputs: Mapping[str, Any]) -> tuple[int, ...]:
    """Per-item scalars (the timestep) as [batch]: the ONNX graphs take them so."""
    value = np.asarray(inputs[tensor.name])
    return (-1,) if tensor.shape == (registry.BATCH,) else value.shape


def bundle_info(manifest: Mapping[str, Any], max_image_size: int) -> ServerInfo:
    """What a server of this bundle would tell its clients (any size up to `max_image_size`)."""
    schedulers = manifest["schedulers"]
    return ServerInfo(
        dims=ModelDims.from_dict(manifest["dims"]),
        prior_scheduler=schedulers["prior"],
        decoder_scheduler=schedulers["decoder"],
        max_image_size=max_image_size,
        max_images_per_request=MAX_IMAGES_PER_REQUEST,
        inpaint_scheduler=schedulers.get("decoder_inpaint"),
        controlnet_scheduler=schedulers.get("controlnet"),
        inpaint_own_movq=registry.MOVQ_DECODER_INPAINT.name in manifest["components"],
    )


def record_run(
    bundle: Path, size: tuple[int, int], *, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> RecordedRun:
    """Run the generations above at `size` (height, width) and record every network call.

    Always the same run, whichever components are being checked: a component's verdict must not depend
    on which others are converted with it (the MoVQ decoder decodes both generations' latents).
    """
    bundle = Path(bundle)
    manifest = json.loads(layout.manifest_path(bundle).read_text())
    infer = BundleInfer(bundle, providers)
    info = bundle_info(manifest, max(size))
    generator = Generator(infer, info)
    height, width = size
    common = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "height": height,
        "width": width,
        "prior_num_inference_steps": PRIOR_STEPS,
        "num_inference_steps": DECODER_STEPS,
        "seed": SEED,
    }
    run = RecordedRun(size)
    infer.recording = run
    result = generator.generate(check_request(GenerationRequest(mode=TEXT_TO_IMAGE, **common), info))
    picture = result.images[0]
    rgb = np.asarray(picture.convert("RGB"), dtype=np.uint8)[None]
    if "image_encoder" in manifest["components"]:
        infer.infer(registry.ENCODE_IMAGE, {"image_rgb": rgb})
    if "movq_encoder" in manifest["components"]:
        infer.infer(registry.ENCODE_LATENTS, {"image_rgb": rgb})
    if "unet_inpaint" in manifest["components"]:
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255  # white = repaint
        request = GenerationRequest(mode=INPAINT, image=picture, mask_image=Image.fromarray(mask), **common)
        generator.generate(check_request(request, info))
    if registry.UNET_CONTROLNET.name in manifest["components"]:
        request = GenerationRequest(
            mode=CONTROLNET, hint=picture.convert("L"), output_type="latent", **common
        )
        generator.generate(check_request(request, info))
    infer.recording = None
    return run


def check_inputs(run: RecordedRun, component: str) -> dict[str, np.ndarray]:
    """One batch of recorded inputs for `component`: for the per-step models the first, middle and last
    step (early steps see noise, late ones nearly clean latents), else every call, within the max batch."""
    calls = run.calls.get(component)
    if not calls:
        raise KeyError(f"the recorded run made no call to {component}")
    spec = COMPONENTS[component]
    if spec.called_per_step:
        picks = sorted({0, len(calls) // 2, len(calls) - 1})
        calls = [calls[i] for i in picks]
    batch: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        batch[tensor.name] = np.concatenate([call[tensor.name] for call in calls])[: spec.max_batch_size]
    return batch
