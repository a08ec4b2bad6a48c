"""Where a Kandinsky 2.2 checkpoint lives, how its components load, and the sizes its configs imply.

A checkpoint is up to four diffusers-format folders (or hub ids where a network exists): the prior
(`kandinsky-community/kandinsky-2-2-prior`), the decoder (`...-decoder`), and optionally the inpainting
decoder (`...-decoder-inpaint`) and the ControlNet-depth decoder (`...-controlnet-depth`). Every size the
exported graphs depend on is read from their configs. A hub part may be pinned to a revision
(`revisions`): every file of it, configs, weights and tokenizer, is then read at that revision, because the
released repositories have changed since their first upload.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from kandinsky_core.components import ModelDims

logger = logging.getLogger(__name__)

# Component name -> (checkpoint part, subfolder).
SUBFOLDERS = {
    "text_encoder": ("prior", "text_encoder"),
    "image_encoder": ("prior", "image_encoder"),
    "prior": ("prior", "prior"),
    "unet": ("decoder", "unet"),
    "unet_inpaint": ("decoder_inpaint", "unet"),
    "unet_controlnet": ("controlnet", "unet"),
    "movq_encoder": ("decoder", "movq"),
    "movq_decoder": ("decoder", "movq"),
    "movq_encoder_inpaint": ("decoder_inpaint", "movq"),
    "movq_decoder_inpaint": ("decoder_inpaint", "movq"),
}


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint parts, each a local folder or a hub id."""

    prior: str
    decoder: str
    decoder_inpaint: str | None = None
    controlnet: str | None = None  # kandinsky-2-2-controlnet-depth (a decoder whose UNet takes a hint)
    # Part name -> hub revision (commit, branch or tag) it is loaded at; a part missing here loads the hub's
    # default branch. Local folders have no revisions (from_pretrained ignores it for them).
    revisions: dict[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def from_root(cls, root: Path) -> Checkpoint:
        """The layout written by the presets: <root>/prior, <root>/decoder, <root>/decoder_inpaint."""
        root = Path(root)
        inpaint = root / "decoder_inpaint"
        controlnet = root / "controlnet"
        return cls(
            str(root / "prior"),
            str(root / "decoder"),
            str(inpaint) if inpaint.is_dir() else None,
            controlnet=str(controlnet) if controlnet.is_dir() else None,
        )

    def part(self, name: str) -> str:
        source = getattr(self, name)
        if source is None:
            raise FileNotFoundError(f"this checkpoint has no '{name}' part")
        return source

    def has(self, name: str) -> bool:
        return getattr(self, name) is not None

    def revision(self, part: str) -> str | None:
        """The pinned hub revision of one part (None: the default branch, or a local folder)."""
        return self.revisions.get(part) or None

    def fetch(self, part: str, relative: str, *, required: bool = True) -> Path | None:
        """The local path of one file of a part: in its folder, or downloaded at the part's revision.

        With `required=False` a file the part does not have is None (local folder or hub).
        """
        source = self.part(part)
        local = Path(source) / relative
        if local.is_file():
            return local
        if Path(source).is_dir():
            if required:
                raise FileNotFoundError(f"{local} not found")
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(source, relative, revision=self.revision(part)))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            if required:
                raise
            return None

    def read_json(self, part: str, relative: str) -> dict[str, Any]:
        """A config file of one part, from a local folder or (where a network exists) the hub."""
        return json.loads(self.fetch(part, relative).read_text())  # type: ignore[union-attr]

    def config(self, component: str) -> dict[str, Any]:
        part, subfolder = SUBFOLDERS[component]
        return self.read_json(part, f"{subfolder}/config.json")

    def scheduler_config(self, part: str) -> dict[str, Any]:
        return self.read_json(part, "scheduler/scheduler_config.json")

    @cached_property
    def dims(self) -> ModelDims:
        text = self.config("text_encoder")
        vision = self.config("image_encoder")
        prior = self.config("prior")
        unet = self.config("unet")
        movq = self.config("movq_decoder")
        tokenizer = self.read_json("prior", "tokenizer/tokenizer_config.json")
        inpaint_channels = self.config("unet_inpaint")["in_channels"] if self.has("decoder_inpaint") else 0
        embed_dim = prior.get("clip_embed_dim") or prior["embedding_dim"]
        if vision["projection_dim"] != embed_dim:
            raise ValueError(
                f"image_encoder projection_dim {vision['projection_dim']} != prior embedding width {embed_dim}"
            )
        return ModelDims(
            text_seq_len=int(tokenizer.get("model_max_length", text["max_position_embeddings"])),
            text_hidden=text["hidden_size"],
            text_embed=text["projection_dim"],
            embed_dim=embed_dim,
            image_size=vision["image_size"],
            latent_channels=movq["latent_channels"],
            unet_out_channels=unet["out_channels"],
            inpaint_in_channels=inpaint_channels,
            movq_scale_factor=2 ** (len(movq["block_out_channels"]) - 1),
            unet_downscale=2 ** (len(unet["block_out_channels"]) - 1),
        )

    def load_component(self, component: str) -> Any:
        """The PyTorch module holding `component`, loaded with its diffusers/transformers class."""
        from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        classes = {
            "text_encoder": CLIPTextModelWithProjection,
            "image_encoder": CLIPVisionModelWithProjection,
            "prior": PriorTransformer,
            "unet": UNet2DConditionModel,
            "unet_inpaint": UNet2DConditionModel,
            "unet_controlnet": UNet2DConditionModel,
            "movq_encoder": VQModel,
            "movq_decoder": VQModel,
            "movq_encoder_inpaint": VQModel,
            "movq_decoder_inpaint": VQModel,
        }
        part, subfolder = SUBFOLDERS[component]
        logger.info("loading %s from %s/%s", component, self.part(part), subfolder)
        model = classes[component].from_pretrained(
            self.part(part), subfolder=subfolder, revision=self.revision(part)
        )
        return model.eval().float()

    def load_tokenizer(self) -> Any:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(
            self.prior, subfolder="tokenizer", revision=self.revision("prior")
        )
