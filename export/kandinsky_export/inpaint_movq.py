"""Which MoVQ inpainting is served with: the decoder's, only where the inpainting repo's own is the same.

diffusers' `KandinskyV22InpaintPipeline` encodes and decodes with the MoVQ of the inpainting repository
(`kandinsky-2-2-decoder-inpaint/movq`), while the bundle exports one MoVQ, the decoder's. That is right
only while the two are the same model, so the export compares them before exporting anything:

- same config and same tensors (as loaded and exported: float32): one MoVQ export is shared, and the
  manifest records both digests (`movq` entry);
- different: the export stops with `InpaintMovqMismatch`, unless the caller accepts serving inpainting
  with the decoder's MoVQ (`kandinsky-export onnx --allow-inpaint-movq-mismatch`), which the manifest then
  records (`"inpaint_movq": "decoder (differs from decoder_inpaint/movq)"`). A second served MoVQ for
  inpainting is not implemented (README, issue 12).

The digest is over the loaded tensors and the config, not the files: the same weights saved as `.bin`
or `.safetensors`, or with other safetensors metadata, are the same model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)

MOVQ_SUBFOLDER = "movq"
# The part whose MoVQ the bundle exports, and the parts that ship a MoVQ of their own.
MOVQ_SOURCE_PART = "decoder"
OWN_MOVQ_PARTS = ("decoder_inpaint",)
# The flag that accepts a mismatch (named in the refusal).
ALLOW_MISMATCH_FLAG = "--allow-inpaint-movq-mismatch"


class InpaintMovqMismatch(RuntimeError):
    """The inpainting repo's MoVQ differs from the decoder's, and serving it separately is not built."""


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
    """The manifest's `movq` entry; raises InpaintMovqMismatch where a part's own MoVQ differs."""
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
            f"{MOVQ_SUBFOLDER} (sha256 of config and tensors {own[:12]} vs {exported[:12]}); diffusers' "
            f"inpainting pipeline uses its own MoVQ, and this bundle serves one MoVQ only"
        )
        if not allow_mismatch:
            raise InpaintMovqMismatch(
                f"{message}. Export without the {part} part, or pass {ALLOW_MISMATCH_FLAG} to serve "
                "inpainting with the decoder's MoVQ (its results then differ from diffusers')"
            )
        logger.warning("%s: serving inpainting with the decoder's MoVQ (%s)", message, ALLOW_MISMATCH_FLAG)
        record[f"{part}_movq"] = f"{MOVQ_SOURCE_PART} (differs from {part}/{MOVQ_SUBFOLDER})"
    return record
