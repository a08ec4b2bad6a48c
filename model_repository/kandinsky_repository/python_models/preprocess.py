"""Pre-processing models: uint8 RGB images -> the inputs of the CLIP image encoder and the MoVQ encoder.

`preprocess_clip_image` does what the checkpoint's `CLIPImageProcessor` does (transformers' PIL
backend, which diffusers' prior pipelines use): resize the shortest edge with PIL (bicubic), center
crop, rescale, normalise with the CLIP mean/std, every setting read from the checkpoint's
`preprocessor_config.json`. transformers itself cannot be imported in the python backend stub (it pulls
in ssl), so this is numpy + PIL, with the same operations in the same order and dtypes; a unit test
checks it against transformers pixel for pixel.

`preprocess_movq_image` maps uint8 to [-1, 1] as diffusers' `VaeImageProcessor` does
(`2 * (x / 255) - 1` in float32, identical to the inpainting pipeline's `x / 127.5 - 1` for every uint8
value). It does not resize: the image arrives at the generation size, because the client resizes it with
the very PIL call diffusers makes (`resize((width, height), BICUBIC, reducing_gap=1)`) while building the
request, which also keeps large photos off the wire.

Size limits (config parameters written by the repository generator), checked on the declared shape
before any pixel is read, so that one request cannot make the backend allocate gigabytes:
`preprocess_movq_image` takes sides up to the repository's `max_image_size` (the largest generation);
`preprocess_clip_image` up to `max_input_side` (`MAX_INPUT_IMAGE_SIDE` of the registry; the client
downscales larger photos).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from kandinsky_core.bundle import IMAGE_PROCESSOR_CONFIG
from kandinsky_core.components import MAX_IMAGE_SIZE, MAX_INPUT_IMAGE_SIDE
from kandinsky_core.processing import ClipPreprocessing, clip_preprocess, movq_preprocess

from .base import BatchingModel, InvalidInput, require_side

# Used when a repository's config has no limit parameter (written by an older generator).
DEFAULT_MAX_IMAGE_SIZE = MAX_IMAGE_SIZE


def require_image(name: str, shape: Sequence[int], max_side: int) -> None:
    """The declared shape of a batch of uint8 HWC RGB images, with both sides in [1, max_side]."""
    if len(shape) != 4 or shape[-1] != 3:
        raise InvalidInput(f"input '{name}' has shape {list(shape)}; expected [batch, height, width, 3]")
    require_side(name, "height", shape[1], max_side)
    require_side(name, "width", shape[2], max_side)


class PreprocessClipImage(BatchingModel):
    def setup(self, parameters: Mapping[str, str]) -> None:
        path = self.version_dir / IMAGE_PROCESSOR_CONFIG  # placed there by the generator
        self.settings = ClipPreprocessing.from_file(path)
        self.max_side = int(parameters.get("max_input_side", MAX_INPUT_IMAGE_SIDE))

    def validate_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        require_image("image_rgb", shapes["image_rgb"], self.max_side)

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"pixel_values": clip_preprocess(inputs["image_rgb"], self.settings)}


class PreprocessMovqImage(BatchingModel):
    def setup(self, parameters: Mapping[str, str]) -> None:
        self.max_side = int(parameters.get("max_image_size", DEFAULT_MAX_IMAGE_SIZE))

    def validate_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        require_image("image_rgb", shapes["image_rgb"], self.max_side)

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": movq_preprocess(inputs["image_rgb"])}


__all__: Sequence[str] = ["PreprocessClipImage", "PreprocessMovqImage"]
