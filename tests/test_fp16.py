"""FP16 variants: conversion, the FP16-vs-FP32 checks (storage emulation and native), the measured
block list, the fallback to FP32, the manifest record, and the `kandinsky-export fp16` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from kandinsky_core.bundle import onnx_digest
from kandinsky_core.components import COMPONENTS
from kandinsky_export.fp16 import (
    FP16_DIR,
    FP16_MAX,
    FP16_TOLERANCE,
    NORMALISATIONS,
    convert_bundle,
    convert_component,
    emulate_fp16_storage,
    emulation_session,
    non_standard_ops,
    optimize_graph,
)
from kandinsky_export.onnx_export import compare_outputs
from onnx import TensorProto, helper, numpy_helper

CONVERTED = ("unet", "movq_decoder")
# The check's real run, small to keep these tests fast; the default (the engines' optimum, 768 px) is
# tested in test_the_check_runs_at_the_engines_optimum_on_a_real_run.
CHECK_SIZE = (128, 128)


@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    bundle = tmp_path_factory.mktemp("fp16") / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    results = convert_bundle(bundle, list(CONVERTED), check_size=CHECK_SIZE)
    return bundle, {r.component: r for r in results}


def test_fp16_error_is_small_but_real(fp16_bundle) -> None:
    _, results = fp16_bundle
    assert set(results) == set(CONVERTED)
    for name, result in results.items():
        assert result.passed and result.default_precision == "fp16", result.lines()
        labels = {r.precision for r in result.parity}
        assert labels == {"fp16-storage", "fp16"}, name  # the strict emulation and ONNX Runtime itself
        for report in result.parity:
            assert report.finite
            assert report.max_rel_error <= FP16_TOLERANCE
            # FP16 weights and activations do change the numbers: a zero error would mean no conversion
            assert report.max_abs_error > 1e-5, report.line()
        assert result.standard_ops_only and result.fusion_set == "portable"
        assert 0 < result.peak_activation["value"] < FP16_MAX
    levels = results["movq_decoder"].image_levels
    assert levels is not None and 0 <= levels <= 255


def test_fp16_files_and_manifest(fp16_bundle) -> None:
    bundle, _ = fp16_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in CONVERTED:
        entry = manifest["components"][name]
        variant = entry["variants"][FP16_DIR]
        assert entry["files"] == ["model.onnx"]  # the FP32 record the cpu flavour serves is untouched
        assert entry["default_precision"] == "fp16" and variant["passed"]
        assert variant["path"] == f"{FP16_DIR}/model.onnx" and variant["keep_io_types"]
        assert all((bundle / name / f).is_file() for f in variant["files"])
        assert variant["source_sha256"] == onnx_digest(bundle / name / "model.onnx")

        model = onnx.load(str(bundle / name / variant["path"]))
        spec = COMPONENTS[name]
        graph_io = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
        assert set(graph_io) == {t.name for t in (*spec.inputs, *spec.outputs)}
        for tensor in (*spec.inputs, *spec.outputs):  # served I/O keeps the registry's types
            assert graph_io[tensor.name] == helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
        weights = [
            t.data_type
            for t in model.graph.initializer
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
        ]
        assert weights.count(TensorProto.FLOAT16) > weights.count(TensorProto.FLOAT)
        assert not non_standard_ops(model)
    untouched = manifest["components"]["text_encoder"]
    assert "variants" not in untouched and not (bundle / "text_encoder" / FP16_DIR).exists()


def test_current_variants_are_skipped_and_the_cli_converts(
    fp16_bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    from kandinsky_export.cli import main

    bundle, _ = fp16_bundle
    assert convert_bundle(bundle, list(CONVERTED), check_size=CHECK_SIZE) == []  # same source and settings
    argv = ["fp16", "--bundle", str(bundle), "--components", "image_encoder", "--check-size", "128x128"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "image_encoder" in out and "(1 converted)" in out
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["components"]["image_encoder"]["default_precision"] == "fp16"


def _chain_model(scale: float) -> onnx.ModelProto:
    """x (fp32) -> fp16 -> (x * scale) * scale -> / scale**2 -> fp32: overflows in FP16 when scale is big."""
    k = helper.make_tensor("k", TensorProto.FLOAT16, [], [scale])
    inv = helper.make_tensor("inv", TensorProto.FLOAT16, [], [1.0 / scale])
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["a", "k"], ["b"]),
        helper.make_node("Mul", ["b", "k"], ["c"]),
        helper.make_node("Mul", ["c", "inv"], ["d"]),
        helper.make_node("Mul", ["d", "inv"], ["e"]),
        helper.make_node("Cast", ["e"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [k, inv],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def test_storage_emulation_rounds_like_fp16() -> None:
    x = np.array([1.0, 0.3337, -2.71828], dtype=np.float32)
    emulated = emulation_session(emulate_fp16_storage(_chain_model(10.0), record_peaks=False))
    got = emulated.run(["y"], {"x": x})[0]
    h = np.float16
    expected = ((x.astype(h) * h(10.0)) * h(10.0)) * h(0.1) * h(0.1)  # numpy rounds each step to FP16
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    assert not np.array_equal(got, x)  # rounding happened


def test_storage_emulation_overflows_like_fp16() -> None:
    """An intermediate above 65504 is Inf in FP16; the emulation must see it, and the check must fail."""
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    emulated = emulation_session(emulate_fp16_storage(_chain_model(1000.0)))
    names = [o.name for o in emulated.get_outputs()]
    results = dict(zip(names, emulated.run(names, {"x": x}), strict=True))
    assert not np.isfinite(results["y"]).all()
    assert results["absmax::c"] > FP16_MAX  # the peak names the tensor that overflowed
    report = compare_outputs("chain", "fp16-storage", {"y": x}, {"y": results["y"]}, FP16_TOLERANCE, {})[0]
    assert not report.finite and not report.passed


def _scaled_movq_decoder(source: Path, target: Path, scale: float) -> Path:
    """A copy of the bundle whose MoVQ decoder's first convolution is `scale` times larger."""
    shutil.copytree(source, target)
    path = target / "movq_decoder" / "model.onnx"
    model = onnx.load(str(path))
    scaled = 0
    for tensor in model.graph.initializer:
        if "decoder.conv_in" in tensor.name:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * scale, tensor.name))
            scaled += 1
    assert scaled, "no conv_in weights found in the MoVQ decoder graph"
    onnx.save(model, str(path))
    return target


def test_normalisations_are_judged_by_what_they_reduce(fp16_bundle) -> None:
    """A normalisation's statistics sum x^2 over the elements it reduces, which grow
    with the image for Instance/GroupNorm (about 64x from this 128 px check to 1024 px). The tiny UNet's
    error passes with every normalisation in FP16, but its sums would overflow FP16 at 1024 px: the
    normalisations are kept in FP32. LayerNorm over channels does not grow with the image."""
    bundle, results = fp16_bundle
    unet = results["unet"]
    first, second = unet.attempts[:2]
    assert first.op_block_list == [] and first.max_rel_error <= FP16_TOLERANCE and not first.passed
    assert second.passed and set(second.op_block_list) >= {"InstanceNormalization"}
    assert unet.passed and unet.default_precision == "fp16" and "InstanceNormalization" in unet.op_block_list
    stats = unet.peak_activation["normalisation_statistics"]
    assert stats["op_type"] == "InstanceNormalization"
    assert stats["elements_at_max"] == stats["elements"] * (1024 * 1024) // (128 * 128)
    assert stats["sum_of_squares_at_max"] > FP16_MAX

    model = onnx.load(str(bundle / "unet" / FP16_DIR / "model.onnx"))
    producers = {out: node for node in model.graph.node for out in node.output}
    norms = [n for n in model.graph.node if n.op_type in NORMALISATIONS]
    assert norms
    for node in norms:  # each normalisation reads FP32: a Cast up from the FP16 activations
        cast = producers[node.input[0]]
        assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT


def test_layer_norm_over_channels_is_not_scaled_by_the_image(tiny_bundle, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    (prior,) = convert_bundle(bundle, ["prior"], check_size=CHECK_SIZE)
    stats = prior.peak_activation["normalisation_statistics"]
    assert stats["op_type"] == "LayerNormalization" and stats["elements_at_max"] == stats["elements"]
    assert prior.passed and prior.op_block_list == []


def test_overflow_falls_back_to_fp32(tiny_bundle, tmp_path: Path) -> None:
    """Activations beyond FP16's range: every block list fails (Inf/NaN), the component stays FP32."""
    from kandinsky_repository.generator.onnxruntime_flavour import select_variant

    bundle = _scaled_movq_decoder(tiny_bundle[0], tmp_path / "bundle", 1e6)
    (result,) = convert_bundle(bundle, ["movq_decoder"], check_size=CHECK_SIZE)
    assert not result.passed and result.default_precision == "fp32"
    assert any(not r.finite for r in result.parity)
    assert len(result.attempts) > 1 and not any(a.passed for a in result.attempts)
    entry = json.loads((bundle / "manifest.json").read_text())["components"]["movq_decoder"]
    assert entry["default_precision"] == "fp32" and not entry["variants"][FP16_DIR]["passed"]
    assert select_variant(entry, "default") == ("fp32", ["model.onnx"])
    with pytest.raises(ValueError, match="failed"):
        select_variant(entry, "fp16")


def test_fusion_sets(fp16_bundle) -> None:
    """portable stays in the ONNX domain; cuda adds CUDA-only operators, refused on the CPU provider."""
    bundle, _ = fp16_bundle
    path = bundle / "movq_encoder" / "model.onnx"
    portable, _, _ = optimize_graph(path, "movq_encoder", "portable")
    assert not non_standard_ops(portable.model)
    cuda, fused_cuda, _ = optimize_graph(path, "movq_encoder", "cuda")
    assert non_standard_ops(cuda.model) and set(fused_cuda) & {"GroupNorm", "NhwcConv", "SkipGroupNorm"}
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        convert_component(bundle, "movq_encoder", fusion_set="cuda", check_size=CHECK_SIZE)


def _sinusoid_outputs(model: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in model.graph.node if n.op_type in ("Sin", "Cos")]


def _run_exposing(model: onnx.ModelProto, names: list[str], inputs: dict) -> list[np.ndarray]:
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return emulation_session(model).run(names, inputs)


def test_timestep_embedding_stays_fp32(fp16_bundle) -> None:
    """sin(t * f) with t near 1000 loses ~0.2 in FP16; the converted UNet computes it in FP32."""
    from kandinsky_core.components import ModelDims
    from kandinsky_export.fp16 import convert_to_fp16, sinusoid_nodes
    from kandinsky_export.modules import sample_inputs
    from onnxruntime.transformers.onnx_model import OnnxModel

    bundle, results = fp16_bundle
    fp32 = onnx.load(str(bundle / "unet" / "model.onnx"))
    names = _sinusoid_outputs(fp32)
    assert names, "the UNet graph has no sinusoidal timestep embedding"
    sin_cos = {n.name for n in fp32.graph.node if n.op_type in ("Sin", "Cos")}
    assert sin_cos <= set(results["unet"].fp32_nodes)

    manifest = json.loads((bundle / "manifest.json").read_text())
    dims = ModelDims.from_dict(manifest["dims"])
    inputs = sample_inputs(COMPONENTS["unet"], dims, batch=3, height=128, width=128, seed=0)
    inputs["timestep"] = np.array([1, 500, 999], dtype=np.int64)
    reference = _run_exposing(fp32, names, inputs)

    def worst(model16: onnx.ModelProto) -> float:
        got = _run_exposing(emulate_fp16_storage(model16, record_peaks=False), names, inputs)
        return max(float(np.abs(a - b).max()) for a, b in zip(reference, got, strict=True))

    served = onnx.load(str(bundle / "unet" / FP16_DIR / "model.onnx"))
    assert worst(served) < 1e-3  # only the final rounding of values in [-1, 1] (FP16 step 4.9e-4)
    naive = convert_to_fp16(OnnxModel(onnx.load(str(bundle / "unet" / "model.onnx"))), ())
    assert sinusoid_nodes(fp32) and worst(naive) > 1e-2  # the hazard is real without the FP32 nodes


def test_large_models_go_through_external_data(tiny_bundle, tmp_path: Path, monkeypatch) -> None:
    """Released-size graphs exceed protobuf's 2 GB: every file is then weights + one external-data file.

    The threshold is lowered so the tiny prior takes that path: conversion, emulation, the manifest, and
    the onnxruntime flavour, which must place both files next to each other.
    """
    import kandinsky_export.fp16 as fp16_module
    from kandinsky_core.components import ModelDims
    from kandinsky_export.modules import sample_inputs
    from kandinsky_export.onnx_export import onnx_session, run_session
    from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository

    monkeypatch.setattr(fp16_module, "EXTERNAL_DATA_THRESHOLD", 0)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    (result,) = convert_bundle(bundle, ["prior"], check_size=CHECK_SIZE)
    assert result.passed and result.fp32_nodes
    assert sorted(result.files) == [f"{FP16_DIR}/model.onnx", f"{FP16_DIR}/model.onnx_data"]

    repository = tmp_path / "repo"
    generate_repository(bundle, repository, RepositoryOptions(flavour="onnxruntime"))
    served = repository / "prior" / "1"
    assert sorted(p.name for p in served.iterdir()) == ["model.onnx", "model.onnx_data"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    inputs = sample_inputs(
        COMPONENTS["prior"],
        ModelDims.from_dict(manifest["dims"]),
        batch=2,
        height=64,
        width=64,
        seed=3,
        vocab_size=manifest["vocab_size"],
    )
    outputs = run_session(onnx_session(served / "model.onnx"), inputs)
    assert np.isfinite(outputs["predicted_image_embedding"]).all()


def test_the_check_runs_at_the_engines_optimum_on_a_real_run(
    tiny_bundle, tmp_path: Path, monkeypatch
) -> None:
    """The FP16 check ran at 2-3x the size unit on N(0, 1) inputs. By default it now
    runs at the engine profile's optimum for the largest served size, on a recorded real run."""
    import kandinsky_export.fp16 as fp16_module
    from kandinsky_core.profiles import ProfileSettings

    class Recorded(Exception):
        pass

    sizes = []

    def spy(bundle, size, **kwargs):
        sizes.append(tuple(size))
        raise Recorded

    monkeypatch.setattr(fp16_module, "record_run", spy)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    for max_size in (1024, 640):
        with pytest.raises(Recorded):
            convert_bundle(bundle, ["movq_decoder"], max_size=max_size)
    assert sizes == [ProfileSettings.for_max_size(1024).optimum(), (640, 640)]
    assert sizes[0] == (768, 768)


def test_the_check_inputs_are_what_each_component_gets(tiny_bundle) -> None:
    """The recorded run feeds each network what the generation core feeds it: the MoVQ decoder gets the
    UNet loop's final latents (not N(0, 1) noise), the UNet every denoising step's latents."""
    from kandinsky_core.generation import Generator
    from kandinsky_core.request import GenerationRequest
    from kandinsky_core.validation import check_request
    from kandinsky_export import calibration

    bundle = tiny_bundle[0]
    run = calibration.record_run(bundle, CHECK_SIZE)
    assert len(run.calls["unet"]) == calibration.DECODER_STEPS
    assert [int(c["timestep"][0]) for c in run.calls["unet"]] == sorted(
        (int(c["timestep"][0]) for c in run.calls["unet"]), reverse=True
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    info = calibration.bundle_info(manifest, max(CHECK_SIZE))
    request = GenerationRequest(
        prompt=calibration.PROMPT,
        negative_prompt=calibration.NEGATIVE_PROMPT,
        height=CHECK_SIZE[0],
        width=CHECK_SIZE[1],
        prior_num_inference_steps=calibration.PRIOR_STEPS,
        num_inference_steps=calibration.DECODER_STEPS,
        seed=calibration.SEED,
        output_type="latent",
    )
    latents = Generator(calibration.BundleInfer(bundle), info).generate(check_request(request, info)).images
    np.testing.assert_array_equal(run.calls["movq_decoder"][0]["latents"], latents)
    unet = calibration.check_inputs(run, "unet")
    assert len(unet["sample"]) == 3 * 2  # first, middle and last step, [uncond, cond] each
    # the same run whatever is checked: the encoders on the generated image, the inpainting and ControlNet
    # UNets on it (its luminance as the depth hint)
    assert {"image_encoder", "movq_encoder", "unet_inpaint", "unet_controlnet"} <= set(run.calls)
    assert len(run.calls["movq_decoder"]) == 2  # text-to-image and inpainting (ControlNet's not decoded)
    assert run.calls["unet_controlnet"][0]["hint"].shape == (2, 3, *CHECK_SIZE)


def test_an_untyped_tensor_is_an_error() -> None:
    """Shape-inference failures were swallowed, so a tensor without a type was never
    rounded to FP16 by the emulation and escaped the check. It is now an error naming the tensor."""
    from kandinsky_export.fp16 import UntypedTensors

    model = _chain_model(10.0)
    graph = model.graph
    mystery = helper.make_node("Mystery", ["b"], ["m"], domain="example.custom")
    graph.node.insert(2, mystery)
    graph.node[3].input[0] = "m"  # c = m * k
    del graph.value_info[:]
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    with pytest.raises(UntypedTensors, match="m"):
        emulate_fp16_storage(model)
