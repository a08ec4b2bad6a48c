"""Image pre-processing equals transformers/diffusers exactly; bad image-mode input gets a clear error.

The first half needs no server: the python-backend pre-processing (numpy + PIL) against transformers'
CLIPImageProcessor and diffusers' VaeImageProcessor, and the client's vectorised mask preparation
against diffusers' `prepare_mask_and_masked_image` + `prepare_mask`. The second half checks argument
validation (client side, before anything is computed) and server-side rejections.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from kandinsky_core import components as registry
from kandinsky_core.errors import InferenceFailed, InvalidRequest
from kandinsky_core.images import (
    grow_repaint_region,
    latent_keep_mask,
    load_image,
    load_mask,
    outpaint_canvas,
    repaint_mask,
    resize_for_movq,
    rgb_array,
)
from kandinsky_core.processing import (
    ClipPreprocessing,
    clip_preprocess,
    movq_preprocess,
)
from PIL import Image

from .reference import mask, picture

# -- pre-processing parity (no server) ---------------------------------------------------------------

SIZES = [(32, 32), (48, 40), (40, 97), (7, 5), (300, 200), (17, 64), (224, 224), (480, 640)]


def _clip_processors(tiny_checkpoint_root):
    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = CLIPImageProcessor.from_pretrained(tiny_checkpoint_root / "prior" / "image_processor")
        return {
            "tiny-checkpoint": tiny,
            "released-224": CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224, resample=3),
            "crop-larger-than-resize": CLIPImageProcessor(
                size={"shortest_edge": 20}, crop_size=28, resample=3
            ),
            "fixed-size-bilinear": CLIPImageProcessor(
                size={"height": 30, "width": 26}, crop_size=24, resample=2
            ),
        }


def test_clip_preprocessing_equals_transformers(tiny_checkpoint_root):
    rng = np.random.default_rng(0)
    for name, processor in _clip_processors(tiny_checkpoint_root).items():
        settings = ClipPreprocessing.from_config(processor.to_dict())
        for height, width in SIZES:
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            expected = processor(Image.fromarray(image), return_tensors="np").pixel_values
            got = clip_preprocess(image[None], settings)
            assert got.dtype == np.float32 and got.shape == expected.shape, (name, height, width)
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} at {height}x{width}")


def test_clip_preprocessing_reads_the_exported_config(tiny_checkpoint_root, tiny_bundle):
    """The bundle holds the checkpoint's preprocessor_config.json, and it parses to the same settings."""
    source = tiny_checkpoint_root / "prior" / "image_processor" / "preprocessor_config.json"
    exported = tiny_bundle[0] / "image_processor" / "preprocessor_config.json"
    assert ClipPreprocessing.from_file(exported) == ClipPreprocessing.from_file(source)


def test_movq_preprocessing_equals_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    # As KandinskyV22Img2ImgPipeline builds it; height and width passed by name (see reference.py).
    processor = VaeImageProcessor(vae_scale_factor=8, resample="bicubic", reducing_gap=1)
    for seed, (source, target) in enumerate(
        [((50, 70), (64, 128)), ((300, 200), (64, 64)), ((64, 64), (64, 64))]
    ):
        image = picture(*source, seed=seed)
        expected = processor.preprocess(image, height=target[0], width=target[1]).numpy()
        got = movq_preprocess(resize_for_movq(image, *target))
        np.testing.assert_array_equal(got, expected)
    # The inpainting pipeline's own arithmetic (x / 127.5 - 1) gives the same floats for every uint8.
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    inpaint_style = values.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1.0)
    np.testing.assert_array_equal(movq_preprocess(values), inpaint_style)


def test_mask_growth_equals_diffusers_prepare_mask():
    import torch
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask

    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = rng.integers(1, 14, 2)
        repaint = rng.random((height, width)) < rng.uniform(0.02, 0.5)
        keep = torch.from_numpy((~repaint).astype(np.float32))[None, None]
        expected = prepare_mask(keep.clone()).numpy()[0, 0]
        np.testing.assert_array_equal((~grow_repaint_region(repaint)).astype(np.float32), expected)
    # Not a full 3x3 max-pool: diffusers leaves the anti-diagonal corners alone.
    single = np.zeros((3, 3), bool)
    single[1, 1] = True
    assert grow_repaint_region(single).tolist() == [
        [True, True, False],
        [True, True, True],
        [False, True, True],
    ]


@pytest.mark.parametrize(
    ("size", "target"), [((64, 64), (64, 64)), ((80, 120), (64, 128)), ((70, 50), (128, 64))]
)
def test_latent_mask_equals_diffusers(size, target):
    import torch.nn.functional as F
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import (
        prepare_mask,
        prepare_mask_and_masked_image,
    )

    image = picture(*size, seed=1)
    mask_image = mask(*size, (size[0] // 4, size[1] // 3, size[0] // 2, size[1] - 3), seed=1)
    latent = (target[0] // 8, target[1] // 8)
    keep, _ = prepare_mask_and_masked_image(image, mask_image, *target)
    expected = prepare_mask(F.interpolate(keep, latent, mode="nearest")).numpy()
    got = latent_keep_mask(repaint_mask(mask_image, *target), latent)
    assert got.shape == expected.shape == (1, 1, *latent)
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.mean() < 1, "the case must have both kept and repainted latents"


def test_outpaint_canvas_repeats_edges_and_masks_the_new_area():
    image = picture(10, 6, seed=2)
    canvas, new_area = outpaint_canvas(image, left=3, top=1, right=0, bottom=2)
    array, original = np.asarray(canvas), np.asarray(image)
    assert canvas.size == (9, 13) and new_area.size == canvas.size and new_area.mode == "L"
    np.testing.assert_array_equal(array[1:11, 3:9], original)
    np.testing.assert_array_equal(array[5, :3], np.repeat(original[4:5, 0], 3, axis=0))
    np.testing.assert_array_equal(array[0, 3:], original[0])
    expected = np.full((13, 9), 255, np.uint8)
    expected[1:11, 3:9] = 0
    np.testing.assert_array_equal(np.asarray(new_area), expected)


# -- reading images and masks (no server) ------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _modes() -> dict[str, Image.Image]:
    rgb = picture(12, 10, seed=3)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 10, dtype=np.uint8), (12, 1))))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 0
    return {
        "L": rgb.convert("L"),
        "LA": rgba.convert("LA"),
        "RGBA": rgba,
        "P": palette,
        "P-transparency": transparent_palette,
        "1": rgb.convert("1"),
        "CMYK": rgb.convert("CMYK"),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_non_rgb_images_are_converted_as_transformers_converts_them(mode):
    from transformers.image_transforms import convert_to_rgb

    source = _modes()[mode]
    expected = convert_to_rgb(source, return_numpy=True)
    for value in (source, _png(source) if mode != "CMYK" else source):
        got = load_image(value)
        assert got.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(got), expected)
    if mode == "RGBA":  # transparent pixels become white, not black
        assert (np.asarray(load_image(source))[:, 0] == 255).all()


def test_arrays_and_paths_are_read(tmp_path):
    image = picture(8, 6, seed=4)
    path = tmp_path / "image.png"
    image.save(path)
    array = np.asarray(image)
    for value in (
        path,
        str(path),
        path.read_bytes(),
        array,
        array[..., 0],
        np.dstack([array, array[..., :1]]),
    ):
        assert load_image(value).size == (6, 8)


def _file(directory, name: str, content: bytes):
    path = directory / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d / "missing.png", "no such image file"),
        (lambda d: _file(d, "empty.png", b""), "is empty (0 bytes)"),
        (lambda d: _file(d, "text.png", b"not an image"), "not a readable image file"),
        (lambda d: _file(d, "cut.png", _png(picture(32, 32))[:60]), "not a readable image file"),
        (lambda d: b"", "is empty (0 bytes)"),
        (lambda d: 42, "must be a PIL image, a path"),
        (lambda d: np.zeros((4, 4, 3), np.float32), "image arrays must be uint8"),
        (lambda d: np.zeros((4, 4, 2), np.uint8), "valid shapes are"),
        (lambda d: np.zeros((0, 4, 3), np.uint8), "at least 1x1"),
    ],
)
def test_unreadable_images_are_refused(tmp_path, make, fragment):
    with pytest.raises(InvalidRequest) as error:
        load_image(make(tmp_path), "image")
    assert error.value.field == "image"
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (np.zeros((8, 6), np.float32) + 1.5, "float masks must lie in [0, 1]"),
        (np.full((8, 6), -0.5, np.float32), "has values in [-0.5, -0.5]"),
        (np.full((8, 6), np.nan, np.float32), "NaN"),
        (np.full((8, 6), 300, np.int32), "integer masks must lie in [0, 255]"),
        (Image.fromarray(np.full((8, 6), 1000, np.uint16)), "has values in [1000, 1000]"),
        (np.zeros((8, 6, 3), np.uint8), "a mask array must be [height, width]"),
        (np.zeros((8, 6), np.complex64), "valid mask dtypes"),
        (np.zeros((6, 8), np.uint8), "is 8x6 pixels; it must have the image's size 6x8"),
        (Image.new("L", (7, 8)), "is 7x8 pixels; it must have the image's size 6x8"),
    ],
)
def test_bad_masks_are_refused(value, fragment):
    with pytest.raises(InvalidRequest) as error:
        load_mask(value, (6, 8))
    assert error.value.field == "mask_image"
    assert fragment in str(error.value)


def test_masks_of_every_kind_mean_the_same():
    """bool, uint8, float and file masks (white = repaint) select the same pixels."""
    repaint = np.zeros((8, 6), bool)
    repaint[2:5, 1:4] = True
    kinds = [repaint, repaint.astype(np.uint8) * 255, repaint.astype(np.float32), Image.fromarray(repaint)]
    kinds.append(Image.open(io.BytesIO(_png(Image.fromarray(repaint.astype(np.uint8) * 255)))))
    for kind in kinds:
        np.testing.assert_array_equal(repaint_mask(load_mask(kind, (6, 8)), 8, 6), repaint)


# -- validation of the modes' arguments (client side, before any inference) --------------------------

DECODER = {"num_inference_steps": 4, "height": 64, "width": 64}
FAST = {"prior_num_inference_steps": 2, **DECODER}


def _image():
    return picture(64, 64, seed=7)


@pytest.mark.parametrize(
    ("call", "field", "fragment"),
    [
        (
            lambda c: c.image_to_image(_image(), "x", strength=0, **FAST),
            "strength",
            "valid values are (0, 1]",
        ),
        (lambda c: c.image_to_image(_image(), "x", strength=1.5, **FAST), "strength", "(0, 1]"),
        (lambda c: c.image_to_image(_image(), "x", strength=float("nan"), **FAST), "strength", "finite"),
        (lambda c: c.image_to_image(_image(), "x", strength=0.2, **FAST), "strength", "0 denoising steps"),
        (lambda c: c.emb2emb(_image(), "x", strength=-0.1, **FAST), "strength", "(0, 1]"),
        (lambda c: c.emb2emb(_image(), "x", strength=0.4, **FAST), "strength", "[0.5, 1] for 2 steps"),
        (lambda c: c.fuse([], [], **FAST), "images_and_prompts", "non-empty list"),
        (lambda c: c.fuse(["a"], [], **FAST), "weights", "non-empty list"),
        (lambda c: c.fuse(["a", _image()], [1.0], **FAST), "weights", "1 entries for 2"),
        (lambda c: c.fuse(["a", "b"], [0.5, -0.5], **FAST), "weights[1]", "valid values are >= 0"),
        (lambda c: c.fuse(["a", "b"], [0, 0.0], **FAST), "weights", "all 0"),
        (lambda c: c.fuse(["a", "b"], [1, float("inf")], **FAST), "weights[1]", "finite"),
        (lambda c: c.fuse(["a", 3], [1, 1], **FAST), "images_and_prompts[1]", "must be a PIL image"),
        (lambda c: c.fuse(["a"], [1], negative_prompt=3, **FAST), "negative_prompt", "must be a string"),
        (lambda c: c.variations(b"", **DECODER), "image", "is empty"),
        (
            lambda c: c.variations(_image(), num_images_per_prompt=5, **DECODER),
            "num_images_per_prompt",
            "[1, 4]",
        ),
        (
            lambda c: c.inpaint(_image(), np.zeros((32, 64), bool), "x", **FAST),
            "mask_image",
            "it must have the image's size 64x64",
        ),
        (
            lambda c: c.inpaint(_image(), np.full((64, 64), 2.0), "x", **FAST),
            "mask_image",
            "float masks must lie in [0, 1]",
        ),
        (
            lambda c: c.image_to_image(
                picture(50, 70), "x", prior_num_inference_steps=2, num_inference_steps=2
            ),
            "height",
            "defaults to the image's height, 50",
        ),
        (
            lambda c: c.outpaint(_image(), "x", left=1000, right=1, **FAST),
            "left, right",
            "64 + left 1000 + right 1 = 1065 exceeds the maximum image size 1024; valid: left + right <= 960",
        ),
        (lambda c: c.outpaint(_image(), "x", bottom=961), "top, bottom", "valid: top + bottom <= 960"),
        (lambda c: c.outpaint(_image(), "x"), "left, top, right, bottom", "are all 0"),
        (lambda c: c.outpaint(_image(), "x", top=-64), "top", "valid values are >= 0"),
    ],
)
def test_client_rejects_bad_mode_arguments(grpc_client, call, field, fragment):
    with pytest.raises(InvalidRequest) as error:
        call(grpc_client)
    assert error.value.field == field
    assert fragment in str(error.value)


def test_grayscale_and_transparent_inputs_are_used_as_rgb(grpc_client):
    """A grayscale or RGBA input gives exactly the result of its RGB conversion (same seed)."""
    gray = picture(64, 64, seed=8).convert("L")
    rgba = picture(64, 64, seed=8).convert("RGBA")
    rgba.putalpha(128)
    kwargs = {"num_images_per_prompt": 1, "height": 64, "width": 64, "num_inference_steps": 2, "seed": 3}
    for source in (gray, rgba):
        as_given = grpc_client.variations(source, **kwargs)
        as_rgb = grpc_client.variations(load_image(source), **kwargs)
        np.testing.assert_array_equal(as_given.image_embeds, as_rgb.image_embeds)
        np.testing.assert_array_equal(np.asarray(as_given.images[0]), np.asarray(as_rgb.images[0]))
    embeds = [grpc_client.variations(s, **kwargs).image_embeds for s in (gray, rgba)]
    assert not np.allclose(embeds[0], embeds[1]), "different inputs must give different embeddings"


# -- server-side rejections --------------------------------------------------------------------------


def test_server_rejects_oversized_images_and_keeps_serving(grpc_client):
    transport = grpc_client.transport
    limit = registry.MAX_INPUT_IMAGE_SIDE
    too_tall = np.zeros((1, limit + 1, 1, 3), np.uint8)
    with pytest.raises(InferenceFailed) as error:
        transport.infer(registry.ENCODE_IMAGE, {"image_rgb": too_tall})
    assert f"input 'image_rgb' height is {limit + 1}; at most {limit}" in str(error.value)
    embeds = transport.infer(registry.ENCODE_IMAGE, {"image_rgb": rgb_array(picture(40, 30))})["image_embeds"]
    assert embeds.shape == (1, grpc_client.info.dims.embed_dim) and np.isfinite(embeds).all()


def test_server_rejects_latent_images_of_a_bad_size_and_keeps_serving(grpc_client):
    def encode_latents(image):
        return grpc_client.transport.infer(registry.ENCODE_LATENTS, {"image_rgb": rgb_array(image)})[
            "latents"
        ]

    with pytest.raises(InferenceFailed) as error:
        encode_latents(picture(60, 64))
    assert "input 'image' height is 60; it must be a multiple of 64" in str(error.value)
    latents = encode_latents(picture(64, 128))
    assert latents.shape == (1, grpc_client.info.dims.latent_channels, 8, 16) and np.isfinite(latents).all()
