"""Every flavour of the generated repository, parsed back as Triton's ModelConfig protobuf and checked
against the exported ONNX graphs (read with the onnx package), the engine profiles and the registry.

The tensorrt flavour needs engines, which need TensorRT and a GPU; here it is generated from a copy
of the bundle holding placeholder `model.plan` files whose sidecars come from the real (pure Python)
profile and metadata code, so everything but the engine bytes is what a GPU build records.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from kandinsky_core.components import (
    COMPONENTS,
    DTYPES,
    INPAINT_MOVQ_COMPONENTS,
    SERVED_MODELS,
    ComponentSpec,
)
from kandinsky_core.profiles import has_spatial_axes
from kandinsky_core.server_info import ServerInfo
from kandinsky_core.wire import MODEL_NAME as GENERATION_MODEL
from kandinsky_core.wire import input_specs
from kandinsky_repository.generator.kandinsky_model_config import decoded_parameters
from kandinsky_repository.generator.repository import (
    RepositoryOptions,
    dtype_enum,
    generate_repository,
    read_config,
)
from tritonclient.grpc import model_config_pb2 as mc

_ONNX_DTYPES = {d.onnx: d.name for d in DTYPES.values()}
# Converted to FP16 here; each gets the precision its check measured (the tiny MoVQ decoder, fed the
# latents of its own random UNet, may fall back to FP32: then the flavours must serve FP32 for it).
FP16_COMPONENTS = ("unet", "movq_decoder", "prior")
STATIC_COMPONENT, STATIC_SIZE = "movq_decoder", (768, 768)
# The FP16 check's real run, small here to keep the tests fast (the default is the engines' optimum).
CHECK_SIZE = (128, 128)


@pytest.fixture(scope="module")
def gpu_bundle(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bundle with FP16 variants for some components (the rest stay FP32)."""
    from kandinsky_export.fp16 import convert_bundle

    bundle = tmp_path_factory.mktemp("gpu") / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    convert_bundle(bundle, list(FP16_COMPONENTS), check_size=CHECK_SIZE)
    return bundle


def _placeholder_engines(source: Path, bundle: Path, static: dict[str, tuple[int, int] | None]) -> Path:
    """A copy of `source` with placeholder engines whose sidecars come from the real (pure Python)
    profile and metadata code: `static` maps components to a static size (None: the dynamic profiles).
    What a GPU build measures is made up: 1 MiB of activations per profile and a passed engine check."""
    from kandinsky_export.engine_check import ENGINE_TOLERANCE, check_record
    from kandinsky_export.tensorrt_engine import (
        ENGINE_DIR,
        ENGINE_FILE,
        BuildOptions,
        ProfileSettings,
        plan_engines,
        record_engine,
    )

    shutil.copytree(source, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    common = {
        "precision": "default",
        "trt_version": "10.8.0.43",
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
        "options": BuildOptions(),
        "digest": lambda path: "placeholder",
    }
    plans = []
    for component in manifest["components"]:
        settings = ProfileSettings(static_size=static.get(component))
        plans += plan_engines(bundle, [component], settings=settings, **common)
    for component, expected, _ in plans:
        spec = COMPONENTS[component]
        io = {t.name: _trt_dtype(t.dtype) for t in (*spec.inputs, *spec.outputs)}
        engine = bundle / component / ENGINE_DIR / ENGINE_FILE
        engine.parent.mkdir(parents=True, exist_ok=True)
        engine.write_bytes(f"placeholder engine for {component}".encode())
        profiles = expected["profile"]["profiles"]
        measured = [
            {"profile": i, "size": p["optimum"], "shapes": {}, "outputs": _exact_outputs(spec)}
            for i, p in enumerate(profiles)
        ]
        built = {
            "io_dtypes": io,
            "activation_bytes": [2**20] * len(profiles),
            "check": check_record(measured, ENGINE_TOLERANCE),
        }
        record_engine(bundle, component, {**expected, **built})
    return bundle


@pytest.fixture(scope="module")
def engine_bundle(gpu_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy with placeholder engines: dynamic profiles, and one static component."""
    return _placeholder_engines(
        gpu_bundle, tmp_path_factory.mktemp("engines") / "bundle", {STATIC_COMPONENT: STATIC_SIZE}
    )


@pytest.fixture(scope="module")
def static_engine_bundle(gpu_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every engine built for one image size (`kandinsky-export engines --static 768x768`)."""
    manifest = json.loads((gpu_bundle / "manifest.json").read_text())
    return _placeholder_engines(
        gpu_bundle,
        tmp_path_factory.mktemp("static-engines") / "bundle",
        dict.fromkeys(manifest["components"], STATIC_SIZE),
    )


def _exact_outputs(spec: ComponentSpec) -> list[dict]:
    """An engine check's measurements where the engine matched its ONNX exactly."""
    return [
        {"output": t.name, "max_abs_error": 0.0, "max_rel_error": 0.0, "finite": True} for t in spec.outputs
    ]


def _trt_dtype(dtype: str) -> str:
    return DTYPES[dtype].tensorrt


def _generate(bundle: Path, out: Path, **options) -> Path:
    generate_repository(bundle, out, RepositoryOptions(**options))
    return out


@pytest.fixture(scope="module")
def repositories(gpu_bundle: Path, engine_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("repos")
    return {
        "cpu": _generate(gpu_bundle, root / "cpu", flavour="cpu"),
        "onnxruntime": _generate(gpu_bundle, root / "onnxruntime", flavour="onnxruntime", ort_tensorrt=True),
        "tensorrt": _generate(engine_bundle, root / "tensorrt", flavour="tensorrt"),
        "timed": _generate(gpu_bundle, root / "timed", flavour="timed"),
    }


def _onnx_io(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (registry dtype, shape with -1 for symbolic axes) of a graph's inputs and outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph
    out = {}
    for value in (*graph.input, *graph.output):
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        out[value.name] = (_ONNX_DTYPES[tensor.elem_type], shape)
    return out


def _check_against_onnx(
    config: mc.ModelConfig, onnx_path: Path, spec: ComponentSpec, profile: dict | None = None
) -> None:
    """Names, types and per-item shapes of the config match the ONNX graph (and engine profile)."""
    graph_io = _onnx_io(onnx_path)
    messages = list(config.input) + list(config.output)
    assert [m.name for m in messages] == [t.name for t in (*spec.inputs, *spec.outputs)]
    assert set(graph_io) == {m.name for m in messages}
    for message in messages:
        dtype, shape = graph_io[message.name]
        assert message.data_type == dtype_enum(dtype), message.name
        assert shape[0] == -1, f"{message.name}: the batch axis must be dynamic for max_batch_size > 0"
        per_item = shape[1:]
        if not per_item:  # a scalar per item (the timestep): Triton dims [1], reshaped away
            assert list(message.dims) == [1] and message.HasField("reshape")
            assert list(message.reshape.shape) == []
            continue
        assert len(message.dims) == len(per_item), message.name
        for axis, (got, onnx_dim) in enumerate(zip(message.dims, per_item, strict=True)):
            if onnx_dim != -1:
                assert got == onnx_dim, (message.name, axis)
            elif profile is not None and message.name in profile:  # engine input: the profile decides
                low, high = profile[message.name]["min"][axis + 1], profile[message.name]["max"][axis + 1]
                assert got == (low if low == high else -1), (message.name, axis)
            # else: the exporter left the axis symbolic; `_check_by_running` checks a fixed config dim


def _check_by_running(config: mc.ModelConfig, onnx_path: Path, bundle: Path, batch: int, size: int) -> None:
    """Run the graph (ONNX Runtime, CPU) at one size: every output matches the config's fixed dims."""
    from kandinsky_core.components import ModelDims
    from kandinsky_export.modules import sample_inputs
    from kandinsky_export.onnx_export import onnx_session, run_session

    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = COMPONENTS[config.name]
    inputs = sample_inputs(
        spec,
        ModelDims.from_dict(manifest["dims"]),
        batch=batch,
        height=size,
        width=size,
        seed=0,
        vocab_size=manifest["vocab_size"],
    )
    for message in config.input:
        got = list(inputs[message.name].shape[1:]) or [1]
        assert all(d in (-1, g) for d, g in zip(message.dims, got, strict=True)), message.name
    outputs = run_session(onnx_session(onnx_path), inputs)
    for message in config.output:
        shape = list(outputs[message.name].shape)
        assert shape[0] == batch, message.name
        assert all(d in (-1, g) for d, g in zip(message.dims, shape[1:], strict=True)), (message.name, shape)


def _network_models(repository: Path) -> list[str]:
    return sorted(name for name in COMPONENTS if (repository / name / "config.pbtxt").is_file())


@pytest.mark.parametrize("flavour", ["cpu", "onnxruntime", "tensorrt", "timed"])
def test_every_config_parses_and_matches_the_registry(repositories: dict, flavour: str) -> None:
    repository = repositories[flavour]
    names = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    assert set(_network_models(repository)) >= {"text_encoder", "prior", "unet", "movq_decoder"}
    assert GENERATION_MODEL in names, "every flavour serves the server-side generation model"
    for name in names:
        config = read_config(repository / name)
        assert config.name == name
        if name == GENERATION_MODEL:
            _check_generation_model(config)
            continue
        spec = COMPONENTS.get(name) or SERVED_MODELS[name]
        assert config.max_batch_size == spec.max_batch_size, name
        assert [i.name for i in config.input] == [t.name for t in spec.inputs], name
        assert [o.name for o in config.output] == [t.name for t in spec.outputs], name
        for message, tensor in zip(
            [*config.input, *config.output], [*spec.inputs, *spec.outputs], strict=True
        ):
            assert message.data_type == dtype_enum(tensor.dtype), (name, tensor.name)


def _check_generation_model(config) -> None:
    """Decoupled, unbatched, every request field an optional input with its wire type, and the same
    server_info the client would read from the unet/prior/unet_inpaint configs."""
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    expected = [(name, mc.DataType.Value(data_type), dims) for name, data_type, dims in input_specs()]
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == expected
    assert all(i.optional for i in config.input)
    assert {"image", "seed", "timings", "stage", "step"} <= {o.name for o in config.output}
    info = json.loads(config.parameters["server_info"].string_value)
    assert ServerInfo.from_parameters(info).dims.embed_dim > 0


def test_cpu_flavour_matches_the_onnx_graphs(repositories: dict, gpu_bundle: Path) -> None:
    repository = repositories["cpu"]
    for name in _network_models(repository):
        config = read_config(repository / name)
        assert config.backend == "python"
        _check_against_onnx(config, repository / name / "1" / "model.onnx", COMPONENTS[name])
        _check_by_running(config, repository / name / "1" / "model.onnx", gpu_bundle, batch=2, size=128)


def test_onnxruntime_flavour(repositories: dict, gpu_bundle: Path) -> None:
    repository = repositories["onnxruntime"]
    manifest = json.loads((gpu_bundle / "manifest.json").read_text())
    served = {name: e.get("default_precision", "fp32") for name, e in manifest["components"].items()}
    assert "fp16" in served.values(), served
    for name in _network_models(repository):
        spec = COMPONENTS[name]
        config = read_config(repository / name)
        assert config.backend == "onnxruntime" and config.default_model_filename == "model.onnx"
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert config.HasField("dynamic_batching") == spec.called_per_step, name
        served = repository / name / "1" / "model.onnx"
        _check_against_onnx(config, served, spec)
        _check_by_running(config, served, gpu_bundle, batch=1, size=128)

        # the served file is the measured default precision: FP16 weights where a variant passed
        precision = manifest["components"][name].get("default_precision", "fp32")
        assert config.parameters["precision"].string_value == precision
        if name not in FP16_COMPONENTS:
            assert precision == "fp32", name
        weights = {t.data_type for t in onnx.load(str(served), load_external_data=False).graph.initializer}
        assert (onnx.TensorProto.FLOAT16 in weights) == (precision == "fp16"), name

        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accelerators] == ["tensorrt"]
        parameters = accelerators[0].parameters
        assert parameters["precision_mode"] == ("FP16" if precision == "fp16" else "FP32")
        profile = {
            which: _parse_shapes(parameters[f"trt_profile_{which}_shapes"]) for which in ("min", "opt", "max")
        }
        _check_warmup(config, spec, profile["opt"])
        for message in config.input:
            low, high = profile["min"][message.name][1:], profile["max"][message.name][1:]
            for axis, dim in enumerate(message.dims if low else []):
                assert (dim == -1) == (low[axis] != high[axis]), (name, message.name, axis)


def _parse_shapes(text: str) -> dict[str, list[int]]:
    """ONNX Runtime's "name:1x4x64x64,other:1" back into shapes."""
    shapes = {}
    for item in text.split(","):
        name, dims = item.split(":")
        shapes[name] = [int(d) for d in dims.split("x")]
    return shapes


def _check_warmup(config: mc.ModelConfig, spec: ComponentSpec, opt: dict[str, list[int]]) -> None:
    """Warm-up requests with every input, one of them at the profile's optimum shapes (the onnxruntime
    flavour warms up more shapes: tests/test_onnxruntime_flavour.py)."""
    at_optimum = 0
    for warmup in config.model_warmup:
        assert 1 <= warmup.batch_size <= config.max_batch_size
        assert set(warmup.inputs) == {t.name for t in spec.inputs}
        for tensor in spec.inputs:
            sample = warmup.inputs[tensor.name]
            assert sample.data_type == dtype_enum(tensor.dtype)
            # integer inputs must stay in range (token ids, timesteps): zeros, never random
            assert sample.random_data == tensor.dtype.startswith("float")
            assert sample.zero_data == (not tensor.dtype.startswith("float"))
        at_optimum += all(
            opt[t.name][0] == warmup.batch_size
            and list(warmup.inputs[t.name].dims) == (opt[t.name][1:] or [1])
            for t in spec.inputs
        )
    assert at_optimum == 1, config.name


def test_tensorrt_flavour_matches_engines_and_onnx(repositories: dict, engine_bundle: Path) -> None:
    repository = repositories["tensorrt"]
    for name in _network_models(repository):
        spec = COMPONENTS[name]
        config = read_config(repository / name)
        metadata = json.loads((engine_bundle / name / "tensorrt" / "engine.json").read_text())
        profiles = [p["inputs"] for p in metadata["profile"]["profiles"]]
        # every profile listed, so Triton makes a context for each (nested ranges: the union is first min
        # .. last max)
        assert [list(g.profile) for g in config.instance_group] == [[str(i) for i in range(len(profiles))]]
        profile = {k: {"min": v["min"], "max": profiles[-1][k]["max"]} for k, v in profiles[0].items()}
        assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
        plan = repository / name / "1" / "model.plan"
        assert plan.read_bytes() == (engine_bundle / name / "tensorrt" / "model.plan").read_bytes()
        assert config.max_batch_size == metadata["profile"]["max_batch_size"] == spec.max_batch_size
        assert config.HasField("dynamic_batching") == spec.called_per_step, name
        assert config.parameters["precision"].string_value == metadata["source"]["precision"]
        # the engine's source ONNX: the served contract must match it, with the profile's static axes
        source = engine_bundle / name / metadata["source"]["path"]
        _check_against_onnx(config, source, spec, profile)
        opt = next(iter(profiles[0].values()))["opt"]
        settings = metadata["profile"]["settings"]
        side = (settings["static_size"] or [settings["min_size"]])[0]  # the smallest size the engine takes
        _check_by_running(config, source, engine_bundle, batch=opt[0], size=side)
        for shapes in profiles:  # every profile's context warmed up at its optimum
            _check_warmup(config, spec, {k: v["opt"] for k, v in shapes.items()})
        assert len(config.model_warmup) == len(profiles), name
        # CUDA graphs wherever the batch is the engine's only dynamic axis
        assert config.optimization.cuda.graphs == (name == STATIC_COMPONENT or not has_spatial_axes(spec)), (
            name
        )

    static = read_config(repository / STATIC_COMPONENT)
    scale = json.loads((engine_bundle / "manifest.json").read_text())["dims"]["movq_scale_factor"]
    assert list(static.input[0].dims)[1:] == [s // scale for s in STATIC_SIZE]
    assert list(static.output[0].dims)[1:] == list(STATIC_SIZE)


def test_shared_models_are_the_same_in_every_flavour(repositories: dict) -> None:
    """Python pre/post-processing models and ensembles do not depend on the flavour."""
    for name, spec in SERVED_MODELS.items():
        if not (repositories["cpu"] / name).is_dir():
            # Only the ensembles on the inpainting repo's own MoVQ are optional (the tiny one is shared).
            assert set(spec.steps) & set(INPAINT_MOVQ_COMPONENTS), name
            continue
        configs = [read_config(repositories[f] / name) for f in ("cpu", "onnxruntime", "tensorrt", "timed")]
        assert all(config == configs[0] for config in configs), name
        if SERVED_MODELS[name].steps:
            assert configs[0].platform == "ensemble"
        else:
            assert configs[0].backend == "python"
            assert [g.kind for g in configs[0].instance_group] == [mc.ModelInstanceGroup.KIND_CPU]


def test_tensorrt_flavour_refuses_a_bundle_without_engines(gpu_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="kandinsky-export engines"):
        generate_repository(gpu_bundle, tmp_path / "repo", RepositoryOptions(flavour="tensorrt"))


def test_forcing_a_missing_precision_is_refused(gpu_bundle: Path, tmp_path: Path) -> None:
    options = RepositoryOptions(flavour="onnxruntime", precision="fp16")
    with pytest.raises(FileNotFoundError, match="kandinsky-export fp16"):
        generate_repository(gpu_bundle, tmp_path / "repo", options)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_batch_size": 4}, "rebuild"),
        ({"io_dtypes": {"timestep": "INT32"}}, "TensorRT 10"),
    ],
)
def test_engines_that_break_the_contract_are_refused(
    engine_bundle: Path, tmp_path: Path, change: dict, message: str
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle, bundle)
    sidecar = bundle / "unet" / "tensorrt" / "engine.json"
    metadata = json.loads(sidecar.read_text())
    if "max_batch_size" in change:
        metadata["profile"]["max_batch_size"] = change["max_batch_size"]
    else:
        metadata["io_dtypes"].update(change["io_dtypes"])
    sidecar.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=message):
        generate_repository(bundle, tmp_path / "repo", RepositoryOptions(flavour="tensorrt"))


def _json_config(config: mc.ModelConfig) -> dict:
    """The config as Triton hands it to a backend: JSON with every primitive field, empty lists included."""
    from google.protobuf import json_format

    try:
        text = json_format.MessageToJson(
            config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except TypeError:  # protobuf < 5.26
        text = json_format.MessageToJson(
            config, preserving_proto_field_name=True, including_default_value_fields=True
        )
    return json.loads(text)


def test_cuda_graphs_for_every_batch_the_traffic_has(static_engine_bundle: Path, tmp_path: Path) -> None:
    """With static engines, a graph per batch guidance sends (UNet 2, 4, 6, 8; prior
    2 .. 16; one row per image for the MoVQ), each giving every input's per-item shape; the dynamic
    batcher prefers exactly those batches. Without graph_spec, Triton r25.01 captured only batch 1 and
    max_batch_size (at the profile's optimum) and runs a graph on an exact batch match only."""
    repository = _generate(static_engine_bundle, tmp_path / "repo", flavour="tensorrt")
    for name in _network_models(repository):
        spec = COMPONENTS[name]
        config = read_config(repository / name)
        cuda = config.optimization.cuda
        assert cuda.graphs, name
        assert [g.batch_size for g in cuda.graph_spec] == list(spec.batch_sizes()), name
        assert all(1 <= g.batch_size <= config.max_batch_size for g in cuda.graph_spec)  # Triton's check
        for graph in cuda.graph_spec:
            assert set(graph.input) == {t.name for t in spec.inputs}, name  # every engine input, or no graph
            for message in config.input:
                per_item = list(graph.input[message.name].dim)
                # the engine's per-item shape: the config's dims, but a per-item scalar is [] (not [1])
                assert per_item == ([] if message.HasField("reshape") else list(message.dims)), (
                    name,
                    message.name,
                )
        if spec.called_per_step:
            # every batch with a graph is preferred, and so is every batch a lone request sends (which
            # includes them: see test_a_lone_step_never_waits_out_the_batching_window)
            preferred = list(config.dynamic_batching.preferred_batch_size)
            assert set(spec.batch_sizes()) <= set(preferred), name
            assert preferred == list(spec.request_batch_sizes()), name
        else:
            assert not config.HasField("dynamic_batching"), name
    unet = read_config(repository / "unet")
    assert [g.batch_size for g in unet.optimization.cuda.graph_spec] == [2, 4, 6, 8]
    prior = read_config(repository / "prior")
    assert [g.batch_size for g in prior.optimization.cuda.graph_spec] == list(range(2, 17, 2))
    # the backend reads `dim` as a list, also when it is empty (a per-item scalar)
    timestep = _json_config(unet)["optimization"]["cuda"]["graph_spec"][0]["input"]["timestep"]
    assert timestep == {"dim": []}

    plain = read_config(
        _generate(static_engine_bundle, tmp_path / "plain", flavour="tensorrt", cuda_graphs=False) / "unet"
    )
    assert not plain.optimization.cuda.graphs and not plain.optimization.cuda.graph_spec
    assert list(plain.dynamic_batching.preferred_batch_size) == list(COMPONENTS["unet"].request_batch_sizes())


def _server_info(repository: Path) -> ServerInfo:
    """What a client of this repository reads (the unet/prior/unet_inpaint config parameters)."""
    parameters = {
        name: decoded_parameters(read_config(repository / name)) if (repository / name).is_dir() else None
        for name in ("unet", "prior", "unet_inpaint")
    }
    return ServerInfo.from_parameters(parameters)


def test_every_flavour_publishes_the_sizes_it_serves(
    repositories: dict, gpu_bundle: Path, static_engine_bundle: Path, tmp_path: Path
) -> None:
    """One flavour-neutral `image_sizes` parameter from every flavour, read by the
    client. ONNX Runtime with its TensorRT accelerator builds a 512 .. max profile and did not say so:
    the client accepted 64 px and the engines refused it with an opaque error."""
    cpu = _server_info(repositories["cpu"])
    assert (cpu.min_image_size, cpu.max_image_size, cpu.static_size) == (cpu.dims.size_multiple, 1024, None)
    plain_ort = _server_info(_generate(gpu_bundle, tmp_path / "ort", flavour="onnxruntime"))
    assert (plain_ort.min_image_size, plain_ort.max_image_size) == (plain_ort.dims.size_multiple, 1024)
    ort_trt = _server_info(repositories["onnxruntime"])  # with the TensorRT accelerator
    assert (ort_trt.min_image_size, ort_trt.max_image_size, ort_trt.static_size) == (512, 1024, None)
    small = _server_info(
        _generate(
            gpu_bundle, tmp_path / "ort640", flavour="onnxruntime", ort_tensorrt=True, max_image_size=640
        )
    )
    assert (small.min_image_size, small.max_image_size) == (512, 640)
    dynamic = _server_info(repositories["tensorrt"])  # one static engine (the MoVQ decoder) decides
    assert dynamic.static_size == STATIC_SIZE
    static = _server_info(_generate(static_engine_bundle, tmp_path / "trt", flavour="tensorrt"))
    assert static.static_size == STATIC_SIZE
    # one parameter for every flavour: the old flavour-specific ones are gone
    for repository in repositories.values():
        assert "max_image_size" not in decoded_parameters(read_config(repository / "unet"))


def test_a_repository_of_another_format_is_refused_by_the_client(repositories: dict) -> None:
    from kandinsky_core.server_info import REPOSITORY_FORMAT, IncompatibleServer

    parameters = {
        name: decoded_parameters(read_config(repositories["cpu"] / name)) for name in ("unet", "prior")
    }
    assert parameters["unet"]["repository_format"] == REPOSITORY_FORMAT
    assert ServerInfo.from_parameters(parameters).max_images_per_request == 4
    for found, said in (
        (REPOSITORY_FORMAT + 1, f"format {REPOSITORY_FORMAT + 1}"),
        (None, "no format version"),
    ):
        unet = {k: v for k, v in parameters["unet"].items() if k != "repository_format"}
        if found is not None:
            unet["repository_format"] = found
        with pytest.raises(IncompatibleServer, match=said) as error:
            ServerInfo.from_parameters({**parameters, "unet": unet})
        assert "kandinsky-repository" in str(error.value) and not error.value.retryable


def test_the_ort_tensorrt_cache_lives_outside_the_regenerated_repository(
    gpu_bundle: Path, tmp_path: Path
) -> None:
    """The repository is deleted and written again on every container start; an engine
    cache inside it made ONNX Runtime rebuild every TensorRT engine on every restart."""
    repository = tmp_path / "data" / "model_repository"
    _generate(gpu_bundle, repository, flavour="onnxruntime", ort_tensorrt=True)
    accelerator = read_config(
        repository / "unet"
    ).optimization.execution_accelerators.gpu_execution_accelerator[0]
    cache = Path(accelerator.parameters["trt_engine_cache_path"])
    assert (
        repository.resolve() not in cache.parents
        and cache.parent == repository.resolve().parent / "model_repository.ort_trt_cache"
    )
    cache.mkdir(parents=True)
    (cache / "engine.bin").write_bytes(b"built once")
    _generate(gpu_bundle, repository, flavour="onnxruntime", ort_tensorrt=True)  # the next start
    assert (cache / "engine.bin").read_bytes() == b"built once"


def test_the_repository_records_its_format_and_the_shared_memory_it_needs(repositories: dict) -> None:
    from kandinsky_repository.generator.repository import REPOSITORY_RECORD

    for flavour, repository in repositories.items():
        record = json.loads((repository / REPOSITORY_RECORD).read_text())
        assert record["flavour"] == flavour and record["repository_format"] >= 2
        # four 1024 x 1024 images through the python backend: far beyond Docker's default 64 MB /dev/shm
        assert record["shared_memory_bytes"] > 4 * 1024 * 1024 * 3 * 4, flavour


def test_a_max_image_size_off_the_checkpoint_grid_is_refused(gpu_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a positive multiple of 64"):
        _generate(gpu_bundle, tmp_path / "repo", max_image_size=1000)


@pytest.mark.parametrize("flavour", ["cpu", "onnxruntime", "tensorrt", "timed"])
def test_queue_policies_leave_the_per_step_models_prefetching(repositories: dict, flavour: str) -> None:
    """Any `default_queue_policy` turns off Triton's batch prefetching: with one busy instance, each
    sequential denoising step then waited 25-75 ms in the queue (CPU flavour, docs/benchmarks.md). The
    per-step models get none; every other queued model is bounded, and its default timeout is set so
    that a client's shorter per-request timeout applies (Triton ignores overrides above the default)."""
    repository = repositories[flavour]
    options = RepositoryOptions()
    checked_bounded = 0
    for path in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file()):
        config = read_config(path)
        spec = COMPONENTS.get(config.name)
        if spec is not None and spec.called_per_step:
            assert config.HasField("dynamic_batching"), config.name
            assert not config.dynamic_batching.HasField("default_queue_policy"), config.name
        elif config.HasField("dynamic_batching"):
            policy = config.dynamic_batching.default_queue_policy
            assert policy.max_queue_size == options.max_queue_size, config.name
            assert policy.allow_timeout_override, config.name
            assert policy.default_timeout_microseconds == int(options.max_generation_seconds * 1e6)
            checked_bounded += 1
    assert checked_bounded >= 4  # the python models at least (tokenizer, pre/post-processing)


@pytest.fixture(scope="module")
def gpu_flavour_repositories(
    repositories: dict,
    gpu_bundle: Path,
    static_engine_bundle: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """Every GPU configuration a server can run: both backends, with and without their options."""
    root = tmp_path_factory.mktemp("gpu-flavours")
    return {
        "onnxruntime+tensorrt": repositories["onnxruntime"],
        "onnxruntime": _generate(gpu_bundle, root / "ort", flavour="onnxruntime"),
        "tensorrt": repositories["tensorrt"],
        "tensorrt static": _generate(static_engine_bundle, root / "trt-static", flavour="tensorrt"),
        "tensorrt static, no graphs": _generate(
            static_engine_bundle, root / "trt-static-no-graphs", flavour="tensorrt", cuda_graphs=False
        ),
        "timed": repositories["timed"],
    }


@pytest.mark.parametrize(
    "flavour",
    [
        "onnxruntime+tensorrt",
        "onnxruntime",
        "tensorrt",
        "tensorrt static",
        "tensorrt static, no graphs",
        "timed",
    ],
)
def test_a_lone_step_never_waits_out_the_batching_window(
    gpu_flavour_repositories: dict, flavour: str
) -> None:
    """Triton fills an empty preferred_batch_size with max_batch_size, and its dynamic batcher holds a
    pending batch that is not a preferred size for the whole max_queue_delay_microseconds. The GPU
    flavours set a 2 ms window and preferred sizes only with CUDA graphs, so a lone guided UNet step (2
    of 8 rows) slept 2 ms at every step. Every batch one request sends alone must be sent at once."""
    repository = gpu_flavour_repositories[flavour]
    per_step = [name for name in _network_models(repository) if COMPONENTS[name].called_per_step]
    assert {"prior", "unet"} <= set(per_step)
    for name in per_step:
        config = read_config(repository / name)
        batching = config.dynamic_batching
        assert batching.max_queue_delay_microseconds > 0, "the GPU flavours keep a batching window"
        preferred = set(batching.preferred_batch_size) or {config.max_batch_size}  # Triton's normalisation
        lone = set(COMPONENTS[name].request_batch_sizes())
        assert {2, COMPONENTS[name].max_batch_size} <= lone  # one guided image; the batcher's largest
        assert lone <= preferred, f"{flavour} {name}: a lone request of {sorted(lone - preferred)} rows waits"
        assert max(preferred) <= config.max_batch_size


def test_the_timed_flavour_is_the_tensorrt_configuration(gpu_bundle: Path, tmp_path: Path) -> None:
    """The timed flavour must measure what the tensorrt flavour would serve: same batching, warm-ups,
    CUDA graphs, instance count and sizes, from engines built with `kandinsky-export engines`' defaults;
    only the backend differs (a python model sleeping its modelled time, on CPU instances)."""
    from kandinsky_core.gpu_costs import cost_record
    from kandinsky_repository.generator.timed_flavour import ENTRY_POINT, GPU_LOCK_FILE

    engines = _placeholder_engines(gpu_bundle, tmp_path / "engines", {})
    tensorrt = _generate(engines, tmp_path / "tensorrt", flavour="tensorrt", instances=2)
    timed = _generate(gpu_bundle, tmp_path / "timed", flavour="timed", instances=2, gpu="a100")
    assert _network_models(timed) == _network_models(tensorrt)
    for name in _network_models(timed):
        real, stand_in = read_config(tensorrt / name), read_config(timed / name)
        for field in (
            "max_batch_size",
            "input",
            "output",
            "dynamic_batching",
            "model_warmup",
            "optimization",
        ):
            assert getattr(stand_in, field) == getattr(real, field), (name, field)
        assert [g.count for g in stand_in.instance_group] == [g.count for g in real.instance_group] == [2]
        assert [g.kind for g in stand_in.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
        assert stand_in.backend == "python" and not stand_in.platform
        assert ENTRY_POINT.replace(":", " import ") in (timed / name / "1" / "model.py").read_text()
        parameters = decoded_parameters(stand_in)
        assert parameters["tensorrt_profiles"] == list(real.instance_group[0].profile)
        assert parameters["modelled_cost"] == cost_record(name, "a100")
        assert parameters["gpu_lock"] == GPU_LOCK_FILE
    served, engines_serve = _server_info(timed), _server_info(tensorrt)
    assert (served.min_image_size, served.max_image_size) == (
        engines_serve.min_image_size,
        engines_serve.max_image_size,
    )


def test_the_shared_memory_estimate_counts_every_concurrent_generation(
    gpu_bundle: Path, tmp_path: Path
) -> None:
    """Each running server-side generation holds its decoded images in the `kandinsky` stub's region at
    the same time; the estimate counted one generation whatever max_concurrent_generations said."""
    from kandinsky_repository.generator.repository import REPOSITORY_RECORD

    def needed(concurrent: int) -> int:
        repository = _generate(gpu_bundle, tmp_path / str(concurrent), max_concurrent_generations=concurrent)
        return json.loads((repository / REPOSITORY_RECORD).read_text())["shared_memory_bytes"]

    # per generation: up to 4 images of 1024 x 1024 float RGB decoded, and as much again for the output
    per_generation = 2 * 4 * 3 * 1024 * 1024 * 4
    assert needed(8) - needed(1) >= 7 * per_generation
