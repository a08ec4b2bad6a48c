"""The baseline users would otherwise run: diffusers' KandinskyV22PriorPipeline + KandinskyV22Pipeline.

Same checkpoint, steps, guidance and size as the served run. Stage times come from hooks on the
pipelines' own modules, so the baseline is broken down like the client: prompt encoding (text encoder),
prior loop (the rest of the prior pipeline, including diffusers' per-call zero-image embedding), decoder
loop (the rest of the decoder pipeline) and image decoding (MoVQ decode).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .stats import summarize

logger = logging.getLogger(__name__)

STAGES = ("encode_prompt", "prior", "decoder", "decode_image")


class StageClock:
    """Accumulates the wall time spent inside wrapped calls, per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def start(self, stage: str) -> None:
        self._started[stage] = time.perf_counter()

    def stop(self, stage: str) -> None:
        elapsed = time.perf_counter() - self._started.pop(stage)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed

    def wrap(self, stage: str, call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.start(stage)
            try:
                return call(*args, **kwargs)
            finally:
                self.stop(stage)

        return timed

    def reset(self) -> None:
        self.seconds = {}


def load_pipelines(checkpoint_root: Path, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """KandinskyV22PriorPipeline and KandinskyV22Pipeline from a diffusers-format root (prior/, decoder/)."""
    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    torch_dtype = getattr(torch, dtype)
    root = Path(checkpoint_root)
    prior = KandinskyV22PriorPipeline.from_pretrained(root / "prior").to(device=device, dtype=torch_dtype)
    decoder = KandinskyV22Pipeline.from_pretrained(root / "decoder").to(device=device, dtype=torch_dtype)
    prior.set_progress_bar_config(disable=True)
    decoder.set_progress_bar_config(disable=True)
    return prior, decoder


def prior_then_decoder(
    prior: Any,
    decoder: Any,
    *,
    prompt: Any,
    generator: Any,
    negative_prompt: Any = None,
    num_images_per_prompt: int = 1,
    prior_num_inference_steps: int = 25,
    prior_guidance_scale: float = 4.0,
    after_prior: Callable[[], None] | None = None,
    decoder_inputs: Callable[[int], dict[str, Any]] | None = None,
    **decoder_options: Any,
) -> tuple[Any, Any]:
    """The diffusers driver: KandinskyV22PriorPipeline on the prompt, then `decoder` on its embeddings,
    one generator for both, as a diffusers user chains them. Returns (the decoder's output, the prior's).

    `after_prior()` runs between the two (a stage clock); `decoder_inputs(batch)` gives decoder inputs
    that depend on the prior's batch (inpainting masks, ControlNet hints: one per embedding). Every other
    keyword goes to the decoder (height, width, num_inference_steps, guidance_scale, output_type, ...).
    Used by the benchmark's baseline, the GPU check and the tests' reference pipelines.
    """
    embeds = prior(
        prompt,
        negative_prompt=negative_prompt,
        num_images_per_prompt=num_images_per_prompt,
        num_inference_steps=prior_num_inference_steps,
        guidance_scale=prior_guidance_scale,
        generator=generator,
    )
    if after_prior is not None:
        after_prior()
    extra = decoder_inputs(len(embeds.image_embeds)) if decoder_inputs is not None else {}
    output = decoder(
        image_embeds=embeds.image_embeds,
        negative_image_embeds=embeds.negative_image_embeds,
        generator=generator,
        **extra,
        **decoder_options,
    )
    return output, embeds


class DiffusersBaseline:
    """The two diffusers pipelines, loaded once, with hooks that split each generation into stages."""

    def __init__(
        self,
        checkpoint_root: Path,
        *,
        prompt: str,
        height: int,
        width: int,
        prior_num_inference_steps: int,
        num_inference_steps: int,
        guidance_scale: float,
        prior_guidance_scale: float | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)  # as a user would run it: every core
        self.prompt, self.height, self.width = prompt, height, width
        self.prior_num_inference_steps = prior_num_inference_steps
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.prior_guidance_scale = guidance_scale if prior_guidance_scale is None else prior_guidance_scale
        self.device, self.dtype = device, dtype
        self.prior, self.decoder = load_pipelines(checkpoint_root, device, dtype)
        self.clock = StageClock()
        self.prior.text_encoder.register_forward_pre_hook(lambda *_: self.clock.start("encode_prompt"))
        self.prior.text_encoder.register_forward_hook(lambda *_: self.clock.stop("encode_prompt"))
        self.decoder.movq.decode = self.clock.wrap("decode_image", self.decoder.movq.decode)

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def generate(self, seed: int) -> dict[str, float]:
        """One image, as KandinskyV22PriorPipeline then KandinskyV22Pipeline; seconds per stage and total."""
        import torch

        self.clock.reset()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        start = time.perf_counter()
        prior_done = start

        def prior_finished() -> None:
            nonlocal prior_done
            self._sync()
            prior_done = time.perf_counter()

        with torch.inference_mode():
            prior_then_decoder(
                self.prior,
                self.decoder,
                prompt=self.prompt,
                generator=generator,
                prior_num_inference_steps=self.prior_num_inference_steps,
                prior_guidance_scale=self.prior_guidance_scale,
                after_prior=prior_finished,
                height=self.height,
                width=self.width,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
            )
            self._sync()
        end = time.perf_counter()
        encode = self.clock.seconds.get("encode_prompt", 0.0)
        decode = self.clock.seconds.get("decode_image", 0.0)
        return {
            "encode_prompt": encode,
            "prior": prior_done - start - encode,
            "decoder": end - prior_done - decode,
            "decode_image": decode,
            "total": end - start,
        }

    def summarize(self, runs: list[dict[str, float]], *, interleaved: bool) -> dict[str, Any]:
        import torch

        result = {
            "label": f"diffusers {self.dtype} ({self.device})",
            "device": self.device,
            "dtype": self.dtype,
            "torch_threads": torch.get_num_threads(),
            "interleaved_with_served": interleaved,
            "latency": summarize([r["total"] for r in runs]),
            "stages": {stage: summarize([r[stage] for r in runs]) for stage in STAGES},
            "images_per_s": len(runs) / sum(r["total"] for r in runs),
        }
        logger.info("diffusers baseline p50 %.3fs", result["latency"]["p50"])
        return result


def run_baseline(baseline: DiffusersBaseline, *, warmup: int, repeats: int, progress: bool = True) -> dict:
    """The baseline on its own (when the served part is skipped or not interleaved)."""
    from tqdm.auto import tqdm

    for seed in range(warmup):
        baseline.generate(seed)
    runs = [
        baseline.generate(1000 + i)
        for i in tqdm(range(repeats), desc="diffusers baseline", unit="image", disable=not progress)
    ]
    return baseline.summarize(runs, interleaved=False)
