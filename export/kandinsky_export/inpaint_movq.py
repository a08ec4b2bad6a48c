"""Which MoVQ inpainting is served with: the decoder's where the inpainting repo's own is the same model,
else its own.

diffusers' `KandinskyV22InpaintPipeline` encodes and decodes with the MoVQ of the inpainting repository
(`kandinsky-2-2-decoder-inpaint/movq`). The export compares it with the decoder's before exporting anything:

- same config and same tensors (as loaded and exported: float32): one MoVQ export is shared, and the
  manifest records both digests (`movq` entry, `"decoder_inpaint_movq": "decoder"`);
- different: the inpainting repo's MoVQ is exported as components of its own (`movq_encoder_inpaint`,
  `movq_decoder_inpaint`; `"decoder_inpaint_movq": "decoder_inpaint"`), which inpainting and outpainting
  then use (the repository writes `unet_inpaint`'s `own_movq` parameter and the `*_inpaint` ensembles).
  `kandinsky-export onnx --allow-inpaint-movq-mismatch` shares the decoder's MoVQ anyway (one MoVQ less
  to serve; inpainting then differs from diffusers'), recorded as
  `"decoder_inpaint_movq": "decoder (differs from decoder_inpaint/movq)"`.
  Its latent channels and scale factor must be the decoder's: the served tensor shapes assume one set.

The digest is over the loaded tensors and the config, not the files: the same weights saved as `.bin`
or `.safetensors`, or with other safetensors metadata, are the same model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from kandinsky_core.components import INPAINT_MOVQ_COMPONENTS

from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)

MOVQ_SUBFOLDER = "movq"
# The part whose MoVQ the bundle exports, and the parts that ship a MoVQ of their own.
MOVQ_SOURCE_PART = "decoder"
OWN_MOVQ_PARTS = ("decoder_inpaint",)
# The flag that shares the decoder's MoVQ even where the inpainting repo's differs.
ALLOW_MISMATCH_FLAG = "--allow-inpaint-movq-mismatch"
# Which components serve each part's own MoVQ (exported only where it differs from the decoder's).
OWN_MOVQ_COMPONENTS = {"decoder_inpaint": INPAINT_MOVQ_COMPONENTS}


class InpaintMovqMismatch(RuntimeError):
    """The inpainting repo's MoVQ cannot be served next to the decoder's (other latent shapes)."""


def movq_digest(checkpoint: Checkpoint, part: str) -> str | None:
    """sha256 over a part's MoVQ config (without `_` keys) and float32 tensors; None if it ships none."""
    if checkpoint.fetch(part, f"{MOVQ_SUBFOLDER}/config.json", required=False) is None:
        return None
    from diffusers import VQModel

    model = VQModel.from_pretrained(
        checkpoint.part(part), subfolder=MOVQ_SUBFOLDER, revision=checkpoint.revision(part)
    ).float()
    digest = hashlib.sha256()
    config = {key: value for key, value in model.config.items() if not key.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def movq_record(checkpoint: Checkpoint, allow_mismatch: bool = False) -> dict[str, Any]:
    """The manifest's `movq` entry: per part with a MoVQ of its own, whose MoVQ it is served with.

    Raises InpaintMovqMismatch where a part's own MoVQ has other latent shapes than the decoder's.
    """
    exported = movq_digest(checkpoint, MOVQ_SOURCE_PART)
    record: dict[str, Any] = {"exported_from": MOVQ_SOURCE_PART, "digests": {MOVQ_SOURCE_PART: exported}}
    for part in OWN_MOVQ_PARTS:
        if not checkpoint.has(part):
            continue
        own = movq_digest(checkpoint, part)
        record["digests"][part] = own
        if own is None or own == exported:
            record[f"{part}_movq"] = MOVQ_SOURCE_PART  # none of its own, or the same model: shared
            continue
        message = (
            f"{checkpoint.part(part)}/{MOVQ_SUBFOLDER} differs from {checkpoint.part(MOVQ_SOURCE_PART)}/"
            f"{MOVQ_SUBFOLDER} (sha256 of config and tensors {own[:12]} vs {exported[:12]})"
        )
        if allow_mismatch:
            logger.warning(
                "%s: serving inpainting with the decoder's MoVQ (%s)", message, ALLOW_MISMATCH_FLAG
            )
            record[f"{part}_movq"] = f"{MOVQ_SOURCE_PART} (differs from {part}/{MOVQ_SUBFOLDER})"
            continue
        _check_shapes(checkpoint, part, message)
        logger.info("%s: exporting it as %s", message, ", ".join(OWN_MOVQ_COMPONENTS[part]))
        record[f"{part}_movq"] = part
    return record


def own_movq_components(record: dict[str, Any]) -> list[str]:
    """The components serving a part's own MoVQ that `record` (movq_record's) says to export."""
    return [
        name
        for part, names in OWN_MOVQ_COMPONENTS.items()
        if record.get(f"{part}_movq") == part
        for name in names
    ]


def _check_shapes(checkpoint: Checkpoint, part: str, message: str) -> None:
    """Refuse an own MoVQ whose latents differ in shape from the decoder's (one ModelDims serves both)."""
    own, shared = (
        checkpoint.read_json(source, f"{MOVQ_SUBFOLDER}/config.json") for source in (part, MOVQ_SOURCE_PART)
    )
    if _latent_geometry(own) != _latent_geometry(shared):
        raise InpaintMovqMismatch(
            f"{message}, and its latents (channels, scale levels) {_latent_geometry(own)} differ from the "
            f"decoder's {_latent_geometry(shared)}; export without the {part} part"
        )


def _latent_geometry(config: dict[str, Any]) -> tuple[int, int]:
    """What the served shapes take from a MoVQ config: latent channels and downscale levels (ModelDims)."""
    return int(config["latent_channels"]), len(config["block_out_channels"])
