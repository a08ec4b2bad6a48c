"""TensorRT engine planning without TensorRT: profiles from the registry, sidecars, rebuild decisions.

The build itself needs `tensorrt` and a GPU: see tests/test_tensorrt_build.py (skipped elsewhere).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from kandinsky_core.components import COMPONENTS, MAX_IMAGES_PER_REQUEST, SERVED_MODELS, ModelDims
from kandinsky_core.profiles import (
    ProfileSettings,
    engine_profile,
    is_spatially_static,
    profile_shapes_option,
)
from kandinsky_export.tensorrt_engine import (
    ENGINE_DIR,
    ENGINE_FILE,
    METADATA_FILE,
    BuildOptions,
    choose_source,
    plan_engines,
    rebuild_reason,
    record_engine,
)

GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.fixture(scope="module")
def dims(tiny_bundle) -> ModelDims:
    manifest = json.loads((tiny_bundle[0] / "manifest.json").read_text())
    return ModelDims.from_dict(manifest["dims"])


@pytest.fixture()
def bundle(tiny_bundle, tmp_path: Path) -> Path:
    """A private copy: these tests write sidecars and fake engines into it."""
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], target)
    return target


# Rows per image, declared per model (the most rows one image costs it, and the group
# its rows come in); no request sends the image models more than one row per image.
ROWS_PER_IMAGE = {
    "text_encoder": (4, 2),  # [uncond, cond] x (prompt, negative prompt)
    "prior": (4, 2),
    "unet": (2, 2),  # [uncond, cond]
    "unet_inpaint": (2, 2),
    "unet_controlnet": (2, 2),
    "image_encoder": (1, 1),
    "movq_encoder": (1, 1),
    "movq_decoder": (1, 1),
    "tokenizer": (4, 2),
    "encode_prompt": (4, 2),
    "prior_postprocess": (2, 1),  # the prior's latents: prompt and negative-prompt runs
    "postprocess_image": (1, 1),
    "preprocess_clip_image": (1, 1),
    "preprocess_movq_image": (1, 1),
    "decode_image": (1, 1),
    "encode_image": (1, 1),
    "encode_latents": (1, 1),
    "movq_encoder_inpaint": (1, 1),  # the inpainting repo's own MoVQ, where it differs
    "movq_decoder_inpaint": (1, 1),
    "encode_latents_inpaint": (1, 1),
    "decode_image_inpaint": (1, 1),
}


def test_rows_per_image_are_declared_and_derive_the_batch_limits() -> None:
    models = {**COMPONENTS, **SERVED_MODELS}
    assert set(models) == set(ROWS_PER_IMAGE)
    for name, (rows, group) in ROWS_PER_IMAGE.items():
        spec = models[name]
        assert (spec.rows_per_image, spec.row_group) == (rows, group), name
        assert spec.max_batch_size == rows * MAX_IMAGES_PER_REQUEST, name
        assert spec.batch_sizes() == tuple(range(group, spec.max_batch_size + 1, group)), name
    assert COMPONENTS["unet"].batch_sizes() == (2, 4, 6, 8)
    assert COMPONENTS["prior"].batch_sizes() == (2, 4, 6, 8, 10, 12, 14, 16)
    assert COMPONENTS["movq_decoder"].batch_sizes() == (1, 2, 3, 4)
    for spec in SERVED_MODELS.values():  # an ensemble takes no larger batch than each of its steps
        assert all(spec.max_batch_size <= models[step].max_batch_size for step in spec.steps), spec.name


def test_batch_ranges_follow_the_registry(dims: ModelDims) -> None:
    settings = ProfileSettings()
    for name, spec in COMPONENTS.items():
        profile = engine_profile(spec, dims, settings)
        assert set(profile) == {t.name for t in spec.inputs}, name
        for shapes in profile.values():
            assert shapes["min"][0] == 1, name  # Triton's dynamic batcher may send any batch size
            assert shapes["opt"][0] == spec.rows_per_image, name  # one image, tuned and warmed up
            assert shapes["max"][0] == spec.max_batch_size, name
    # the MoVQ decoder decodes one image at batch 1 and at most MAX_IMAGES_PER_REQUEST images
    decoder = engine_profile(COMPONENTS["movq_decoder"], dims, settings)["latents"]
    assert [decoder[k][0] for k in ("min", "opt", "max")] == [1, 1, MAX_IMAGES_PER_REQUEST]
    unet = engine_profile(COMPONENTS["unet"], dims, settings)["sample"]
    assert [unet[k][0] for k in ("min", "opt", "max")] == [1, 2, 2 * MAX_IMAGES_PER_REQUEST]


def test_spatial_ranges_in_pixels_and_latents(dims: ModelDims) -> None:
    settings = ProfileSettings(min_size=512, opt_size=768, max_size=1024, size_step=64)
    scale = dims.movq_scale_factor
    unet = engine_profile(COMPONENTS["unet"], dims, settings)["sample"]
    assert unet["min"][1:] == [dims.latent_channels, 512 // scale, 512 // scale]
    assert unet["opt"][2:] == [768 // scale, 768 // scale]
    assert unet["max"][2:] == [1024 // scale, 1024 // scale]
    encoder = engine_profile(COMPONENTS["movq_encoder"], dims, settings)["image"]
    assert encoder["min"][2:] == [512, 512] and encoder["max"][2:] == [1024, 1024]
    # fixed axes stay fixed: the text encoder's sequence and the image encoder's 224-style input
    text = engine_profile(COMPONENTS["text_encoder"], dims, settings)["input_ids"]
    assert text["min"][1] == text["max"][1] == dims.text_seq_len
    assert settings.image_sides() == list(range(512, 1025, 64))
    assert not is_spatially_static(engine_profile(COMPONENTS["unet"], dims, settings))


def test_static_profile_fixes_space_not_batch(dims: ModelDims) -> None:
    settings = ProfileSettings(static_size=(768, 1024))
    profile = engine_profile(COMPONENTS["movq_decoder"], dims, settings)
    latents = profile["latents"]
    expected = [768 // dims.movq_scale_factor, 1024 // dims.movq_scale_factor]
    assert latents["min"][2:] == latents["opt"][2:] == latents["max"][2:] == expected
    assert latents["min"][0] == 1 and latents["max"][0] == COMPONENTS["movq_decoder"].max_batch_size
    assert is_spatially_static(profile)
    option = profile_shapes_option(profile, "max")
    assert option == f"latents:{COMPONENTS['movq_decoder'].max_batch_size}x{dims.latent_channels}x96x128"


@pytest.mark.parametrize(
    "settings",
    [
        ProfileSettings(min_size=500),  # not a multiple of the model's size unit
        ProfileSettings(min_size=1024, max_size=512),
        ProfileSettings(opt_size=800, size_step=64, min_size=512),  # off the 64-pixel grid
        ProfileSettings(size_step=32),
        ProfileSettings(static_size=(768, 700)),
    ],
)
def test_invalid_settings_are_refused(dims: ModelDims, settings: ProfileSettings) -> None:
    with pytest.raises(ValueError):
        engine_profile(COMPONENTS["unet"], dims, settings)


@pytest.mark.parametrize(
    ("max_size", "expected"),
    [(1024, (512, 768, 1024)), (768, (512, 768, 768)), (640, (512, 640, 640)), (256, (256, 256, 256))],
)
def test_profiles_follow_a_smaller_max_size(dims: ModelDims, max_size: int, expected: tuple) -> None:
    """A max image size below 768 (or 512) made an invalid profile and crashed the
    engine build (and, under `restart: unless-stopped`, looped). The minimum and optimum now follow it."""
    settings = ProfileSettings.for_max_size(max_size)
    assert (settings.min_size, settings.opt_size, settings.max_size) == expected
    profile = engine_profile(COMPONENTS["unet"], dims, settings)["sample"]
    assert profile["max"][-1] == max_size // dims.movq_scale_factor


def test_engines_cli_takes_a_small_max_size_and_refuses_an_invalid_one(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kandinsky_export.cli import main

    argv = ["engines", "--bundle", str(bundle), "--components", "unet", "--dry-run"]
    assert main([*argv, "--max-size", "640"]) == 0
    assert "max [8, 4, 80, 80]" in capsys.readouterr().out
    assert main([*argv, "--max-size", "600"]) == 2  # a clear refusal, not a traceback
    assert "image side 600 is not a positive multiple of 64" in capsys.readouterr().err
    assert main(["profile", "--max-size", "640"]) == 0
    assert json.loads(capsys.readouterr().out)["opt_size"] == 640
    assert main(["profile", "--max-size", "1000"]) == 2
    assert "1000" in capsys.readouterr().err


def test_choose_source() -> None:
    entry = {"files": ["model.onnx"], "default_precision": "fp32"}
    assert choose_source(entry, "default")[:2] == ("model.onnx", "fp32")
    assert choose_source(entry, "mixed")[2] == {"strongly_typed": False, "fp16_flag": True}
    with pytest.raises(FileNotFoundError, match="kandinsky-export fp16"):
        choose_source(entry, "fp16")
    variant = {"path": "fp16/model.onnx", "passed": True, "standard_ops_only": True}
    entry = {"files": ["model.onnx"], "default_precision": "fp16", "variants": {"fp16": variant}}
    assert choose_source(entry, "default") == (
        "fp16/model.onnx",
        "fp16",
        {"strongly_typed": True, "fp16_flag": False},
    )
    with pytest.raises(ValueError, match="contrib"):
        choose_source({**entry, "variants": {"fp16": {**variant, "standard_ops_only": False}}}, "fp16")
    with pytest.raises(ValueError, match="failed"):
        choose_source({**entry, "variants": {"fp16": {**variant, "passed": False}}}, "fp16")


def _fake_digest(path: Path) -> str:
    return f"sha-of-{path.parent.name}/{path.name}"


def _plan(bundle: Path, **overrides) -> dict[str, tuple[dict, str | None]]:
    kwargs = {
        "settings": ProfileSettings(),
        "precision": "default",
        "trt_version": "10.8.0.43",
        "gpu": GPU,
        "options": BuildOptions(),
        "digest": _fake_digest,
    }
    kwargs.update(overrides)
    return {c: (expected, reason) for c, expected, reason in plan_engines(bundle, ["unet"], **kwargs)}


def _install_fake_engine(bundle: Path, component: str, metadata: dict) -> None:
    engine_dir = bundle / component / ENGINE_DIR
    engine_dir.mkdir(parents=True, exist_ok=True)
    (engine_dir / ENGINE_FILE).write_bytes(b"not a real engine")
    record_engine(bundle, component, metadata)


def test_rebuild_decisions(bundle: Path) -> None:
    expected, reason = _plan(bundle)["unet"]
    assert reason == "no engine"
    engine_dir = bundle / "unet" / ENGINE_DIR
    engine_dir.mkdir(parents=True)
    (engine_dir / ENGINE_FILE).write_bytes(b"not a real engine")
    assert rebuild_reason(engine_dir, expected) == "no metadata sidecar"
    (engine_dir / METADATA_FILE).write_text("{not json")
    assert rebuild_reason(engine_dir, expected).startswith("unreadable metadata")

    _install_fake_engine(bundle, "unet", {**expected, "build_seconds": 12.0, "io_dtypes": {}})
    assert _plan(bundle)["unet"][1] is None  # informational fields do not trigger rebuilds
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["components"]["unet"]["tensorrt"]["engine"] == f"{ENGINE_DIR}/{ENGINE_FILE}"

    changes = {
        "tensorrt_version": {"trt_version": "10.9.0.34"},
        "gpu": {"gpu": {"name": "NVIDIA L40S", "compute_capability": "8.9"}},
        "profile": {"settings": ProfileSettings(static_size=(768, 768))},
        "source": {"digest": lambda path: "another-export"},
        "build": {"options": BuildOptions(builder_optimization_level=5)},
    }
    for field, override in changes.items():
        reason = _plan(bundle, **override)["unet"][1]
        assert reason is not None and reason.startswith(f"{field}:"), (field, reason)


def test_engines_cli_dry_run(bundle: Path, dims: ModelDims, capsys: pytest.CaptureFixture[str]) -> None:
    from kandinsky_export.cli import main

    argv = ["engines", "--bundle", str(bundle), "--components", "unet", "--static", "768x768", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "unet: fp32 from model.onnx; no engine" in out
    side, channels = 768 // dims.movq_scale_factor, dims.latent_channels
    top = COMPONENTS["unet"].max_batch_size
    assert f"min [1, {channels}, {side}, {side}] opt [2, {channels}, {side}, {side}]" in out  # one image
    assert f"max [{top}, {channels}, {side}, {side}]" in out


def test_engines_without_tensorrt_say_so(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from kandinsky_export.cli import main

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: tests/test_tensorrt_build.py covers the build")
    assert main(["engines", "--bundle", str(bundle), "--components", "unet"]) == 2
    assert "tensorrt package is not installed" in capsys.readouterr().err


def test_a_current_engine_is_recorded_again_after_a_re_export(bundle: Path, monkeypatch) -> None:
    """A re-export drops the manifest's engine records; an engine that is still current (same source
    digest, TensorRT, GPU, profile) is kept, not rebuilt, and the manifest points at it again."""
    import kandinsky_export.tensorrt_engine as engines
    from kandinsky_export.engine_check import ENGINE_TOLERANCE, check_record

    expected, _ = _plan(bundle)["unet"]
    passed = [
        {
            "profile": i,
            "size": p["optimum"],
            "shapes": {},
            "outputs": [{"output": "noise_pred", "max_abs_error": 0.0, "max_rel_error": 0.0, "finite": True}],
        }
        for i, p in enumerate(expected["profile"]["profiles"])
    ]
    built = {"activation_bytes": [1] * len(passed), "check": check_record(passed, ENGINE_TOLERANCE)}
    _install_fake_engine(bundle, "unet", {**expected, **built, "io_dtypes": {"sample": "FLOAT"}})
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["components"]["unet"]["tensorrt"]  # what a re-export leaves
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    monkeypatch.setattr(engines, "tensorrt_version", lambda: "10.8.0.43")
    monkeypatch.setattr(engines, "gpu_identity", lambda: GPU)
    monkeypatch.setattr(engines.layout, "onnx_digest", _fake_digest)
    monkeypatch.setattr(engines, "build_engine", lambda *a, **k: pytest.fail("a current engine was rebuilt"))
    (result,) = engines.build_engines(bundle, ["unet"])
    assert result.action == "up to date"
    entry = json.loads((bundle / "manifest.json").read_text())["components"]["unet"]
    assert entry["tensorrt"]["engine"] == f"{ENGINE_DIR}/{ENGINE_FILE}"
    assert json.loads((bundle / "unet" / ENGINE_DIR / METADATA_FILE).read_text())["io_dtypes"] == {
        "sample": "FLOAT"
    }
