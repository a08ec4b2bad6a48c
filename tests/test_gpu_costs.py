"""The timed flavour's GPU cost model (`gpu_costs.py`, `gpu_costs.json`), its python model (`timed.py`)
and the FLOP counter behind the data file (`kandinsky_bench/flops.py`).

No GPU and no Triton: the timed model runs against a small stand-in for `triton_python_backend_utils`.
Wall-clock assertions are lower bounds and orderings only.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kandinsky_core import gpu_costs
from kandinsky_core.components import COMPONENTS, ModelDims
from kandinsky_core.gpu_costs import (
    GPUS,
    NO_GPU,
    calibrated_efficiencies,
    component_costs,
    cost_record,
    efficiency_from_run,
    load_costs,
    modelled_generation_seconds,
    modelled_seconds,
    run_fraction_of_peak,
    seconds_from_record,
)

from .conftest import TINY_DIMS

DATA = load_costs()
SIDES = (512, 768, 1024)


def synthetic(**overrides: float) -> dict[str, Any]:
    """A cost record with round numbers: 1 TFLOP/s effective, 1 GB/s, 1 ms floor."""
    record = {
        "gpu": "test",
        "flop_per_row": [1e9, 0.0, 0.0],
        "weight_bytes": 1e6,
        "peak_flops": 2e12,
        "efficiency": 0.5,
        "bandwidth_bytes_per_s": 1e9,
        "floor_seconds": 1e-3,
    }
    record.update(overrides)
    return record


# ------------------------------------------------------------------------------------------ the formula


def test_compute_bound_call_costs_flop_over_effective_peak_plus_floor():
    record = synthetic()  # 1 GFLOP/row at 1 TFLOP/s effective = 1 ms/row; weights 1 MB at 1 GB/s = 1 ms
    assert seconds_from_record(record, 4) == pytest.approx(4e-3 + 1e-3)


def test_bandwidth_bound_call_costs_weight_reads_plus_floor():
    record = synthetic(weight_bytes=50e6)  # 50 ms of weights, 1 ms/row of compute
    assert seconds_from_record(record, 1) == pytest.approx(50e-3 + 1e-3)
    assert seconds_from_record(record, 10) == pytest.approx(50e-3 + 1e-3)  # batching rows is free here
    assert seconds_from_record(record, 100) == pytest.approx(100e-3 + 1e-3)  # until compute takes over


def test_floor_is_paid_once_per_call_and_compute_is_linear_in_rows():
    record = synthetic(floor_seconds=0.25, weight_bytes=0.0)
    one, eight = seconds_from_record(record, 1), seconds_from_record(record, 8)
    assert one > 0.25 and eight > one
    assert eight - 0.25 == pytest.approx(8 * (one - 0.25))


def test_pixel_polynomial_enters_the_compute_term():
    record = synthetic(flop_per_row=[0.0, 1e3, 1e-3], weight_bytes=0.0, floor_seconds=0.0)
    pixels = 512 * 256
    expected = 2 * (1e3 * pixels + 1e-3 * pixels**2) / 1e12
    assert seconds_from_record(record, 2, 512, 256) == pytest.approx(expected)
    assert seconds_from_record(record, 2, 256, 512) == pytest.approx(expected)  # only the pixel count


def test_no_gpu_costs_nothing():
    record = cost_record("unet", NO_GPU)
    assert record == {"component": "unet", "gpu": NO_GPU}
    assert json.loads(json.dumps(record)) == record
    for rows, side in ((1, 64), (8, 1024)):
        assert seconds_from_record(record, rows, side, side) == 0.0
        assert modelled_seconds("movq_decoder", rows, side, side, NO_GPU) == 0.0


def test_unknown_gpu_and_component_are_refused_with_the_known_names():
    with pytest.raises(KeyError, match="h100"):
        cost_record("unet", "v100")
    with pytest.raises(KeyError, match="known"):
        cost_record("tokenizer", "h100")


def test_cost_record_is_json_and_reproduces_modelled_seconds():
    record = cost_record("unet", "h100")
    assert json.loads(json.dumps(record)) == record
    assert seconds_from_record(record, 2, 768, 768) == modelled_seconds("unet", 2, 768, 768, "h100")


def test_released_unet_step_on_each_gpu_is_compute_bound_and_ordered_by_peak():
    seconds = {gpu: modelled_seconds("unet", 2, 768, 768, gpu) for gpu in GPUS}
    for gpu, value in seconds.items():
        device = DATA["gpus"][gpu]
        compute = 2 * component_costs("unet")["counted_flop_per_row"]["768"]
        compute /= device["peak_flops"] * device["efficiency"]
        assert value == pytest.approx(compute + device["floor_seconds"])
    assert seconds["h100"] < seconds["a100"]
    assert seconds["h100"] < seconds["l40s"]


def test_efficiency_from_a_run_inverts_the_model():
    seconds = modelled_seconds("unet", 2, 768, 768, "a100")
    assert efficiency_from_run("unet", 2, 768, 768, seconds, "a100") == pytest.approx(
        DATA["gpus"]["a100"]["efficiency"]
    )
    with pytest.raises(ValueError, match="floor"):
        efficiency_from_run("unet", 2, 768, 768, 1e-6, "a100")


def test_an_edited_copy_of_the_data_file_is_used(tmp_path):
    edited = json.loads(json.dumps(DATA))
    edited["gpus"]["h100"]["efficiency"] /= 2
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(edited))
    copy = load_costs(path)
    floor = DATA["gpus"]["h100"]["floor_seconds"]
    slow = modelled_seconds("unet", 2, 1024, 1024, "h100", data=copy) - floor
    fast = modelled_seconds("unet", 2, 1024, 1024, "h100") - floor
    assert slow == pytest.approx(2 * fast)


def test_a_data_file_of_another_format_is_refused(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({**DATA, "format": 99}))
    with pytest.raises(ValueError, match="format"):
        load_costs(path)


def test_cost_model_and_timed_model_import_without_torch():
    """Both run inside Triton's python backend, where only numpy and the client are installed."""
    import subprocess

    code = (
        "import sys, kandinsky_core.gpu_costs, kandinsky_repository.python_models.timed\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ the data file


def test_every_registry_network_has_a_released_cost():
    assert set(GPUS) == {"h100", "a100", "l40s"}
    for name in COMPONENTS:
        costs = component_costs(name)
        assert costs["weight_bytes"] > 0 and costs["flop_per_row"][0] >= 0
    assert component_costs("movq_decoder_inpaint") == component_costs("movq_decoder")
    assert component_costs("movq_encoder_inpaint") == component_costs("movq_encoder")


@pytest.mark.parametrize("architecture", sorted(DATA["architectures"]))
def test_pixel_polynomial_reproduces_the_counted_flop_at_each_size(architecture):
    for name, costs in DATA["architectures"][architecture]["components"].items():
        record = {"flop_per_row": costs["flop_per_row"]}
        for side in SIDES:
            counted = costs["counted_flop_per_row"][str(side)]
            assert gpu_costs.flop(record, 1, side, side) == pytest.approx(counted, rel=1e-9), (name, side)
        if "check" in costs:  # a non-square size counted separately
            h, w = costs["check"]["size"]
            assert gpu_costs.flop(record, 1, h, w) == pytest.approx(
                costs["check"]["counted_flop_per_row"], rel=1e-9
            )


# shared/kandinsky22.md, "Cost": TFLOP at 512/768/1024 (work, rows per call). Its three digits are the
# tolerance: a count must round to the table's value.
KANDINSKY22_TABLE = {
    ("unet", 2): (1.71, 3.99, 7.43),
    ("movq_decoder", 1): (2.00, 4.89, 9.65),
    ("prior", 2): (0.33, None, None),
    ("text_encoder", 2): (0.20, None, None),
}


@pytest.mark.parametrize(("component", "rows"), sorted(KANDINSKY22_TABLE))
def test_data_file_matches_the_flop_table_of_kandinsky22_md(component, rows):
    record = {"flop_per_row": component_costs(component)["flop_per_row"]}
    for side, tflop in zip(SIDES, KANDINSKY22_TABLE[component, rows], strict=True):
        if tflop is not None:
            assert gpu_costs.flop(record, rows, side, side) / 1e12 == pytest.approx(tflop, abs=0.005)


def test_efficiencies_are_the_calibration_rule_applied_to_the_published_runs():
    derived = calibrated_efficiencies(DATA)
    for gpu in GPUS:
        assert DATA["gpus"][gpu]["efficiency"] == pytest.approx(derived[gpu], abs=5e-4)
        assert 0.05 < DATA["gpus"][gpu]["efficiency"] < 0.6  # far below peak, as published runs are
    for run in DATA["calibration"]["runs"]:
        assert run["fraction_of_peak"] == pytest.approx(run_fraction_of_peak(run, DATA), abs=5e-5)


def test_unfused_activation_traffic_would_change_no_modelled_time_by_more_than_two_tenths_of_a_percent():
    """The data file's claim for leaving activations out of the bandwidth term: unfused writes, read back
    once, at each GPU's bandwidth, against the compute term at its efficiency, every network and size."""
    worst = {}
    for gpu, device in DATA["gpus"].items():
        effective = device["peak_flops"] * device["efficiency"]
        for name, costs in DATA["architectures"]["released"]["components"].items():
            for side, written in costs["activation_bytes_per_row"].items():
                compute = costs["counted_flop_per_row"][side] / effective
                ratio = 2 * written / device["bandwidth_bytes_per_s"] / compute
                worst[gpu] = max(worst.get(gpu, 0.0), ratio)
                assert max(1.0, ratio) <= 1.002, (gpu, name, side, ratio)
    assert worst["h100"] < 0.5 and worst["a100"] < 0.5  # far from binding on HBM


def test_generation_cost_sums_its_calls():
    cost = modelled_generation_seconds("h100", 768, 768, prior_steps=25, steps=50)
    expected = {
        "text_encoder": modelled_seconds("text_encoder", 2, 768, 768, "h100"),
        "prior": 25 * modelled_seconds("prior", 2, 768, 768, "h100"),
        "unet": 50 * modelled_seconds("unet", 2, 768, 768, "h100"),
        "movq_decoder": modelled_seconds("movq_decoder", 1, 768, 768, "h100"),
    }
    assert cost.seconds == pytest.approx(expected)
    assert cost.total_seconds == pytest.approx(sum(expected.values()))
    assert cost.images_per_second == pytest.approx(1 / cost.total_seconds)
    assert cost.seconds["unet"] > cost.seconds["prior"] > cost.seconds["text_encoder"]


def test_negative_prompt_doubles_the_text_rows():
    plain = modelled_generation_seconds("a100", 512, 512, prior_steps=25, steps=50)
    negative = modelled_generation_seconds("a100", 512, 512, prior_steps=25, steps=50, negative_prompt=True)
    assert negative.seconds["prior"] > plain.seconds["prior"]
    assert negative.seconds["unet"] == plain.seconds["unet"]


def test_batching_generations_amortises_floors_and_weight_reads_only():
    alone = modelled_generation_seconds("l40s", 512, 512, prior_steps=25, steps=50, images=1)
    batched = modelled_generation_seconds(
        "l40s", 512, 512, prior_steps=25, steps=50, images=1, images_per_execution=4
    )
    assert batched.seconds_per_image < alone.seconds_per_image
    assert batched.images_per_second > alone.images_per_second
    # Per call, batching saves at most the floor and one read of the weights (compute per row stays).
    calls = {"text_encoder": 1, "prior": 25, "unet": 50, "movq_decoder": 1}
    device = DATA["gpus"]["l40s"]
    bound = sum(
        n * (device["floor_seconds"] + component_costs(c)["weight_bytes"] / device["bandwidth_bytes_per_s"])
        for c, n in calls.items()
    )
    assert alone.seconds_per_image - batched.seconds_per_image <= bound


def test_generation_without_gpu_costs_nothing():
    cost = modelled_generation_seconds(NO_GPU, 768, 768, images=2)
    assert cost.total_seconds == 0.0 and cost.images_per_second == float("inf")


# ------------------------------------------------------------------------------------- the timed model


class FakeTritonError:
    INVALID_ARG, INTERNAL, CANCELLED = "INVALID_ARG", "INTERNAL", "CANCELLED"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.text, self.code = message, code

    def message(self) -> str:
        return self.text


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def shape(self) -> tuple[int, ...]:
        return self._array.shape

    def as_numpy(self) -> np.ndarray:
        return self._array


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor] = (), error: FakeTritonError | None = None) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


@dataclass
class FakeRequest:
    inputs: dict[str, np.ndarray]
    cancelled: bool = False

    def is_cancelled(self) -> bool:
        return self.cancelled


class FakePbUtils:
    """The part of `triton_python_backend_utils` that `BatchingModel` uses."""

    Tensor = FakeTensor
    TritonError = FakeTritonError
    InferenceResponse = FakeResponse

    @staticmethod
    def get_input_tensor_by_name(request: FakeRequest, name: str) -> FakeTensor | None:
        return FakeTensor(name, request.inputs[name]) if name in request.inputs else None


@pytest.fixture
def pb_utils(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", FakePbUtils)
    return FakePbUtils


@dataclass
class Repository:
    root: Path
    models: list[Any] = field(default_factory=list)

    def model(self, component: str, record: dict[str, Any], *, lock: str | None = "gpu.lock") -> Any:
        """A TimedNetwork initialised as Triton does, from a config the way the generator builds it."""
        from google.protobuf.json_format import MessageToDict
        from kandinsky_repository.generator.configs import base_config, set_parameters
        from kandinsky_repository.python_models.timed import TimedNetwork

        config = base_config(COMPONENTS[component], TINY_DIMS)
        parameters: dict[str, object] = {
            "component": component,
            "modelled_cost": record,
            "kandinsky_dims": TINY_DIMS.as_symbols(),
        }
        if lock:
            parameters["gpu_lock"] = lock
        set_parameters(config, parameters)
        model = TimedNetwork()
        model.initialize(
            {
                "model_config": json.dumps(MessageToDict(config, preserving_proto_field_name=True)),
                "model_repository": str(self.root / component),
                "model_version": "1",
            }
        )
        self.models.append(model)
        return model


@pytest.fixture
def repository(tmp_path, pb_utils):
    repo = Repository(tmp_path / "repository")
    yield repo
    for model in repo.models:
        model.finalize()


def request_for(component: str, rows: int, side: int) -> FakeRequest:
    """Inputs of the registry's shapes for `rows` rows of a `side` x `side` pixel image."""
    symbols = TINY_DIMS.size_symbols(rows, side, side)
    inputs = {}
    for tensor in COMPONENTS[component].inputs:
        shape = tensor.resolve(symbols, keep_dynamic=False)
        inputs[tensor.name] = np.zeros(shape, dtype=tensor.dtype)
        if tensor.shape == ("batch",):  # per-item scalars are served as [batch, 1]
            inputs[tensor.name] = inputs[tensor.name].reshape(-1, 1)
    return FakeRequest(inputs)


def expected_outputs(component: str, rows: int, side: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    symbols = TINY_DIMS.size_symbols(rows, side, side)
    return {
        t.name: (t.resolve(symbols, keep_dynamic=False), np.dtype(t.dtype))
        for t in COMPONENTS[component].outputs
    }


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_timed_model_answers_the_registry_shapes_and_dtypes(repository, component):
    model = repository.model(component, cost_record(component, NO_GPU))
    responses = model.execute([request_for(component, 2, 128), request_for(component, 1, 128)])
    for response, rows in zip(responses, (2, 1), strict=True):
        assert response.error is None
        expected = expected_outputs(component, rows, 128)
        assert {n: (v.shape, v.dtype) for n, v in response.outputs.items()} == expected
    assert not model.intervals  # no GPU cost: nothing slept


def test_timed_model_sleeps_the_released_cost_once_for_the_merged_batch(repository):
    record = cost_record("unet", "l40s")  # the released UNet: ~0.13 s for 4 rows at 1024 px
    model = repository.model("unet", record)
    modelled = seconds_from_record(record, 4, 1024, 1024)
    assert 0.05 < modelled < 1.0
    start = time.perf_counter()
    responses = model.execute([request_for("unet", 2, 1024), request_for("unet", 2, 1024)])
    elapsed = time.perf_counter() - start
    assert all(r.error is None for r in responses)
    assert responses[0].outputs["noise_pred"].shape == (2, TINY_DIMS.unet_out_channels, 128, 128)
    assert len(model.intervals) == 1  # one modelled call of 4 rows, not two of 2
    ((begin, end),) = model.intervals
    assert end - begin >= modelled
    assert elapsed >= modelled


def test_timed_model_reads_pixels_from_images_and_latents(repository):
    record = synthetic(flop_per_row=[0.0, 1e6, 0.0], weight_bytes=0.0, floor_seconds=0.0)  # 1 us per pixel
    decoder = repository.model("movq_decoder", record)
    encoder = repository.model("movq_encoder", record)
    latents = request_for("movq_decoder", 1, 256)  # latents 32x32 -> 256x256 px through the scale factor
    image = request_for("movq_encoder", 1, 256)  # the image itself
    assert decoder.symbols(latents.inputs)["height"] == encoder.symbols(image.inputs)["height"] == 256
    assert encoder.symbols(image.inputs)["latent_width"] == 32
    decoder.execute([latents])
    encoder.execute([image])
    for model in (decoder, encoder):
        ((begin, end),) = model.intervals
        assert end - begin >= 256 * 256 * 1e-6


def test_cancelled_requests_are_answered_without_gpu_time(repository):
    model = repository.model("prior", synthetic(floor_seconds=0.2))
    cancelled = request_for("prior", 2, 64)
    cancelled.cancelled = True
    start = time.perf_counter()
    (response,) = model.execute([cancelled])
    assert response.error is not None and response.error.code == FakeTritonError.CANCELLED
    assert time.perf_counter() - start < 0.2
    assert not model.intervals


def test_spatial_limits_are_checked_on_shapes(repository, pb_utils):
    from google.protobuf.json_format import MessageToDict
    from kandinsky_repository.generator.configs import base_config, set_parameters
    from kandinsky_repository.python_models.timed import TimedNetwork

    config = base_config(COMPONENTS["unet"], TINY_DIMS)
    set_parameters(
        config,
        {"kandinsky_dims": TINY_DIMS.as_symbols(), "spatial_limits": {"sample": [8, 128]}},
    )
    model = TimedNetwork()
    model.initialize(
        {
            "model_config": json.dumps(MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(repository.root / "unet"),
            "model_version": "1",
        }
    )
    (response,) = model.execute([request_for("unet", 2, 2048)])  # 256 latents > 128
    assert response.error.code == FakeTritonError.INVALID_ARG
    assert "input 'sample' height is 256" in response.error.message()
    assert "in [8, 128]" in response.error.message()


def run_concurrently(
    models: list[Any], component_of: dict[int, str], calls: int
) -> list[tuple[float, float]]:
    def work(model: Any) -> None:
        for _ in range(calls):
            model.execute([request_for(component_of[id(model)], 2, 64)])

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(interval for model in models for interval in model.intervals)


def overlaps(intervals: list[tuple[float, float]]) -> int:
    return sum(1 for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False) if start < end)


def test_timed_models_sharing_the_gpu_lock_never_overlap(repository):
    record = synthetic(floor_seconds=0.03)
    prior = repository.model("prior", record)
    unet = repository.model("unet", record)
    intervals = run_concurrently([prior, unet], {id(prior): "prior", id(unet): "unet"}, calls=4)
    assert len(intervals) == 8
    assert overlaps(intervals) == 0
    assert (repository.root / "gpu.lock").is_file()  # relative to the repository root


def test_without_the_lock_the_same_models_do_overlap(repository):
    """The control: the check above can see an overlap."""
    record = synthetic(floor_seconds=0.03)
    prior = repository.model("prior", record, lock=None)
    unet = repository.model("unet", record, lock=None)
    intervals = run_concurrently([prior, unet], {id(prior): "prior", id(unet): "unet"}, calls=4)
    assert overlaps(intervals) > 0


# -------------------------------------------------------------------------------------- the FLOP counter


def test_fit_pixels_is_exact_on_a_quadratic_and_flat_on_a_constant():
    from kandinsky_bench.flops import evaluate, fit_pixels

    truth = [3e9, 7e6, 0.5]
    counts = {s * s: truth[0] + truth[1] * s * s + truth[2] * (s * s) ** 2 for s in SIDES}
    fitted = fit_pixels(counts)
    assert fitted == pytest.approx(truth, rel=1e-9)
    assert evaluate(fitted, 640, 384) == pytest.approx(evaluate(truth, 640, 384), rel=1e-12)
    assert fit_pixels({s * s: 5e10 for s in SIDES}) == [5e10, 0.0, 0.0]


@pytest.fixture(scope="module")
def tiny_networks():
    pytest.importorskip("torch")
    from kandinsky_bench.flops import preset_networks

    return preset_networks("tiny")


def test_counting_on_meta_agrees_with_cpu_including_attention(tiny_networks):
    from kandinsky_bench.flops import count_call

    unet = tiny_networks["unet"]
    meta = count_call(unet, 2, 128, 128, device="meta")
    cpu = count_call(unet, 2, 128, 128, device="cpu")
    assert meta.flop == cpu.flop > 0
    assert meta.weight_bytes == cpu.weight_bytes == 2 * meta.parameters


def test_tiny_unet_counts_are_linear_in_rows_and_fit_a_fourth_size(tiny_networks):
    from kandinsky_bench.flops import count_call, evaluate, fit_pixels

    unet = tiny_networks["unet"]
    assert count_call(unet, 2, 64, 64).flop == 2 * count_call(unet, 1, 64, 64).flop
    sides = (64, 128, 256)
    counts = {s * s: count_call(unet, 1, s, s).flop for s in sides}
    assert counts[128 * 128] > 4 * counts[64 * 64] * 0.99  # at least linear in pixels
    fitted = fit_pixels(counts)
    assert fitted[2] > 0  # attention over latent tokens: quadratic
    assert evaluate(fitted, 192, 64) == pytest.approx(count_call(unet, 1, 192, 64).flop, rel=1e-9)


def test_movq_decoder_weights_exclude_the_encoder(tiny_networks):
    from kandinsky_bench.flops import count_call

    decoder = count_call(tiny_networks["movq_decoder"], 1, 64, 64)
    encoder = count_call(tiny_networks["movq_encoder"], 1, 64, 64)
    whole = tiny_networks["movq_decoder"].build()
    total = sum(p.numel() for p in whole.parameters())
    assert decoder.parameters + encoder.parameters < total  # the unused quantiser codebook is in neither
    assert decoder.parameters < total and encoder.parameters < total


def test_recalibrating_from_the_file_reproduces_it(tmp_path):
    from kandinsky_bench.cli import main

    output = tmp_path / "costs.json"
    assert main(["flops", "--calibrate-only", "--output", str(output)]) == 0
    assert json.loads(output.read_text()) == DATA


def test_the_shared_tiny_dims_are_the_tiny_bundles(tiny_bundle):
    """TINY_DIMS (conftest) stands in for the tiny preset's bundle in tests without one: it must not drift."""
    manifest = json.loads((Path(tiny_bundle[0]) / "manifest.json").read_text())
    assert ModelDims.from_dict(manifest["dims"]) == TINY_DIMS
