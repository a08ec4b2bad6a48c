"""Several TensorRT optimisation profiles per engine, and the engine-vs-ONNX check after each build,
without TensorRT: the profiles, the sidecar, the rebuild decision, the Triton config and the check's
judgement and recording. The TensorRT parts (building several profiles, running an engine, reading its
activation memory) run in tests/test_tensorrt_build.py where TensorRT and a GPU exist.

Where an engine must run here, `OnnxStandInEngine` stands in for it: a TEST DOUBLE that runs the
component's FP32 ONNX on ONNX Runtime (CPU), refuses shapes outside the profile it is asked to run on, as
TensorRT does, and can corrupt its outputs. It is never a TensorRT engine.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kandinsky_core.components import COMPONENTS, DTYPES, ModelDims
from kandinsky_core.profiles import (
    PROFILE_OPT_SIZES,
    ProfileSettings,
    engine_profile,
    engine_profiles,
    image_size_limits,
    instance_activation_memory,
)
from kandinsky_export.engine_check import ENGINE_TOLERANCE, check_record
from kandinsky_export.tensorrt_engine import (
    ENGINE_DIR,
    ENGINE_FILE,
    METADATA_FILE,
    BuildOptions,
    EngineCheckError,
    plan_engines,
    read_engine_metadata,
    rebuild_reason,
    record_engine,
)

GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
TRT_VERSION = "10.8.0.43"
MIB = 2**20


@pytest.fixture(scope="module")
def dims(tiny_bundle) -> ModelDims:
    return ModelDims.from_dict(json.loads((tiny_bundle[0] / "manifest.json").read_text())["dims"])


@pytest.fixture()
def bundle(tiny_bundle, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], target)
    return target


# --------------------------------------------------------------------------------------------------
# several profiles


def triton_profile_choice(
    profiles: Sequence[Mapping[str, Mapping[str, Sequence[int]]]], shapes: Mapping[str, Sequence[int]]
) -> int | None:
    """The profile Triton's TensorRT backend runs a request on (`GetMostOptimizedProfile` and
    `EvaluateTensorRTContext` in its instance_state.cc): among the listed profiles whose [min, max]
    holds every input shape, the smallest sum over inputs and axes (batch included) of |opt - shape|;
    the first on a tie. None: no profile takes the request (Triton fails it)."""
    best, best_distance = None, math.inf
    for index, profile in enumerate(profiles):
        distance = 0
        for name, shape in shapes.items():
            ranges = profile[name]
            if not all(
                low <= d <= high for d, low, high in zip(shape, ranges["min"], ranges["max"], strict=True)
            ):
                distance = math.inf
                break
            distance += sum(abs(o - d) for o, d in zip(ranges["opt"], shape, strict=True))
        if distance < best_distance:
            best, best_distance = index, distance
    return best


def _shapes(spec, dims: ModelDims, batch: int, height: int, width: int) -> dict[str, list[int]]:
    from kandinsky_core.profiles import input_shapes

    return input_shapes(spec, dims, batch, height, width)


def test_the_engines_get_one_profile_per_optimum(dims: ModelDims) -> None:
    """One profile tuned for 768 px at one image (the old engines) left the client's default 512 px and
    1024 px far from the optimum. Now: optima 512, 768, 1024, each from the smallest side to halfway to
    the next optimum, each over every batch 1 .. max_batch_size with one image's rows as the optimum."""
    assert PROFILE_OPT_SIZES == (512, 768, 1024)
    spec = COMPONENTS["unet"]
    scale = dims.movq_scale_factor
    profiles = engine_profiles(spec, dims, ProfileSettings())
    sample = [p["sample"] for p in profiles]
    assert [s["opt"][2:] for s in sample] == [[side // scale] * 2 for side in (512, 768, 1024)]
    assert [s["max"][2:] for s in sample] == [[side // scale] * 2 for side in (640, 896, 1024)]
    assert all(s["min"][2:] == [512 // scale] * 2 for s in sample)  # height and width vary independently
    assert all([s["min"][0], s["opt"][0], s["max"][0]] == [1, 2, spec.max_batch_size] for s in sample)
    # models without image axes: one profile (several would be the same)
    for name in ("text_encoder", "prior", "image_encoder"):
        assert len(engine_profiles(COMPONENTS[name], dims, ProfileSettings())) == 1, name
    # the single profile (ONNX Runtime's TensorRT accelerator) is unchanged: 512 .. 1024, tuned for 768
    single = engine_profile(spec, dims, ProfileSettings())["sample"]
    assert [single[k][2] for k in ("min", "opt", "max")] == [side // scale for side in (512, 768, 1024)]


@pytest.mark.parametrize("component", ["unet", "unet_controlnet", "movq_encoder", "movq_decoder"])
def test_every_served_size_and_batch_finds_the_nearest_profile(dims: ModelDims, component: str) -> None:
    """Every (height, width) the client may send (any pair of sides on the grid) and every batch up to
    the limit is taken by some profile, and Triton's choice is the profile tuned nearest the size."""
    spec = COMPONENTS[component]
    settings = ProfileSettings()
    profiles = engine_profiles(spec, dims, settings)
    optima = settings.profile_optima()
    sides = settings.image_sides()
    for height, width in itertools.product(sides, sides):
        for batch in range(1, spec.max_batch_size + 1):
            choice = triton_profile_choice(profiles, _shapes(spec, dims, batch, height, width))
            assert choice is not None, (height, width, batch)
            if height == width:
                nearest = min(abs(o - height) for o in optima)
                assert abs(optima[choice] - height) == nearest, (height, batch, choice)
    # a tall image goes to the one profile that reaches its long side
    assert triton_profile_choice(profiles, _shapes(spec, dims, 2, 512, 1024)) == len(profiles) - 1
    limits = image_size_limits(dims.size_multiple, 1024, settings)
    assert (limits["min"], limits["max"], limits["static"]) == (512, 1024, None)


@pytest.mark.parametrize(
    ("settings", "optima", "ceilings"),
    [
        (ProfileSettings.for_max_size(1024), [512, 768, 1024], [640, 896, 1024]),
        (ProfileSettings.for_max_size(768), [512, 768], [640, 768]),
        (ProfileSettings.for_max_size(640), [512, 640], [576, 640]),
        (ProfileSettings.for_max_size(256), [256], [256]),
        (ProfileSettings.for_max_size(1024, opt_sizes=(768,)), [768], [1024]),  # one profile, less memory
        (ProfileSettings.for_max_size(1024, min_size=768), [768, 1024], [896, 1024]),
    ],
)
def test_optima_follow_the_served_range(settings: ProfileSettings, optima: list, ceilings: list) -> None:
    settings.validate()
    assert settings.profile_optima() == optima
    assert [(opt[0], top[0]) for _, opt, top in settings.size_ranges()] == list(
        zip(optima, ceilings, strict=True)
    )
    assert ProfileSettings.from_dict(settings.as_dict()).size_ranges() == settings.size_ranges()


def test_a_static_size_stays_one_profile(dims: ModelDims) -> None:
    settings = ProfileSettings(static_size=(768, 512))
    (profile,) = engine_profiles(COMPONENTS["movq_decoder"], dims, settings)
    scale = dims.movq_scale_factor
    assert profile["latents"]["min"][2:] == profile["latents"]["max"][2:] == [768 // scale, 512 // scale]


@pytest.mark.parametrize("opt_sizes", [(800,), (512, 1280), (448,)])
def test_optima_off_the_grid_or_outside_the_range_are_refused(dims: ModelDims, opt_sizes: tuple) -> None:
    with pytest.raises(ValueError, match=str(opt_sizes[-1])):
        engine_profiles(COMPONENTS["unet"], dims, ProfileSettings.for_max_size(1024, opt_sizes=opt_sizes))


def test_activation_memory_of_one_instance() -> None:
    """Triton makes one execution context per listed profile; with TensorRT's default (STATIC) each
    allocates the largest profile's activations, with ON_PROFILE_CHANGE each its own."""
    memory = instance_activation_memory([1 * MIB, 2 * MIB, 4 * MIB])
    assert memory == {
        "per_profile_bytes": [MIB, 2 * MIB, 4 * MIB],
        "per_instance_bytes": 12 * MIB,
        "on_profile_change_bytes": 7 * MIB,
    }
    with pytest.raises(ValueError, match="rebuild"):
        instance_activation_memory([])


def _plan(bundle: Path, components: Sequence[str], settings: ProfileSettings | None = None) -> list:
    return plan_engines(
        bundle,
        components,
        settings=settings or ProfileSettings(),
        precision="default",
        trt_version=TRT_VERSION,
        gpu=GPU,
        options=BuildOptions(),
        digest=lambda path: f"sha-of-{path.parent.name}",
    )


def test_the_sidecar_records_every_profile_and_an_old_single_profile_engine_is_rebuilt(
    bundle: Path, dims: ModelDims
) -> None:
    ((_, expected, _),) = _plan(bundle, ["unet"])
    entries = expected["profile"]["profiles"]
    assert [e["optimum"] for e in entries] == [[512, 512], [768, 768], [1024, 1024]]
    assert [e["inputs"] for e in entries] == engine_profiles(COMPONENTS["unet"], dims, ProfileSettings())
    assert expected["profile"]["max_batch_size"] == COMPONENTS["unet"].max_batch_size
    ((_, prior, _),) = _plan(bundle, ["prior"])
    assert [e["optimum"] for e in prior["profile"]["profiles"]] == [None]

    # What the single-profile builder recorded (format 1), for an engine that was current then
    old_settings = {"min_size": 512, "opt_size": 768, "max_size": 1024, "size_step": 64, "static_size": None}
    old = {key: value for key, value in expected.items() if key != "profile"}
    old["format"] = 1
    old["profile"] = {
        "inputs": engine_profile(COMPONENTS["unet"], dims, ProfileSettings()),
        "settings": old_settings,
        "max_batch_size": COMPONENTS["unet"].max_batch_size,
    }
    engine_dir = bundle / "unet" / ENGINE_DIR
    engine_dir.mkdir(parents=True)
    (engine_dir / ENGINE_FILE).write_bytes(b"a single-profile engine")
    record_engine(bundle, "unet", {**old, "io_dtypes": {}})
    reason = rebuild_reason(engine_dir, expected)
    assert reason is not None and "format: 1 -> 2" in reason and "profile:" in reason


# --------------------------------------------------------------------------------------------------
# The Triton config of a multi-profile engine


def _exact_outputs(component: str) -> list[dict[str, Any]]:
    return [
        {"output": t.name, "max_abs_error": 0.0, "max_rel_error": 0.0, "finite": True}
        for t in COMPONENTS[component].outputs
    ]


def _install_engines(
    bundle: Path, plans: Sequence, activation: Callable[[int], int] = lambda i: (i + 1) * MIB
):
    """Placeholder engines with the sidecars a GPU build writes: made-up activation memory, a passed check."""
    for component, expected, _ in plans:
        spec = COMPONENTS[component]
        profiles = expected["profile"]["profiles"]
        engine = bundle / component / ENGINE_DIR / ENGINE_FILE
        engine.parent.mkdir(parents=True, exist_ok=True)
        engine.write_bytes(f"placeholder engine for {component}".encode())
        measured = [
            {"profile": i, "size": p["optimum"], "shapes": {}, "outputs": _exact_outputs(component)}
            for i, p in enumerate(profiles)
        ]
        record_engine(
            bundle,
            component,
            {
                **expected,
                "io_dtypes": {t.name: DTYPES[t.dtype].tensorrt for t in (*spec.inputs, *spec.outputs)},
                "activation_bytes": [activation(i) for i in range(len(profiles))],
                "check": check_record(measured, ENGINE_TOLERANCE),
            },
        )


@pytest.fixture(scope="module")
def engine_bundle(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("profiles") / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    _install_engines(bundle, _plan(bundle, None))
    return bundle


def _generate(bundle: Path, out: Path, **options):
    from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository

    generate_repository(bundle, out, RepositoryOptions(flavour="tensorrt", **options))
    return out


def test_triton_lists_every_profile_warms_each_and_knows_their_memory(
    engine_bundle: Path, tmp_path: Path
) -> None:
    """Triton uses only the profiles `instance_group { profile: [...] }` lists (unlisted: profile 0
    alone, and a 1024 px request on it fails); each listed profile is one execution context."""
    from kandinsky_repository.generator.kandinsky_model_config import decoded_parameters
    from kandinsky_repository.generator.repository import read_config

    repository = _generate(engine_bundle, tmp_path / "repo", instances=2)
    unet = read_config(repository / "unet")
    assert [list(g.profile) for g in unet.instance_group] == [["0", "1", "2"]]
    assert unet.instance_group[0].count == 2
    parameters = decoded_parameters(unet)
    assert parameters["execution_context_allocation_strategy"] == "ON_PROFILE_CHANGE"
    assert parameters["tensorrt_activation_memory"] == {
        "per_profile_bytes": [MIB, 2 * MIB, 3 * MIB],
        "per_instance_bytes": 9 * MIB,  # what r25.01 allocates: 3 contexts x the largest
        "on_profile_change_bytes": 6 * MIB,
    }
    assert parameters["tensorrt_profile"]["opt_sizes"] == [512, 768, 1024]
    # one warm-up per profile, each at its optimum (one image's rows), so no context starts cold
    sample = [list(w.inputs["sample"].dims) for w in unet.model_warmup]
    scale = json.loads((engine_bundle / "manifest.json").read_text())["dims"]["movq_scale_factor"]
    latent = json.loads((engine_bundle / "manifest.json").read_text())["dims"]["latent_channels"]
    assert sample == [[latent, side // scale, side // scale] for side in (512, 768, 1024)]
    assert [w.batch_size for w in unet.model_warmup] == [COMPONENTS["unet"].rows_per_image] * 3
    assert not unet.optimization.cuda.graphs  # spatially dynamic: no CUDA graphs
    assert list(unet.input[0].dims)[1:] == [-1, -1]

    prior = read_config(repository / "prior")  # no image axes: one profile, CUDA graphs per batch
    assert [list(g.profile) for g in prior.instance_group] == [["0"]]
    assert "execution_context_allocation_strategy" not in prior.parameters
    assert prior.optimization.cuda.graphs and len(prior.model_warmup) == 1


def test_an_engine_of_the_single_profile_format_is_refused(engine_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle, bundle)
    sidecar = bundle / "unet" / ENGINE_DIR / METADATA_FILE
    metadata = json.loads(sidecar.read_text())
    metadata["profile"] = {**metadata["profile"], "inputs": metadata["profile"].pop("profiles")[0]["inputs"]}
    for key in ("activation_bytes", "check"):
        metadata.pop(key)
    sidecar.write_text(json.dumps(metadata))
    with pytest.raises(
        ValueError, match="older kandinsky-export.*kandinsky-export engines --components unet"
    ):
        _generate(bundle, tmp_path / "repo")


# --------------------------------------------------------------------------------------------------
# The engine-vs-ONNX check


def _measured(errors: Sequence[float], finite: bool = True) -> list[dict[str, Any]]:
    return [
        {
            "profile": i,
            "size": [512, 512],
            "shapes": {},
            "outputs": [{"output": "noise_pred", "max_abs_error": e, "max_rel_error": e, "finite": finite}],
        }
        for i, e in enumerate(errors)
    ]


def test_the_check_judges_every_output_of_every_profile() -> None:
    assert check_record(_measured([1e-3, 2e-3]), ENGINE_TOLERANCE)["passed"]
    failed = check_record(_measured([1e-3, 0.5]), ENGINE_TOLERANCE)
    assert not failed["passed"]
    assert [o["passed"] for p in failed["profiles"] for o in p["outputs"]] == [True, False]
    # NaN never passes, whatever the numbers say, and is written as null (JSON has no NaN)
    nan = check_record(_measured([math.nan]), ENGINE_TOLERANCE)
    assert not nan["passed"] and nan["profiles"][0]["outputs"][0]["max_rel_error"] is None
    assert not check_record(_measured([0.0], finite=False), ENGINE_TOLERANCE)["passed"]
    assert not check_record([], ENGINE_TOLERANCE)["passed"]  # a check of nothing


class OnnxStandInEngine:
    """TEST DOUBLE for a TensorRT engine (there is none here): runs the component's FP32 ONNX on ONNX
    Runtime's CPU provider. It reads the profiles the faked builder wrote into the placeholder plan,
    refuses shapes outside the profile it runs on (as TensorRT does) and applies `corrupt` to the
    outputs, so the check's recording and judgement are exercised on real inputs and a real graph."""

    def __init__(self, plan: Path, corrupt: Callable[[int, dict], dict] | None, calls: list) -> None:
        from kandinsky_export.onnx_export import onnx_session

        self.profiles = json.loads(plan.read_text())
        self.session = onnx_session(plan.parent.parent / "model.onnx")
        self.corrupt = corrupt
        self.calls = calls

    def __enter__(self) -> OnnxStandInEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        del self.session

    def profile_count(self) -> int:
        return len(self.profiles)

    def activation_bytes(self, profile: int) -> int:
        return (profile + 1) * MIB

    def run(self, profile: int, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from kandinsky_export.onnx_export import run_session

        for name, value in inputs.items():
            ranges = self.profiles[profile][name]
            inside = all(
                lo <= d <= hi for d, lo, hi in zip(value.shape, ranges["min"], ranges["max"], strict=True)
            )
            assert inside, f"profile {profile} does not take {name} of shape {value.shape}"
        self.calls.append((profile, {name: list(value.shape) for name, value in inputs.items()}))
        outputs = run_session(self.session, dict(inputs))
        return self.corrupt(profile, outputs) if self.corrupt else outputs


@pytest.fixture()
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TensorRT here: the version and GPU are made up, and the builder writes the profiles it was
    given into the placeholder plan (for the stand-in engine to read)."""
    import kandinsky_export.tensorrt_engine as engines

    def build_engine(onnx_path, engine_path, profiles, **flags) -> dict[str, str]:
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        engine_path.write_text(json.dumps(list(profiles)))
        spec = COMPONENTS[engine_path.parent.parent.name]
        return {t.name: DTYPES[t.dtype].tensorrt for t in (*spec.inputs, *spec.outputs)}

    monkeypatch.setattr(engines, "tensorrt_version", lambda: TRT_VERSION)
    monkeypatch.setattr(engines, "gpu_identity", lambda: GPU)
    monkeypatch.setattr(engines, "build_engine", build_engine)


# Small sizes keep the recorded runs short; the logic is the same at 512 .. 1024.
SMALL = ProfileSettings.for_max_size(256, min_size=128, opt_sizes=(128, 256))


def _build(bundle: Path, components: Sequence[str], corrupt=None, calls=None):
    from kandinsky_export.tensorrt_engine import build_engines

    calls = [] if calls is None else calls
    return build_engines(
        bundle,
        components,
        settings=SMALL,
        open_engine=lambda plan: OnnxStandInEngine(plan, corrupt, calls),
    )


def test_every_built_engine_is_compared_with_its_onnx_at_each_profile(bundle: Path, fake_gpu) -> None:
    calls: list = []
    results = _build(bundle, ["unet", "prior"], calls=calls)
    assert [r.action for r in results] == ["built", "built"] and all(r.check_passed for r in results)
    unet = read_engine_metadata(bundle / "unet")
    assert unet["activation_bytes"] == [MIB, 2 * MIB]
    check = unet["check"]
    assert check["passed"] and check["tolerance"] == ENGINE_TOLERANCE
    assert [p["size"] for p in check["profiles"]] == [[128, 128], [256, 256]]
    scale = json.loads((bundle / "manifest.json").read_text())["dims"]["movq_scale_factor"]
    # each profile ran the recorded inputs of its own optimum size: latents at 128 and 256 px
    unet_calls = [(profile, shapes) for profile, shapes in calls if "sample" in shapes]
    assert [(p, s["sample"][2:]) for p, s in unet_calls] == [(0, [16, 16]), (1, [256 // scale] * 2)]
    assert 128 // scale == 16
    assert all(o["max_rel_error"] == 0.0 and o["passed"] for p in check["profiles"] for o in p["outputs"])
    assert [o["output"] for o in check["profiles"][0]["outputs"]] == ["noise_pred"]
    prior = read_engine_metadata(bundle / "prior")["check"]
    assert [p["size"] for p in prior["profiles"]] == [None] and prior["passed"]


@pytest.mark.parametrize(
    ("corrupt", "said"),
    [
        (
            lambda profile, out: {k: v * 1.5 + 1.0 if profile == 1 else v for k, v in out.items()},
            "max rel error",
        ),
        (lambda profile, out: {k: np.full_like(v, np.nan) for k, v in out.items()}, "NaN/Inf"),
    ],
    ids=["off-by-more-than-the-tolerance", "nan"],
)
def test_a_failing_engine_fails_the_build_and_is_never_served(
    bundle: Path, engine_bundle: Path, fake_gpu, monkeypatch, tmp_path: Path, corrupt, said: str
) -> None:
    with pytest.raises(EngineCheckError, match=f"unet: noise_pred on profile .*{said}") as error:
        _build(bundle, ["unet"], corrupt=corrupt)
    assert "--precision fp32" in str(error.value)
    recorded = read_engine_metadata(bundle / "unet")  # recorded all the same, for the operator to read
    assert recorded["check"]["passed"] is False
    json.loads((bundle / "unet" / ENGINE_DIR / METADATA_FILE).read_text())  # valid JSON, no NaN

    # the next run keeps the engine (nothing changed) and fails again, without rebuilding it
    import kandinsky_export.tensorrt_engine as engines

    def no_rebuild(*args, **kwargs):
        pytest.fail("an engine whose inputs did not change was rebuilt")

    monkeypatch.setattr(engines, "build_engine", no_rebuild)
    with pytest.raises(EngineCheckError):
        _build(bundle, ["unet"])

    # and the repository generator refuses it
    served = tmp_path / "served"
    shutil.copytree(engine_bundle, served)
    shutil.copytree(bundle / "unet" / ENGINE_DIR, served / "unet" / ENGINE_DIR, dirs_exist_ok=True)
    with pytest.raises(ValueError, match=f"unet: the engine failed its engine-vs-ONNX check.*{said}"):
        _generate(served, tmp_path / "repo")


def test_an_engine_without_a_check_is_not_served(engine_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle, bundle)
    sidecar = bundle / "movq_decoder" / ENGINE_DIR / METADATA_FILE
    metadata = json.loads(sidecar.read_text())
    del metadata["check"]
    sidecar.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="movq_decoder: the engine has no engine-vs-ONNX check"):
        _generate(bundle, tmp_path / "repo")


def test_the_engines_cli_prints_every_profile(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kandinsky_export.cli import main

    argv = ["engines", "--bundle", str(bundle), "--components", "unet", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert [line.strip() for line in out.splitlines() if "profile" in line] == [
        f"profile {i} (tuned for {side}x{side}):" for i, side in enumerate((512, 768, 1024))
    ]
    assert main([*argv, "--opt-sizes", "768"]) == 0  # one profile: the memory of one context
    assert "profile 1" not in capsys.readouterr().out
    assert main(["profile", "--opt-sizes", "512", "1024"]) == 0
    assert json.loads(capsys.readouterr().out)["opt_sizes"] == [512, 1024]


def test_the_engines_cli_exits_non_zero_when_a_check_fails(
    bundle: Path, fake_gpu, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kandinsky_export.tensorrt_engine as engines
    from kandinsky_export.cli import main

    def nan_engine(plan: Path) -> OnnxStandInEngine:  # the stand-in in place of TensorRTRunner
        return OnnxStandInEngine(plan, lambda profile, out: {k: v * np.nan for k, v in out.items()}, [])

    monkeypatch.setattr(engines, "TensorRTRunner", nan_engine)
    argv = ["engines", "--bundle", str(bundle), "--components", "movq_decoder", "--max-size", "256"]
    assert main([*argv, "--min-size", "128", "--opt-sizes", "128", "256"]) == 1
    err = capsys.readouterr().err
    assert "engine-vs-ONNX check failed" in err and "movq_decoder: image on profile" in err
    assert "--precision fp32" in err
