"""The onnxruntime GPU flavour and what serves it: the CUDA-fused FP16 variant, heuristic cuDNN search,
warm-ups at the traffic's shapes, the TensorRT engine cache built in the prepare step, the exact TensorRT pin.

The CUDA-fused FP16 variant lives next to the portable one and is served on the CUDA provider
where it passed (never under TensorRT); cuDNN's convolution search is the heuristic one; every network
model is warmed up at the shapes the traffic sends. ONNX Runtime's TensorRT engine cache is built
by the prepare step (a Triton on loopback, no time limit), the Helm Job writes READY only after it, and
kandinsky-serve never starts a timed load on an unbuilt cache. The TensorRT wheel is pinned to
all four parts of the version libnvinfer reports, and checked exactly.

What needs a GPU runs at the end, marked `gpu` and skipped elsewhere with the reason: the CUDA-fused
variant's real check (ONNX Runtime's CUDA provider) and a real engine-cache build (Triton's onnxruntime
backend with TensorRT). Here they have stand-ins, each labelled where it is made: a fused-variant manifest
entry written by the test, the python-backend tokenizer loaded in place of an accelerated model, stub
commands for the Docker and Helm scripts and for pip.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from kandinsky_core.bundle import FP16_CUDA_DIR, FP16_DIR, onnx_digest
from kandinsky_core.components import COMPONENTS, ModelDims
from kandinsky_core.profiles import ProfileSettings, has_spatial_axes
from kandinsky_export.fp16 import convert_bundle
from kandinsky_repository.generator.onnxruntime_flavour import (
    CONV_ALGO_SEARCH,
    CUDNN_CONV_ALGO_SEARCH,
    ONNX_SOURCE_PARAMETER,
    select_variant,
)
from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository, read_config

from .test_docker import ENTRYPOINT, STUBS

ROOT = Path(__file__).resolve().parents[1]
CHECK_SIZE = (128, 128)  # the FP16 check's real run, small to keep this fast
FUSED_MARK = "test stand-in for a CUDA-fused graph"


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with the portable FP16 variant of the UNet (the other components stay FP32)."""
    bundle = tmp_path_factory.mktemp("ort-fp16") / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    convert_bundle(bundle, ["unet"], check_size=CHECK_SIZE)
    return bundle


def _add_fused_variant(bundle: Path, component: str = "unet", *, passed: bool = True) -> None:
    """STAND-IN: record a `variants.fp16_cuda` for `component` as `kandinsky-export fp16 --fusions cuda`
    writes it on a GPU. Its check needs ONNX Runtime's CUDA provider, which this machine lacks, so the
    file is the portable graph with a doc string marking it (FUSED_MARK); what is tested is which file the
    generator serves, not the fused graph (test_the_cuda_fused_variant_on_the_gpu checks that)."""
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    portable = manifest["components"][component]["variants"][FP16_DIR]
    model = onnx.load(str(bundle / component / portable["path"]))
    model.doc_string = FUSED_MARK
    (bundle / component / FP16_CUDA_DIR).mkdir()
    onnx.save_model(model, str(bundle / component / FP16_CUDA_DIR / "model.onnx"))
    manifest["components"][component]["variants"][FP16_CUDA_DIR] = {
        **portable,
        "path": f"{FP16_CUDA_DIR}/model.onnx",
        "files": [f"{FP16_CUDA_DIR}/model.onnx"],
        "fusion_set": "cuda",
        "standard_ops_only": False,
        "passed": passed,
    }
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def fused_bundle(fp16_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("ort-fused") / "bundle"
    shutil.copytree(fp16_bundle, bundle)
    _add_fused_variant(bundle)
    return bundle


@pytest.fixture(scope="module")
def ort_repositories(fused_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The onnxruntime flavour of the bundle with a fused variant: on the CUDA provider, and with
    ONNX Runtime's TensorRT accelerator."""
    root = tmp_path_factory.mktemp("ort-repos")
    out = {}
    for name, ort_tensorrt in (("cuda", False), ("tensorrt", True)):
        out[name] = root / name / "model_repository"
        options = RepositoryOptions(flavour="onnxruntime", ort_tensorrt=ort_tensorrt)
        generate_repository(fused_bundle, out[name], options)
    return out


def _network_models(repository: Path) -> list[str]:
    return sorted(name for name in COMPONENTS if (repository / name / "config.pbtxt").is_file())


# -- which variant is served ----------------------------------------------------------------


def test_select_variant_prefers_the_passed_cuda_fused_variant_on_the_cuda_provider_only() -> None:
    portable = {"files": ["fp16/model.onnx"], "passed": True}
    fused = {"files": ["fp16_cuda/model.onnx"], "passed": True}
    entry = {
        "files": ["model.onnx"],
        "default_precision": "fp16",
        "variants": {"fp16": portable, "fp16_cuda": fused},
    }
    assert select_variant(entry, "default", cuda_fusions=True) == ("fp16", ["fp16_cuda/model.onnx"])
    assert select_variant(entry, "fp16", cuda_fusions=True) == ("fp16", ["fp16_cuda/model.onnx"])
    # TensorRT (the accelerator) parses standard ONNX operators only: the portable variant
    assert select_variant(entry, "default", cuda_fusions=False) == ("fp16", ["fp16/model.onnx"])
    assert select_variant(entry, "fp32", cuda_fusions=True) == ("fp32", ["model.onnx"])
    # a fused variant that failed its own check is not served; the portable one is
    failed = {**entry, "variants": {"fp16": portable, "fp16_cuda": {**fused, "passed": False}}}
    assert select_variant(failed, "default", cuda_fusions=True) == ("fp16", ["fp16/model.onnx"])
    # `default` follows the portable check's verdict (what the TensorRT side serves too)
    fp32_default = {**entry, "default_precision": "fp32"}
    assert select_variant(fp32_default, "default", cuda_fusions=True) == ("fp32", ["model.onnx"])
    assert select_variant(fp32_default, "fp16", cuda_fusions=True) == ("fp16", ["fp16_cuda/model.onnx"])
    with pytest.raises(FileNotFoundError, match="kandinsky-export fp16"):
        select_variant({"files": ["model.onnx"]}, "fp16", cuda_fusions=True)


def test_the_cuda_provider_serves_the_fused_variant_and_the_tensorrt_accelerator_the_portable_one(
    ort_repositories: dict[str, Path], fused_bundle: Path
) -> None:
    """The flavour served the portable FP16 graph (no GroupNorm/attention fusion) everywhere."""
    for flavour, expected in (
        ("cuda", f"{FP16_CUDA_DIR}/model.onnx"),
        ("tensorrt", f"{FP16_DIR}/model.onnx"),
    ):
        repository = ort_repositories[flavour]
        unet = read_config(repository / "unet")
        assert unet.parameters["precision"].string_value == "fp16"
        assert unet.parameters[ONNX_SOURCE_PARAMETER].string_value == expected, flavour
        served = onnx.load(str(repository / "unet" / "1" / "model.onnx"), load_external_data=False)
        assert (served.doc_string == FUSED_MARK) == (flavour == "cuda"), flavour
        # components without a fused variant serve what they served before (FP32 here)
        text_encoder = read_config(repository / "text_encoder")
        assert text_encoder.parameters[ONNX_SOURCE_PARAMETER].string_value == "model.onnx"
    accelerator = read_config(ort_repositories["tensorrt"] / "unet").optimization.execution_accelerators
    assert accelerator.gpu_execution_accelerator[0].parameters["precision_mode"] == "FP16"


def test_a_failed_fused_variant_is_not_served(fp16_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(fp16_bundle, bundle)
    _add_fused_variant(bundle, passed=False)
    repository = tmp_path / "repo"
    generate_repository(bundle, repository, RepositoryOptions(flavour="onnxruntime"))
    unet = read_config(repository / "unet")
    assert unet.parameters[ONNX_SOURCE_PARAMETER].string_value == f"{FP16_DIR}/model.onnx"


def test_cudnn_searches_convolution_algorithms_by_heuristic(ort_repositories: dict[str, Path]) -> None:
    """The configs set no `cudnn_conv_algo_search`, and Triton r25.01's onnxruntime backend then
    uses EXHAUSTIVE (its parameter is an integer: 0 EXHAUSTIVE, 1 HEURISTIC, 2 DEFAULT), benchmarking
    every convolution again for each new shape inside a request."""
    assert CUDNN_CONV_ALGO_SEARCH == {"EXHAUSTIVE": 0, "HEURISTIC": 1, "DEFAULT": 2}
    assert CONV_ALGO_SEARCH == "HEURISTIC"
    for repository in ort_repositories.values():
        for name in _network_models(repository):
            parameters = read_config(repository / name).parameters
            assert parameters["cudnn_conv_algo_search"].string_value == "1", name


# -- warm-up at the shapes the traffic has ---------------------------------------------------


def _warmups(config) -> set[tuple[int, tuple[tuple[str, tuple[int, ...]], ...]]]:
    return {
        (w.batch_size, tuple(sorted((name, tuple(i.dims)) for name, i in w.inputs.items())))
        for w in config.model_warmup
    }


def test_every_network_model_is_warmed_up_at_the_shapes_the_traffic_sends(
    ort_repositories: dict[str, Path], fused_bundle: Path
) -> None:
    """One warm-up, at 768 px and one image's rows: the first request at 512 or 1024 px, and the
    first batched step of concurrent generations, paid the memory growth and the cuDNN set-up."""
    from kandinsky_core.profiles import input_shapes

    dims = ModelDims.from_dict(json.loads((fused_bundle / "manifest.json").read_text())["dims"])
    optima = ProfileSettings.for_max_size().profile_optima()
    assert len(optima) == 3
    for repository in ort_repositories.values():
        for name in _network_models(repository):
            spec = COMPONENTS[name]
            config = read_config(repository / name)
            batches = [spec.rows_per_image] + ([spec.max_batch_size] if spec.called_per_step else [])
            sides = optima if has_spatial_axes(spec) else optima[1:2]
            expected = set()
            for side in sides:
                for batch in batches:
                    shapes = input_shapes(spec, dims, batch, side, side)
                    per_item = tuple(sorted((t, tuple(s[1:] or [1])) for t, s in shapes.items()))
                    expected.add((batch, per_item))
            assert _warmups(config) == expected, name
            assert len(config.model_warmup) == len(sides) * len(batches), name
            for warmup in config.model_warmup:  # integer inputs stay in range: zeros, never random
                for tensor in spec.inputs:
                    sample = warmup.inputs[tensor.name]
                    assert sample.random_data == tensor.dtype.startswith("float"), (name, tensor.name)
    unet = read_config(ort_repositories["cuda"] / "unet")
    scale = dims.movq_scale_factor
    assert {(w.batch_size, tuple(w.inputs["sample"].dims)[1:]) for w in unet.model_warmup} == {
        (batch, (side // scale, side // scale)) for batch in (2, 8) for side in optima
    }
    assert sorted(w.batch_size for w in read_config(ort_repositories["cuda"] / "prior").model_warmup) == [
        4,
        16,
    ]


def test_warmups_stay_inside_the_tensorrt_accelerators_profile(ort_repositories: dict[str, Path]) -> None:
    repository = ort_repositories["tensorrt"]
    for name in _network_models(repository):
        config = read_config(repository / name)
        parameters = config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
        low, high = (
            {k: [int(d) for d in v.split("x")] for k, v in (i.split(":") for i in parameters[p].split(","))}
            for p in ("trt_profile_min_shapes", "trt_profile_max_shapes")
        )
        for warmup in config.model_warmup:
            for tensor, sample in warmup.inputs.items():
                shape = [warmup.batch_size, *sample.dims] if len(low[tensor]) > 1 else [warmup.batch_size]
                assert all(a <= s <= b for a, s, b in zip(low[tensor], shape, high[tensor], strict=True)), (
                    name,
                    tensor,
                    shape,
                )


# -- the bundle holds both FP16 variants -------------------------------------------------------


def _snapshot(bundle: Path, component: str) -> tuple[dict, dict[str, bytes]]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {p.name: p.read_bytes() for p in (bundle / component / FP16_DIR).iterdir()}
    return manifest["components"][component], files


@pytest.mark.skipif(_ort_has_cuda(), reason="this onnxruntime has the CUDA provider: the GPU test below runs")
def test_cuda_fusions_on_a_cpu_stop_with_a_clear_message_and_leave_the_portable_variant(
    fp16_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cuda fusion set wrote `<component>/fp16/` (the portable variant's folder, which TensorRT reads)
    before its check failed on the CPU provider, with a traceback."""
    from kandinsky_export.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(fp16_bundle, bundle)
    before = _snapshot(bundle, "unet")
    argv = [
        "fp16",
        "--bundle",
        str(bundle),
        "--components",
        "unet",
        "--fusions",
        "cuda",
        "--check-size",
        "128x128",
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "no CUDAExecutionProvider" in error and "onnxruntime-gpu" in error
    assert _snapshot(bundle, "unet") == before
    assert not (bundle / "unet" / FP16_CUDA_DIR).exists()
    # asking for the CPU provider explicitly is refused too, before anything is written
    assert main([*argv, "--providers", "CPUExecutionProvider"]) == 2
    assert "CUDA-only operators" in capsys.readouterr().err
    assert _snapshot(bundle, "unet") == before


def test_the_cuda_fused_variant_is_recorded_next_to_the_portable_one(
    fp16_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STAND-IN for the GPU-only check: the CUDA provider's run (`measure_fp16`) and the provider check
    are replaced by a passing report; the optimisation with the cuda fusions, the FP16 conversion and the
    bookkeeping are real. The fused graph goes to `fp16_cuda/` and `variants.fp16_cuda`; the portable
    variant, its files and `default_precision` (what TensorRT reads) stay as they were."""
    from kandinsky_export import fp16
    from kandinsky_export.onnx_export import ParityReport

    bundle = tmp_path / "bundle"
    shutil.copytree(fp16_bundle, bundle)
    before_entry, before_files = _snapshot(bundle, "unet")

    def passing(component, model16_path, check, *, providers, tolerance):
        assert list(providers) == ["CUDAExecutionProvider"]
        report = ParityReport(component, "fp16-cuda", "noise_pred", 1e-3, 1e-3, tolerance, {}, True)
        return [report], {}, None

    monkeypatch.setattr(fp16, "check_providers", lambda fusion_set, providers: None)
    monkeypatch.setattr(fp16, "measure_fp16", passing)
    (result,) = convert_bundle(bundle, ["unet"], fusion_set="cuda", check_size=CHECK_SIZE)
    assert result.fusion_set == "cuda" and not result.standard_ops_only
    entry, files = _snapshot(bundle, "unet")
    assert files == before_files
    assert entry["variants"][FP16_DIR] == before_entry["variants"][FP16_DIR]
    assert entry["default_precision"] == before_entry["default_precision"] == "fp16"
    fused = entry["variants"][FP16_CUDA_DIR]
    assert fused["path"] == f"{FP16_CUDA_DIR}/model.onnx" and fused["passed"]
    assert fused["settings"]["fusion_set"] == "cuda" and fused["settings"]["providers"] == [
        "CUDAExecutionProvider"
    ]
    graph = onnx.load(str(bundle / "unet" / fused["path"]), load_external_data=False)
    assert {n.domain for n in graph.graph.node} & {"com.microsoft"}  # the CUDA-only fusions
    assert fused["source_sha256"] == onnx_digest(bundle / "unet" / "model.onnx")
    # the TensorRT side still reads the portable variant
    from kandinsky_export.tensorrt_engine import choose_source

    assert choose_source(entry, "default")[0] == f"{FP16_DIR}/model.onnx"
    # current: not converted again
    assert convert_bundle(bundle, ["unet"], fusion_set="cuda", check_size=CHECK_SIZE) == []


# -- ONNX Runtime's TensorRT engine cache -------------------------------------------------------


def test_the_accelerated_models_and_their_cache_folders(ort_repositories: dict[str, Path]) -> None:
    from kandinsky_repository.serving.ort_trt_cache import accelerated_models, cache_state

    repository = ort_repositories["tensorrt"]
    models = accelerated_models(repository)
    assert sorted(models) == _network_models(repository)
    root = repository.resolve().parent / "model_repository.ort_trt_cache"
    assert all(folder == root / name for name, folder in models.items())
    # ONNX Runtime creates the model's folder, not its parents: the generator makes the parent
    assert root.is_dir()
    state = cache_state(repository)
    assert state.needed and not state.built
    assert not cache_state(ort_repositories["cuda"]).needed  # no accelerator, nothing to build


@pytest.fixture()
def cpu_repository(tiny_repository: Path, tmp_path: Path) -> Path:
    repository = tmp_path / "model_repository"
    shutil.copytree(tiny_repository, repository)
    return repository


def test_the_cache_build_loads_the_accelerated_models_once_with_no_time_limit(
    cpu_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STAND-IN for the accelerated ONNX Runtime models, which this Triton (nvidia-pytriton: python
    backend only) cannot load: the python-backend tokenizer is declared the one accelerated model. The
    build is real: a Triton on loopback that loads only it (explicit model control), waited for without
    a time limit, stopped, and the record written."""
    from kandinsky_repository.serving import ort_trt_cache
    from kandinsky_repository.serving.triton import TritonServer

    folder = tmp_path / "cache" / "tokenizer"
    monkeypatch.setattr(ort_trt_cache, "accelerated_models", lambda repository: {"tokenizer": folder})
    seen: dict[str, object] = {}
    original_command, original_wait = TritonServer.command, TritonServer.wait_ready

    def command(self, install):
        seen["command"] = original_command(self, install)
        return seen["command"]

    def wait_ready(self, timeout=180.0):
        seen["timeout"] = timeout
        return original_wait(self, timeout)

    monkeypatch.setattr(TritonServer, "command", command)
    monkeypatch.setattr(TritonServer, "wait_ready", wait_ready)
    assert ort_trt_cache.cache_state(cpu_repository).needed
    assert ort_trt_cache.build_cache(cpu_repository, log_file=tmp_path / "triton.log") == ["tokenizer"]
    assert seen["timeout"] is None
    arguments = seen["command"]
    assert "--model-control-mode=explicit" in arguments
    assert [a for a in arguments if a.startswith("--load-model")] == ["--load-model=tokenizer"]
    assert any(a.startswith("--http-address=127.0.0.1") for a in arguments)
    assert folder.is_dir()
    record = json.loads((cpu_repository / ort_trt_cache.RECORD).read_text())
    assert record["models"] == {"tokenizer": str(folder)}
    assert ort_trt_cache.cache_state(cpu_repository).built
    # a regenerated repository (every prepare run) has no record: the next build runs again
    (cpu_repository / ort_trt_cache.RECORD).unlink()
    assert ort_trt_cache.cache_state(cpu_repository).needed


def test_a_failed_cache_build_ends_the_wait_with_tritons_log_and_records_nothing(
    cpu_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kandinsky_repository.serving import ort_trt_cache

    monkeypatch.setattr(
        ort_trt_cache, "accelerated_models", lambda repository: {"no_such_model": tmp_path / "cache" / "x"}
    )
    with pytest.raises(RuntimeError, match="exited with code"):
        ort_trt_cache.build_cache(cpu_repository, log_file=tmp_path / "triton.log")
    assert not (cpu_repository / ort_trt_cache.RECORD).exists()


@pytest.fixture()
def restore_signals():
    """kandinsky-serve's main installs SIGTERM/SIGINT handlers and ignores both while it stops."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


def _serve_args(repository: Path) -> list[str]:
    from kandinsky_repository.serving.triton import free_port

    return [
        "--repository",
        str(repository),
        "--http-port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--health-port",
        str(free_port()),
        "--openai-port",
        str(free_port()),
    ]


def test_serving_an_unbuilt_cache_it_cannot_write_stops_with_what_to_run(
    ort_repositories: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys, restore_signals
) -> None:
    """(Helm: the replicas mount the volume read-only) a start on an unbuilt cache made ONNX
    Runtime build every engine in memory, past the 300 s ready timeout, at every start and restart.
    Read-only is simulated (the tests run as root, for whom permissions do not stop a write)."""
    from kandinsky_repository.serving import server
    from kandinsky_repository.serving.ort_trt_cache import CacheState

    monkeypatch.setattr(CacheState, "writable", lambda self: False)
    monkeypatch.setattr(server.TritonServer, "start", lambda self: pytest.fail("Triton was started"))
    assert server.main(_serve_args(ort_repositories["tensorrt"])) == 2
    error = capsys.readouterr().err
    assert "were not built" in error and "--build-ort-trt-cache" in error and "unet" in error


def test_serving_builds_an_unbuilt_writable_cache_first_without_the_ready_timeout(
    ort_repositories: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_signals
) -> None:
    """(Docker: the volume is writable) the build runs before the supervised start, with no
    time limit; the start keeps its ready timeout. With the record present, nothing is built."""
    from kandinsky_repository.serving import ort_trt_cache, server
    from kandinsky_repository.serving.supervisor import Supervisor
    from kandinsky_repository.settings import DEFAULTS

    repository = tmp_path / "model_repository"
    shutil.copytree(ort_repositories["tensorrt"], repository)
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(
        ort_trt_cache,
        "build_cache",
        lambda repo, timeout=None, log_file=None: calls.append(("build", timeout)),
    )

    def start(self):
        calls.append(("start", self.ready_timeout_s))
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(Supervisor, "start", start)
    assert server.main(_serve_args(repository)) == 1
    assert calls == [("build", None), ("start", DEFAULTS.ready_timeout_s)]

    calls.clear()
    models = ort_trt_cache.accelerated_models(repository)
    (repository / ort_trt_cache.RECORD).write_text(
        json.dumps({"models": {k: str(v) for k, v in models.items()}})
    )
    assert server.main(_serve_args(repository)) == 1
    assert calls == [("start", DEFAULTS.ready_timeout_s)]


# -- the prepare steps (Docker entrypoint, Helm Job) ---------------------------------------------


def _stub_bin(folder: Path, stubs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in stubs.items():
        path = folder / name
        path.write_text(f"#!/usr/bin/env bash\nset -euo pipefail\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def _run_entrypoint(
    tmp_path: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """docker/entrypoint.sh with tests/test_docker.py's stand-in commands."""
    bin_dir = _stub_bin(tmp_path / "bin", STUBS)
    log = tmp_path / "calls.log"
    result = subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        env={
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "KANDINSKY_DATA": str(tmp_path / "data"),
            "STUB_LOG": str(log),
            "REAL_PYTHON": sys.executable,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    calls = [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


@pytest.mark.parametrize(
    ("env", "builds"),
    [
        ({"KANDINSKY_FLAVOUR": "onnxruntime", "KANDINSKY_ORT_TENSORRT": "1"}, True),
        ({"KANDINSKY_FLAVOUR": "onnxruntime"}, False),
        ({"KANDINSKY_FLAVOUR": "tensorrt"}, False),
    ],
)
def test_the_prepare_step_builds_the_engine_cache_after_writing_the_repository(
    tmp_path: Path, env: dict[str, str], builds: bool
) -> None:
    """The engines were built by the serving start, inside its 300 s ready timeout."""
    result, calls = _run_entrypoint(tmp_path, "prepare", KANDINSKY_PRESET="tiny", **env)
    assert result.returncode == 0, result.stderr
    commands = [c[0] for c in calls if c[:2] != ["kandinsky-export", "profile"]]
    serve = [c for c in calls if c[0] == "kandinsky-serve"]
    if not builds:
        assert serve == []
        return
    assert serve == [
        [
            "kandinsky-serve",
            "--build-ort-trt-cache",
            "--repository",
            str(tmp_path / "data" / "model_repository"),
        ]
    ]
    assert commands[-2:] == ["kandinsky-repository", "kandinsky-serve"]  # after the repository it loads


def _fake_onnxruntime(folder: Path, providers: list[str]) -> Path:
    """STAND-IN for the image's onnxruntime, as the entrypoint's provider probe imports it."""
    package = folder / "onnxruntime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"def get_available_providers():\n    return {providers!r}\n")
    return folder


@pytest.mark.parametrize(
    ("env", "providers", "fused", "said"),
    [
        ({"KANDINSKY_FLAVOUR": "onnxruntime"}, ["CUDAExecutionProvider", "CPUExecutionProvider"], True, ""),
        (
            {"KANDINSKY_FLAVOUR": "onnxruntime"},
            ["CPUExecutionProvider"],
            False,
            "portable FP16 variants are served",
        ),
        (
            {"KANDINSKY_FLAVOUR": "onnxruntime", "KANDINSKY_ORT_TENSORRT": "1"},
            ["CUDAExecutionProvider"],
            False,
            "",
        ),
        ({"KANDINSKY_FLAVOUR": "tensorrt"}, ["CUDAExecutionProvider"], False, ""),
        (
            {"KANDINSKY_FLAVOUR": "onnxruntime", "KANDINSKY_PRECISION": "fp32"},
            ["CUDAExecutionProvider"],
            False,
            "",
        ),
    ],
)
def test_the_prepare_step_adds_the_cuda_fused_variant_where_it_can_be_checked(
    tmp_path: Path, env: dict[str, str], providers: list[str], fused: bool, said: str
) -> None:
    """The CUDA-fused variant is made only for the CUDA provider without TensorRT, and only where
    the image's onnxruntime can check it (the shipped prepare image's is the CPU build: it says so)."""
    site = _fake_onnxruntime(tmp_path / "site", providers)
    result, calls = _run_entrypoint(tmp_path, "prepare", KANDINSKY_PRESET="tiny", PYTHONPATH=str(site), **env)
    assert result.returncode == 0, result.stderr
    fp16 = [c for c in calls if c[:2] == ["kandinsky-export", "fp16"]]
    cuda = [c for c in fp16 if "--fusions" in c]
    assert len(cuda) == (1 if fused else 0)
    if fused:
        assert cuda[0][cuda[0].index("--fusions") + 1] == "cuda"
        assert fp16.index(cuda[0]) == 1  # after the portable variant, which it does not replace
    assert said in result.stderr


def _helm_scripts(folder: Path) -> Path:
    folder.mkdir()
    for script in (ROOT / "deploy" / "chart" / "files").glob("*.sh"):
        shutil.copy(script, folder / script.name)
    return folder


@pytest.mark.parametrize("build_fails", [False, True])
def test_the_helm_job_writes_ready_only_after_the_engine_cache_is_built(
    tmp_path: Path, build_fails: bool
) -> None:
    """(Helm) the Job's folder sits on the volume the replicas mount read-only, and READY is
    what they wait for. The Job runs the real entrypoint (stand-in commands inside): the cache is built
    into the folder before READY, and a failed build leaves no READY (replicas keep waiting, they do
    not start and time out)."""
    scripts = _helm_scripts(tmp_path / "scripts")
    serve_stub = 'echo "kandinsky-serve $* ready=$([[ -e "$KANDINSKY_DATA/READY" ]] && echo yes || echo no)" >> "$STUB_LOG"'
    if build_fails:
        serve_stub += "\nexit 1"
    repository_stub = (
        STUBS["kandinsky-repository"] + 'mkdir -p "$output/unet"; touch "$output/unet/config.pbtxt"\n'
    )
    bin_dir = _stub_bin(
        tmp_path / "bin", {**STUBS, "kandinsky-repository": repository_stub, "kandinsky-serve": serve_stub}
    )
    shutil.copy(ENTRYPOINT, bin_dir / "kandinsky-entrypoint")
    volume, key, log = tmp_path / "volume", "0123456789abcdef", tmp_path / "calls.log"
    result = subprocess.run(
        ["bash", str(scripts / "prepare.sh")],
        env={
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "STUB_LOG": str(log),
            "REAL_PYTHON": sys.executable,
            "KANDINSKY_VOLUME": str(volume),
            "KANDINSKY_KEY": key,
            "KANDINSKY_GPU_KEY": "NVIDIA H100 80GB HBM3",
            "KANDINSKY_PRESET": "tiny",
            "KANDINSKY_FLAVOUR": "onnxruntime",
            "KANDINSKY_ORT_TENSORRT": "1",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    folder = volume / key / "NVIDIA-H100-80GB-HBM3"
    serve = [shlex.split(line) for line in log.read_text().splitlines() if line.startswith("kandinsky-serve")]
    assert serve == [
        [
            "kandinsky-serve",
            "--build-ort-trt-cache",
            "--repository",
            str(folder / "model_repository"),
            "ready=no",
        ]
    ]
    assert (result.returncode != 0) == build_fails, result.stderr
    assert (folder / "READY").is_file() == (not build_fails)


# -- the TensorRT wheel pin --------------------------------------------------------------------------


def _tensorrt_run_instruction() -> str:
    """The prepare stage's RUN that installs TensorRT's python bindings, as the shell gets it."""
    text = (ROOT / "docker" / "Dockerfile").read_text().split("AS prepare", 1)[1]
    instructions = re.split(r"\n(?=[A-Z]+ )", re.sub(r"\\\n", " ", text))
    (run,) = [i for i in instructions if i.startswith("RUN ") and "tensorrt-cu12" in i]
    return run.removeprefix("RUN ")


@pytest.fixture(scope="module")
def fake_libnvinfer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """STAND-IN for the image's libnvinfer: a library exporting TensorRT's four version functions
    (10.8.0.43), with TensorRT's file names (libnvinfer.so.10 -> libnvinfer.so.10.8.0)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a stand-in libnvinfer")
    folder = tmp_path_factory.mktemp("libnvinfer")
    source = folder / "version.c"
    source.write_text(
        "".join(
            f"int getInferLib{part}Version(void) {{ return {value}; }}\n"
            for part, value in (("Major", 10), ("Minor", 8), ("Patch", 0), ("Build", 43))
        )
    )
    library = folder / "libnvinfer.so.10.8.0"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    (folder / "libnvinfer.so.10").symlink_to(library.name)
    return folder / "libnvinfer.so.10"


@pytest.mark.parametrize(("installed", "builds"), [("10.8.0.43", True), ("10.8.0.44", False)])
def test_the_tensorrt_wheel_is_pinned_to_all_four_version_parts(
    fake_libnvinfer: Path, tmp_path: Path, installed: str, builds: bool
) -> None:
    """The pin read three parts from the library's file name (`~=10.8.0` let pip choose any
    10.8.x build) and the check only compared that prefix (`startswith('10.8.0')` passed 10.8.0.44).
    Stand-ins: `ldconfig` lists the stand-in library, `python3 -m pip` "installs" a tensorrt module of
    version `installed`; every other python3 call is the real interpreter."""
    site, log = tmp_path / "site", tmp_path / "pip.log"
    bin_dir = _stub_bin(
        tmp_path / "bin",
        {
            "ldconfig": f'printf "\\tlibnvinfer.so.10 (libc6,x86-64) => %s\\n" "{fake_libnvinfer}"',
            "python3": f"""
if [[ "${{1:-}}" == "-m" && "${{2:-}}" == "pip" ]]; then
    echo "$*" >> "{log}"
    mkdir -p "{site}/tensorrt"
    echo "__version__ = '{installed}'" > "{site}/tensorrt/__init__.py"
    exit 0
fi
PYTHONPATH="{site}" exec "{sys.executable}" "$@"
""",
        },
    )
    result = subprocess.run(
        ["sh", "-c", _tensorrt_run_instruction()],
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    (pip,) = log.read_text().splitlines()
    assert "tensorrt-cu12==10.8.0.43" in shlex.split(pip), pip
    assert (result.returncode == 0) == builds, result.stderr


# -- on a GPU ----------------------------------------------------------------------------------------------


def _ort_trt_triton() -> str:
    """Why the real engine-cache build cannot run here ('' when it can)."""
    from kandinsky_repository.serving.triton import find_triton

    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU (no nvidia-smi)"
    try:
        install = find_triton()
    except RuntimeError as error:
        return f"no Triton server: {error}"
    backends = install.backend_dir or Path("/opt/tritonserver/backends")
    if not (backends / "onnxruntime").is_dir():
        return f"this Triton ({install.binary}) has no onnxruntime backend"
    if not any((backends / "onnxruntime").glob("*tensorrt*")):
        return "this Triton's onnxruntime backend has no TensorRT execution provider"
    return ""


@pytest.mark.gpu
@pytest.mark.skipif(
    not _ort_has_cuda(), reason="this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)"
)
def test_the_cuda_fused_variant_on_the_gpu(fp16_bundle: Path, tmp_path: Path) -> None:
    """The real `--fusions cuda` check on ONNX Runtime's CUDA provider, next to the portable variant."""
    bundle = tmp_path / "bundle"
    shutil.copytree(fp16_bundle, bundle)
    before = _snapshot(bundle, "unet")
    (result,) = convert_bundle(bundle, ["unet"], fusion_set="cuda", check_size=CHECK_SIZE)
    assert not result.standard_ops_only and {r.precision for r in result.parity} == {"fp16-cuda"}
    assert _snapshot(bundle, "unet")[1] == before[1]
    entry = json.loads((bundle / "manifest.json").read_text())["components"]["unet"]
    assert entry["variants"][FP16_DIR] == before[0]["variants"][FP16_DIR]
    assert entry["variants"][FP16_CUDA_DIR]["passed"] == result.passed


@pytest.mark.gpu
@pytest.mark.skipif(bool(_ort_trt_triton()), reason=_ort_trt_triton() or "runs")
def test_the_engine_cache_is_built_once_and_then_only_read(fp16_bundle: Path, tmp_path: Path) -> None:
    """The real build: Triton's onnxruntime backend with ONNX Runtime's TensorRT provider writes engines
    into every model's cache folder; a second load reads them (no new file, nothing rewritten)."""
    from kandinsky_repository.serving.ort_trt_cache import build_cache, cache_state

    repository = tmp_path / "model_repository"
    generate_repository(fp16_bundle, repository, RepositoryOptions(flavour="onnxruntime", ort_tensorrt=True))
    built = build_cache(repository)
    state = cache_state(repository)
    assert built and state.built
    engines = {folder: sorted(p.name for p in folder.iterdir()) for folder in state.models.values()}
    assert all(any(name.endswith(".engine") for name in names) for names in engines.values()), engines
    mtimes = {p: p.stat().st_mtime_ns for folder in state.models.values() for p in folder.iterdir()}
    build_cache(repository)
    assert {p: p.stat().st_mtime_ns for folder in state.models.values() for p in folder.iterdir()} == mtimes
