"""Each exported ONNX component computes what its PyTorch module computes.

The export traces at batch 2 and checks at batch 3 and another image size on fresh random inputs, so
the dynamic axes are exercised. Tolerance: FP32_TOLERANCE of the output's scale (see onnx_export.py).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from kandinsky_core.components import COMPONENTS, INPAINT_MOVQ_COMPONENTS
from kandinsky_export.modules import build_wrapper, sample_inputs
from kandinsky_export.onnx_export import (
    FP32_TOLERANCE,
    compare_outputs,
    onnx_session,
    run_session,
    torch_reference,
)

# The tiny preset's inpainting MoVQ is the decoder's, so it is shared; test_inpaint_movq exports its own.
TINY_COMPONENTS = sorted(set(COMPONENTS) - set(INPAINT_MOVQ_COMPONENTS))


def test_every_component_is_exported_and_within_tolerance(tiny_bundle):
    _, reports = tiny_bundle
    exported = {r.component for r in reports}
    assert exported == set(TINY_COMPONENTS), "the tiny preset has every component, all must be exported"
    for report in reports:
        assert report.finite, report.line()
        assert report.max_rel_error <= FP32_TOLERANCE, report.line()
        assert report.passed


@pytest.mark.parametrize("component", TINY_COMPONENTS)
def test_onnx_graph_declares_the_registry_tensors(tiny_bundle, component):
    bundle, _ = tiny_bundle
    model = onnx.load(str(bundle / component / "model.onnx"), load_external_data=False)
    spec = COMPONENTS[component]
    assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs]
    for graph_input, tensor in zip(model.graph.input, spec.inputs, strict=True):
        dims = graph_input.type.tensor_type.shape.dim
        assert len(dims) == len(tensor.shape)
        for axis, symbol in tensor.dynamic_axes.items():
            assert dims[axis].dim_param, f"{component}.{tensor.name} axis {axis} ({symbol}) must be dynamic"


@pytest.mark.parametrize("component", ["unet", "movq_decoder", "prior"])
def test_parity_at_a_third_shape(tiny_checkpoint, tiny_bundle, component):
    """Batch 1 and a non-square size that neither the trace nor the export check used."""
    bundle, _ = tiny_bundle
    dims = tiny_checkpoint.dims
    spec = COMPONENTS[component]
    wrapper = build_wrapper(component, tiny_checkpoint.load_component(component))
    m = dims.size_multiple
    inputs = sample_inputs(spec, dims, batch=1, height=3 * m, width=m, seed=7, vocab_size=10)
    reference = torch_reference(wrapper, spec, inputs)
    got = run_session(onnx_session(bundle / component / "model.onnx"), inputs)
    for report in compare_outputs(component, "fp32", reference, got, FP32_TOLERANCE, {}):
        assert report.passed, report.line()


def test_comparison_fails_on_a_wrong_result_and_on_nan():
    reference = {"x": np.linspace(-2, 2, 100, dtype=np.float32)}
    off = {"x": reference["x"] + 1e-2}
    nan = {"x": reference["x"].copy()}
    nan["x"][3] = np.nan
    assert not compare_outputs("c", "fp32", reference, off, FP32_TOLERANCE, {})[0].passed
    report = compare_outputs("c", "fp32", reference, nan, FP32_TOLERANCE, {})[0]
    assert not report.finite and not report.passed


def test_exported_unet_is_not_the_decoder_unet_for_inpainting(tiny_checkpoint, tiny_bundle):
    """The inpainting UNet takes latents + masked latents + mask (2 * latent channels + 1)."""
    bundle, _ = tiny_bundle
    model = onnx.load(str(bundle / "unet_inpaint" / "model.onnx"), load_external_data=False)
    channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    assert (
        channels == tiny_checkpoint.dims.inpaint_in_channels == 2 * tiny_checkpoint.dims.latent_channels + 1
    )


def test_wrappers_call_the_models_like_the_pipelines(tiny_checkpoint):
    """MoVQ decode must not quantise: the wrapper equals decode(force_not_quantize=True), not decode()."""
    movq = tiny_checkpoint.load_component("movq_decoder")
    latents = torch.randn(
        1, tiny_checkpoint.dims.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        wrapped = build_wrapper("movq_decoder", movq)(latents)
        expected = movq.decode(latents, force_not_quantize=True).sample
        quantised = movq.decode(latents, force_not_quantize=False).sample
    torch.testing.assert_close(wrapped, expected)
    assert not torch.allclose(wrapped, quantised)
