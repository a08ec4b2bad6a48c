"""Random-weight presets of the Kandinsky 2.2 architecture, written as diffusers-format checkpoints.

Each preset builds the real diffusers/transformers classes (CLIP text and vision encoders with
projection, PriorTransformer, UNet2DConditionModel, VQModel) with random weights and saves them in the
layout of the released checkpoints, so that they load through exactly the code path that loads real
weights:

    <root>/prior/            tokenizer, text_encoder, image_encoder, image_processor, prior, scheduler
    <root>/decoder/          unet, movq, scheduler
    <root>/decoder_inpaint/  unet (latent + masked latent + mask channels), movq, scheduler
    <root>/controlnet/       unet with the depth-hint input, movq, scheduler (controlnet.py)

- `tiny`: seconds on CPU, for tests.
- `small`: released block types and depth, reduced width, for CPU benchmarks.
- `full`: the released sizes (3.3B parameters), for export-at-scale checks and GPU benchmarks.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .random_weights import randomize_untrained_parameters
from .released_layout import CURRENT, LAYOUTS, RELEASED, apply_released_layout

logger = logging.getLogger(__name__)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Scheduler settings as uploaded with the released checkpoints.
PRIOR_SCHEDULER = {
    "_class_name": "UnCLIPScheduler",
    "clip_sample": True,
    "clip_sample_range": 10.0,
    "num_train_timesteps": 1000,
    "prediction_type": "sample",
    "variance_type": "fixed_small_log",
}
DECODER_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "variance_type": "fixed_small",
}

_UNET_BLOCKS = {
    "down_block_types": [
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ],
    "up_block_types": [
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
}
_UNET_COMMON = {
    "in_channels": 4,
    "out_channels": 8,
    "addition_embed_type": "image",
    "encoder_hid_dim_type": "image_proj",
    "resnet_time_scale_shift": "scale_shift",
    "class_embed_type": None,
}
_MOVQ_COMMON = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "vq_embed_dim": 4,
    "norm_type": "spatial",
}
_MOVQ_BLOCKS = {
    "down_block_types": [
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "AttnDownEncoderBlock2D",
    ],
    "up_block_types": [
        "AttnUpDecoderBlock2D",
        "UpDecoderBlock2D",
        "UpDecoderBlock2D",
        "UpDecoderBlock2D",
    ],
}


@dataclass(frozen=True)
class Preset:
    """Constructor arguments of every component; the text/vision configs are transformers kwargs."""

    name: str
    tokenizer_merges: int
    text_encoder: dict[str, Any]
    image_encoder: dict[str, Any]
    prior: dict[str, Any]
    unet: dict[str, Any]
    movq: dict[str, Any]
    prior_scheduler: dict[str, Any] = field(default_factory=lambda: dict(PRIOR_SCHEDULER))
    decoder_scheduler: dict[str, Any] = field(default_factory=lambda: dict(DECODER_SCHEDULER))


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        tokenizer_merges=300,
        text_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
        },
        image_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
            "hidden_act": "gelu",
        },
        prior={
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "num_layers": 2,
            "embedding_dim": 32,
            "num_embeddings": 77,
            "additional_embeddings": 4,
        },
        unet={
            **_UNET_COMMON,
            "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
            "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "attention_head_dim": 8,
            "cross_attention_dim": 32,
            "encoder_hid_dim": 32,
            "norm_num_groups": 8,
        },
        movq={
            # The released block types and 8x scale factor (so latent sizes and the 64-pixel size
            # multiple are as in the released model); SpatialNorm needs multiples of 32 channels.
            **_MOVQ_COMMON,
            **_MOVQ_BLOCKS,
            "block_out_channels": [32, 32, 32, 32],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "num_vq_embeddings": 12,
        },
    ),
    "small": Preset(
        name="small",
        tokenizer_merges=2000,
        text_encoder={
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 32,
            "num_attention_heads": 4,
            "projection_dim": 256,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
        },
        image_encoder={
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 48,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 14,
            "projection_dim": 256,
            "hidden_act": "gelu",
        },
        prior={
            "num_attention_heads": 4,
            "attention_head_dim": 64,
            "num_layers": 20,
            "embedding_dim": 256,
            "num_embeddings": 77,
            "additional_embeddings": 4,
        },
        unet={
            **_UNET_COMMON,
            **_UNET_BLOCKS,
            "block_out_channels": [96, 192, 288, 384],
            "layers_per_block": 3,
            "attention_head_dim": 48,  # divides every block width (64 would not divide 96 or 288)
            "cross_attention_dim": 192,
            "encoder_hid_dim": 256,
            "addition_embed_type_num_heads": 64,
        },
        movq={
            **_MOVQ_COMMON,
            **_MOVQ_BLOCKS,
            "block_out_channels": [32, 64, 64, 128],
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "num_vq_embeddings": 16384,
        },
    ),
    "full": Preset(
        name="full",
        tokenizer_merges=2000,
        text_encoder={
            "vocab_size": 49408,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
        },
        image_encoder={
            "hidden_size": 1664,
            "intermediate_size": 8192,
            "num_hidden_layers": 48,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "projection_dim": 1280,
            "hidden_act": "gelu",
        },
        prior={
            "num_attention_heads": 32,
            "attention_head_dim": 64,
            "num_layers": 20,
            "embedding_dim": 1280,
            "num_embeddings": 77,
            "additional_embeddings": 4,
        },
        unet={
            **_UNET_COMMON,
            **_UNET_BLOCKS,
            "block_out_channels": [384, 768, 1152, 1536],
            "layers_per_block": 3,
            "attention_head_dim": 64,
            "cross_attention_dim": 768,
            "encoder_hid_dim": 1280,
            "addition_embed_type_num_heads": 64,
        },
        movq={
            **_MOVQ_COMMON,
            **_MOVQ_BLOCKS,
            "block_out_channels": [128, 256, 256, 512],
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "num_vq_embeddings": 16384,
        },
    ),
}


def write_preset_checkpoint(preset: Preset, root: Path, seed: int = 0, layout: str = CURRENT) -> Path:
    """Write the preset's prior, decoder and inpainting-decoder folders under `root`; returns `root`.

    `layout="released"` stores them as the released uploads do (released_layout.py): the same weights,
    the files and configs that the loading code must also handle.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout is '{layout}'; one of {', '.join(LAYOUTS)}")
    from diffusers import (
        DDPMScheduler,
        PriorTransformer,
        UnCLIPScheduler,
        UNet2DConditionModel,
        VQModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from .controlnet import write_controlnet_part
    from .tokenizer import build_clip_tokenizer

    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_clip_tokenizer(preset.tokenizer_merges, model_max_length=77)
    text_kwargs = {
        "vocab_size": len(tokenizer),
        **preset.text_encoder,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text_kwargs["vocab_size"] = max(text_kwargs["vocab_size"], len(tokenizer))
    image_size = preset.image_encoder["image_size"]

    def build_and_save(folder: Path, factory: Any) -> None:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = factory()
        randomize_untrained_parameters(model, generator)
        model.save_pretrained(folder)
        del model
        gc.collect()

    prior_dir, decoder_dir, inpaint_dir = root / "prior", root / "decoder", root / "decoder_inpaint"
    steps: list[tuple[Path, Any]] = [
        (prior_dir / "text_encoder", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_kwargs))),
        (
            prior_dir / "image_encoder",
            lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**preset.image_encoder)),
        ),
        (prior_dir / "prior", lambda: PriorTransformer(**preset.prior)),
        (decoder_dir / "unet", lambda: UNet2DConditionModel(**preset.unet)),
        (decoder_dir / "movq", lambda: VQModel(**preset.movq)),
        (
            inpaint_dir / "unet",
            lambda: UNet2DConditionModel(
                **{**preset.unet, "in_channels": 2 * preset.unet["in_channels"] + 1}
            ),
        ),
    ]
    for folder, factory in tqdm(steps, desc=f"writing preset '{preset.name}'", unit="model"):
        logger.info("writing %s", folder)
        build_and_save(folder, factory)
    # The inpainting decoder ships its own copy of the MoVQ, as the released upload does.
    movq = VQModel.from_pretrained(decoder_dir / "movq")
    movq.save_pretrained(inpaint_dir / "movq")

    tokenizer.save_pretrained(prior_dir / "tokenizer")
    CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    ).save_pretrained(prior_dir / "image_processor")
    UnCLIPScheduler.from_config(preset.prior_scheduler).save_pretrained(prior_dir / "scheduler")
    for folder in (decoder_dir, inpaint_dir):
        DDPMScheduler.from_config(preset.decoder_scheduler).save_pretrained(folder / "scheduler")

    _write_model_index(
        prior_dir,
        "KandinskyV22PriorPipeline",
        {
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "image_processor": ["transformers", "CLIPImageProcessor"],
            "prior": ["diffusers", "PriorTransformer"],
            "scheduler": ["diffusers", "UnCLIPScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        },
    )
    decoder_modules = {
        "movq": ["diffusers", "VQModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    _write_model_index(decoder_dir, "KandinskyV22Pipeline", decoder_modules)
    _write_model_index(inpaint_dir, "KandinskyV22InpaintPipeline", decoder_modules)
    write_controlnet_part(preset.unet, root, decoder_dir, seed, decoder_modules)
    if layout == RELEASED:
        apply_released_layout(root, preset.prior, preset.prior_scheduler, preset.decoder_scheduler)
    return root


def _write_model_index(folder: Path, pipeline_class: str, modules: dict[str, list[str]]) -> None:
    """model_index.json as DiffusionPipeline.save_pretrained writes it (without holding every model)."""
    import diffusers

    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__, **modules}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
