"""TensorRT engine planning without TensorRT: profiles from the registry, sidecars, rebuild decisions.

The build itself needs `tensorrt` and a GPU: see tests/test_tensorrt_build.py (skipped elsewhere).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from kandinsky_client.components import COMPONENTS, MAX_IMAGES_PER_REQUEST, ModelDims
from kandinsky_export.tensorrt_engine import (
    ENGINE_DIR,
    ENGINE_FILE,
    METADATA_FILE,
    BuildOptions,
    ProfileSettings,
    batch_per_image,
    choose_source,
    engine_profile,
    is_spatially_static,
    plan_engines,
    profile_shapes_option,
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


def test_batch_ranges_follow_the_registry(dims: ModelDims) -> None:
    settings = ProfileSettings()
    for name, spec in COMPONENTS.items():
        profile = engine_profile(spec, dims, settings)
        assert set(profile) == {t.name for t in spec.inputs}, name
        for shapes in profile.values():
            assert shapes["min"][0] == 1, name  # Triton's dynamic batcher may send any batch size
            assert shapes["opt"][0] == batch_per_image(spec), name
            assert shapes["max"][0] == spec.max_batch_size, name
    # classifier-free guidance doubles the UNet's batch; the prior sees four rows per image
    assert batch_per_image(COMPONENTS["unet"]) * MAX_IMAGES_PER_REQUEST == COMPONENTS["unet"].max_batch_size
    assert batch_per_image(COMPONENTS["unet"]) == 2


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
    assert f"min [1, {channels}, {side}, {side}] opt [2, {channels}, {side}, {side}]" in out
    assert f"max [{top}, {channels}, {side}, {side}]" in out


def test_engines_without_tensorrt_say_so(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from kandinsky_export.cli import main

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: tests/test_tensorrt_build.py covers the build")
    assert main(["engines", "--bundle", str(bundle), "--components", "unet"]) == 2
    assert "tensorrt package is not installed" in capsys.readouterr().err
