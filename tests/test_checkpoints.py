"""Presets write real diffusers-format checkpoints that load through the same code as released weights."""

from __future__ import annotations

import json

import numpy as np
from kandinsky_core.processing import load_tokenizer, tokenize
from kandinsky_export.presets import PRESETS


def test_preset_loads_with_the_diffusers_pipelines(tiny_checkpoint_root):
    from diffusers import KandinskyV22InpaintPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline
    from transformers import CLIPTokenizer

    prior = KandinskyV22PriorPipeline.from_pretrained(tiny_checkpoint_root / "prior")
    decoder = KandinskyV22Pipeline.from_pretrained(tiny_checkpoint_root / "decoder")
    inpaint = KandinskyV22InpaintPipeline.from_pretrained(tiny_checkpoint_root / "decoder_inpaint")
    assert isinstance(prior.tokenizer, CLIPTokenizer)
    assert prior.tokenizer.model_max_length == 77
    assert prior.text_encoder.config.eos_token_id == prior.tokenizer.eos_token_id
    assert inpaint.unet.config.in_channels == 2 * decoder.unet.config.in_channels + 1
    # Untrained-constant tensors were randomised: the prior's output is not a constant.
    assert float(prior.prior.clip_std.detach().min()) > 0.4
    assert float(prior.prior.positional_embedding.detach().abs().max()) > 0


def test_dims_come_from_the_checkpoint_configs(tiny_checkpoint):
    preset = PRESETS["tiny"]
    dims = tiny_checkpoint.dims
    assert dims.embed_dim == preset.prior["embedding_dim"]
    assert dims.text_hidden == preset.text_encoder["hidden_size"]
    assert dims.image_size == preset.image_encoder["image_size"]
    assert dims.movq_scale_factor == 2 ** (len(preset.movq["block_out_channels"]) - 1)
    assert dims.unet_out_channels == preset.unet["out_channels"]
    # diffusers' latent rounding (ceil(H / scale**2) * scale) must land on a UNet-divisible size.
    latent = dims.size_multiple // dims.movq_scale_factor
    assert latent % dims.unet_downscale == 0


def test_scheduler_configs_are_read_from_the_checkpoint(tiny_checkpoint, tiny_bundle):
    bundle, _ = tiny_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schedulers"]["prior"]["_class_name"] == "UnCLIPScheduler"
    assert manifest["schedulers"]["decoder"] == tiny_checkpoint.scheduler_config("decoder")


def test_tokenizer_model_matches_transformers(tiny_bundle):
    """The served tokenizer (tokenizers library) equals transformers' CLIPTokenizer as diffusers calls it."""
    from transformers import CLIPTokenizer

    bundle, _ = tiny_bundle
    reference = CLIPTokenizer.from_pretrained(str(bundle / "tokenizer"))
    served = load_tokenizer(bundle / "tokenizer")
    prompts = ["a photo of a cat", "", "A  CASTLE,\tin the mountains!! " * 12, "émoji 🐱 and 123 numbers"]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    got = tokenize(served, prompts)
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"].astype(bool))
    assert got["input_ids"].shape == (4, 77)
    assert got["input_ids"][2, -1] == reference.eos_token_id  # truncated, still ends with EOS


def test_every_preset_has_consistent_widths():
    """Attention heads must divide every UNet block; SpatialNorm's GroupNorm(32) needs MoVQ widths % 32."""
    for name, preset in PRESETS.items():
        head = preset.unet["attention_head_dim"]
        for width in preset.unet["block_out_channels"]:
            assert width % head == 0, f"{name}: UNet width {width} is not a multiple of head dim {head}"
        for width in preset.movq["block_out_channels"]:
            assert width % 32 == 0, f"{name}: MoVQ width {width}"
        prior = preset.prior
        assert (
            prior["embedding_dim"]
            == preset.text_encoder["hidden_size"]
            == preset.text_encoder["projection_dim"]
        )
        assert preset.image_encoder["projection_dim"] == prior["embedding_dim"]


def test_the_preset_vocabulary_is_the_same_in_every_process():
    """The same preset must give the same token ids (and so the same numbers downstream) on every run.

    The `tokenizers` BPE trainer broke ties between equally frequent pairs differently per process, so
    two runs of the same preset learned different merges (and tests that depend on a run's numbers, like
    the FP16 verdicts, changed between sessions).
    """
    import subprocess
    import sys

    code = (
        "import json; from kandinsky_export.tokenizer import learn_clip_vocabulary; "
        "print(json.dumps(learn_clip_vocabulary(300), sort_keys=True))"
    )
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(3)
    }
    assert len(runs) == 1
