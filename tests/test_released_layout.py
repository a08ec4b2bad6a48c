"""The `released` preset layout: the files of the released uploads load, export and serve.

The tiny preset is written a second time, stored as the released repositories store it
(export/kandinsky_export/released_layout.py), then loaded by diffusers and by `Checkpoint`, exported
with the parity checks, and served by a second Triton server. The served tokenizer is compared with
transformers' CLIPTokenizer reading the released-style slow files; served images with diffusers on the
same checkpoint (replayed noise), including a DDIM swap, which reads the decoder scheduler's released
`set_alpha_to_one`, and inpainting, which reads the inpainting repo's own scheduler and MoVQ.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from kandinsky_core.components import SERVED_MODELS
from kandinsky_core.noise import ReplayNoise
from kandinsky_export.released_layout import (
    BIN_NAMES,
    RELEASED,
    RELEASED_DECODER_SCHEDULER_EXTRA,
    RELEASED_TEXT_TOKEN_IDS,
)

from . import reference
from .conftest import TINY_SEED, local_triton_server

STEPS = {"prior_num_inference_steps": 3, "num_inference_steps": 5}
PROMPTS = [
    "a photo of a cat",  # ordinary
    "",  # empty
    "A  CASTLE,\tin the mountains!! " * 12,  # over-long: truncated to 77 with the end token last
    "émoji 🐱, 日本語 and ÄÖÜ ß 123",  # unicode (NFC, lower-casing, byte fallback)
    "x<|endoftext|>y",  # a special token inside the text
]


@pytest.fixture(scope="module")
def released_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kandinsky_export.presets import PRESETS, write_preset_checkpoint

    root = tmp_path_factory.mktemp("tiny-released") / "checkpoint"
    return write_preset_checkpoint(PRESETS["tiny"], root, seed=TINY_SEED, layout=RELEASED)


@pytest.fixture(scope="module")
def released_bundle(released_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    from kandinsky_export.checkpoint import Checkpoint
    from kandinsky_export.onnx_export import export_bundle

    out = tmp_path_factory.mktemp("tiny-released-onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reports = export_bundle(Checkpoint.from_root(released_root), out)
    return out, reports


@pytest.fixture(scope="module")
def released_server(released_bundle, tmp_path_factory: pytest.TempPathFactory):
    from kandinsky_repository.generator.repository import generate_repository

    repository = tmp_path_factory.mktemp("tiny-released-repo") / "model_repository"
    generate_repository(released_bundle[0], repository)
    log = tmp_path_factory.mktemp("triton-released") / "server.log"
    with local_triton_server(repository, log) as server:
        yield server
    logging.getLogger(__name__).info("server log: %s", log)


@pytest.fixture(scope="module")
def released_client(released_server):
    from kandinsky_client.pipeline import KandinskyClient

    with KandinskyClient(released_server.grpc_url, protocol="grpc") as c:
        yield c


@pytest.fixture(scope="module")
def released_pipelines(released_root):
    prior, decoder = reference.load_pipelines(released_root)
    return SimpleNamespace(prior=prior, decoder=decoder, inpaint=reference.load_inpaint(released_root))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_released_layout_is_stored_as_the_uploads(released_root):
    """Every file of the released uploads' layout."""
    from safetensors.torch import load_file

    prior, decoder, inpaint = (
        released_root / "prior",
        released_root / "decoder",
        released_root / "decoder_inpaint",
    )
    tokenizer = prior / "tokenizer"
    assert sorted(p.name for p in tokenizer.iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert (tokenizer / "merges.txt").read_text().startswith("#version: 0.2\n")
    legacy = _json(tokenizer / "tokenizer_config.json")
    assert legacy["bos_token"]["__type"] == "AddedToken" and legacy["model_max_length"] == 77
    text = _json(prior / "text_encoder" / "config.json")
    assert {key: text[key] for key in RELEASED_TEXT_TOKEN_IDS} == RELEASED_TEXT_TOKEN_IDS
    weights = load_file(prior / "image_encoder" / "model.safetensors")
    assert {str(tensor.dtype) for tensor in weights.values()} == {"torch.float16"}
    processor = _json(prior / "image_processor" / "preprocessor_config.json")
    assert isinstance(processor["size"], int) and isinstance(processor["crop_size"], int)
    assert "clip_embed_dim" not in _json(prior / "prior" / "config.json")  # minimal: library defaults
    assert "beta_schedule" not in _json(prior / "scheduler" / "scheduler_config.json")
    for folder in (decoder, inpaint):
        scheduler = _json(folder / "scheduler" / "scheduler_config.json")
        assert {k: scheduler[k] for k in RELEASED_DECODER_SCHEDULER_EXTRA} == RELEASED_DECODER_SCHEDULER_EXTRA
        assert (folder / "movq" / "config.json").is_file()
    for weights in released_root.rglob("*.safetensors"):
        assert weights.with_name(BIN_NAMES[weights.name]).is_file(), weights


def test_released_layout_loads_like_the_current_one(released_root, tiny_checkpoint):
    """diffusers and `Checkpoint` load it; the sizes equal the current layout's."""
    from diffusers import KandinskyV22InpaintPipeline, KandinskyV22PriorPipeline
    from kandinsky_export.checkpoint import Checkpoint
    from transformers import CLIPTokenizer

    checkpoint = Checkpoint.from_root(released_root)
    assert checkpoint.dims == tiny_checkpoint.dims
    prior = KandinskyV22PriorPipeline.from_pretrained(released_root / "prior")
    assert prior.text_encoder.config.eos_token_id == 2  # the placeholder: plain-argmax pooling
    assert prior.image_processor.crop_size == {"height": 32, "width": 32}
    inpaint = KandinskyV22InpaintPipeline.from_pretrained(released_root / "decoder_inpaint")
    assert inpaint.movq.config.latent_channels == 4
    released = CLIPTokenizer.from_pretrained(str(released_root / "prior" / "tokenizer"))
    assert (released.bos_token_id, released.eos_token_id, released.pad_token_id) == (
        len(released) - 2,
        len(released) - 1,
        len(released) - 1,
    )


def test_released_layout_exports_with_passed_parity(released_bundle):
    bundle, reports = released_bundle
    assert reports and all(r.passed for r in reports)
    manifest = _json(bundle / "manifest.json")
    assert manifest["schedulers"]["decoder"]["set_alpha_to_one"] is False
    assert manifest["movq"]["decoder_inpaint_movq"] == "decoder"  # its own MoVQ, the same model
    assert sorted(p.name for p in (bundle / "tokenizer").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_served_tokenizer_equals_the_released_tokenizer_files(released_root, released_client):
    """The `tokenizer` model, reading the tokenizer.json the export built, vs transformers on the slow files."""
    from transformers import CLIPTokenizer

    folder = released_root / "prior" / "tokenizer"
    assert not (folder / "tokenizer.json").exists()
    expected = CLIPTokenizer.from_pretrained(str(folder))(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    )
    prompts = np.array([[p.encode()] for p in PROMPTS], dtype=object)
    got = released_client.transport.infer(SERVED_MODELS["tokenizer"], {"prompt": prompts})
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"].astype(bool))
    assert got["attention_mask"][1].sum() == 2  # empty: start and end tokens only
    assert got["input_ids"][2, -1] == expected["input_ids"][2, -1]  # over-long: still ends with the end token


@pytest.mark.parametrize("scheduler", [None, "DDIMScheduler"], ids=["ddpm", "ddim"])
def test_served_text_to_image_on_released_layout_matches_diffusers(
    released_client, released_pipelines, scheduler
):
    case = {"prompt": "a red fox", "negative_prompt": "blurry", "height": 64, "width": 64, "seed": 7, **STEPS}
    with reference.swapped_scheduler(released_pipelines.decoder, scheduler):
        run = reference.text_to_image(released_pipelines.prior, released_pipelines.decoder, **case)
    noise = ReplayNoise(run[3])
    kwargs = {k: v for k, v in case.items() if k != "seed"}
    result = released_client.text_to_image(**kwargs, scheduler=scheduler, noise=noise)
    assert noise.remaining == 0
    np.testing.assert_allclose(result.image_embeds, run[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.negative_image_embeds, run[2], rtol=1e-4, atol=1e-5)
    reference.assert_pixels_match(np.stack([np.asarray(i) for i in result.images]), run[0])


def test_served_inpainting_on_released_layout_matches_diffusers(released_client, released_pipelines):
    image = reference.picture(64, 64, seed=5)
    mask_image = reference.mask(64, 64, (16, 16, 48, 48), seed=5)
    run = reference.inpaint(
        released_pipelines.prior,
        released_pipelines.inpaint,
        image=image,
        mask_image=mask_image,
        prompt="a red hat",
        height=64,
        width=64,
        **STEPS,
    )
    noise = ReplayNoise(run[3])
    result = released_client.inpaint(
        image, mask_image, "a red hat", height=64, width=64, **STEPS, noise=noise
    )
    assert noise.remaining == 0
    reference.assert_pixels_match(np.stack([np.asarray(i) for i in result.images]), run[0])
