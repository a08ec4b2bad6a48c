"""Post-processing models: prior latents -> image embeddings, and MoVQ output -> uint8 RGB."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from kandinsky_core.components import MAX_IMAGE_SIZE
from kandinsky_core.processing import to_uint8_rgb

from .base import BatchingModel, InvalidInput, require_finite, require_side

# Used when a repository's config has no limit parameter (written by an older generator).
DEFAULT_MAX_IMAGE_SIZE = MAX_IMAGE_SIZE


class PostprocessImage(BatchingModel):
    """Sides limited to the repository's `max_image_size` (the largest generation), checked on the
    declared shape before the data is read."""

    def setup(self, parameters: Mapping[str, str]) -> None:
        self.max_side = int(parameters.get("max_image_size", DEFAULT_MAX_IMAGE_SIZE))

    def validate_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        shape = shapes["image"]
        if len(shape) != 4 or shape[1] != 3:
            raise InvalidInput(f"input 'image' has shape {list(shape)}; expected [batch, 3, height, width]")
        require_side("image", "height", shape[2], self.max_side)
        require_side("image", "width", shape[3], self.max_side)

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        require_finite("image", inputs["image"])

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image_rgb": to_uint8_rgb(inputs["image"])}


class PriorPostprocess(BatchingModel):
    """PriorTransformer.post_process_latents, plus the constant zero-image embedding for the batch."""

    def setup(self, parameters: Mapping[str, str]) -> None:
        self.clip_mean = np.load(self.version_dir / "clip_mean.npy").astype(np.float32)
        self.clip_std = np.load(self.version_dir / "clip_std.npy").astype(np.float32)
        self.zero_image_embeds = np.load(self.version_dir / "zero_image_embeds.npy").astype(np.float32)

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        require_finite("latents", inputs["latents"])

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        latents = inputs["latents"].astype(np.float32)
        return {
            "image_embeds": latents * self.clip_std + self.clip_mean,
            "zero_image_embeds": np.repeat(self.zero_image_embeds[None, :], len(latents), axis=0),
        }
