"""`kandinsky-bench`: the arithmetic of its numbers, and a smoke run that keeps the command working.

The smoke run uses the tiny preset (its numbers mean nothing) with minimal repeats, and the session's
tiny bundle and Triton server, so it adds seconds rather than an export and a server start.
"""

from __future__ import annotations

import json
import math

import pytest
from kandinsky_bench import report, stats
from kandinsky_bench.served import Request, requests_per_worker, summarize_level

# -- percentiles and summaries ---------------------------------------------------------------------


def test_percentile_interpolates_linearly():
    samples = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert stats.percentile(samples, 50) == pytest.approx(5.5)
    assert stats.percentile(samples, 90) == pytest.approx(9.1)
    assert stats.percentile(samples, 99) == pytest.approx(9.91)
    assert stats.percentile([3.0], 99) == 3.0
    assert stats.percentile([4.0, 1.0], 50) == pytest.approx(2.5)  # order does not matter


@pytest.mark.parametrize("bad", [[], None])
def test_percentile_rejects_no_samples(bad):
    with pytest.raises((ValueError, TypeError)):
        stats.percentile(bad, 50)


def test_percentile_rejects_out_of_range():
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_summarize_fields():
    summary = stats.summarize([0.2, 0.1, 0.4, 0.3])
    assert set(summary) == {"p50", "p90", "p99", "mean", "min", "max", "n"}
    assert summary["n"] == 4
    assert summary["min"] == 0.1 and summary["max"] == 0.4
    assert summary["mean"] == pytest.approx(0.25)
    assert summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]


# -- Triton statistics -----------------------------------------------------------------------------


def _raw_stats(compute_ns: int, queue_ns: int, count: int, as_strings: bool) -> dict:
    value = str if as_strings else int

    def entry(ns: int) -> dict:
        return {"count": value(count), "ns": value(ns)}

    return {
        "model_stats": [
            {
                "name": "unet",
                "version": "1",
                "inference_count": value(2 * count),
                "execution_count": value(count),
                "inference_stats": {
                    "success": entry(compute_ns + queue_ns + 3000),
                    "queue": entry(queue_ns),
                    "compute_input": entry(1000),
                    "compute_infer": entry(compute_ns),
                    "compute_output": entry(2000),
                },
            },
            # A model that never ran: gRPC leaves out empty fields.
            {"name": "prior", "version": "1", "inference_stats": {"success": {}}},
        ]
    }


@pytest.mark.parametrize("as_strings", [True, False], ids=["grpc-strings", "http-numbers"])
def test_parse_model_stats(as_strings):
    parsed = stats.parse_model_stats(_raw_stats(5_000, 700, 3, as_strings))
    assert parsed["unet"]["compute_infer_ns"] == 5_000
    assert parsed["unet"]["queue_ns"] == 700
    assert parsed["unet"]["compute_infer_count"] == 3
    assert parsed["unet"]["execution_count"] == 3
    assert parsed["unet"]["inference_count"] == 6
    assert parsed["prior"]["compute_infer_ns"] == 0


def test_stats_delta_and_server_time():
    before = stats.parse_model_stats(_raw_stats(1_000_000_000, 0, 1, True))
    after = stats.parse_model_stats(_raw_stats(3_500_000_000, 500_000_000, 4, True))
    delta = stats.stats_delta(before, after)
    assert delta["unet"]["compute_infer_ns"] == 2_500_000_000
    assert delta["unet"]["success_count"] == 3
    totals = stats.server_time(delta, ["unet", "prior", "absent"])
    assert totals["compute_infer"] == pytest.approx(2.5)
    assert totals["queue"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="backwards"):
        stats.stats_delta(after, before)


def test_overhead_share():
    o = stats.overhead(end_to_end_s=10.0, compute_s=9.6)
    assert o["outside_s"] == pytest.approx(0.4)
    assert o["share"] == pytest.approx(0.04)
    with pytest.raises(ValueError):
        stats.overhead(0.0, 0.0)


def test_speedup():
    assert stats.speedup(baseline_s=10.0, candidate_s=8.0) == pytest.approx(1.25)
    with pytest.raises(ValueError):
        stats.speedup(1.0, 0.0)


def test_requests_per_worker_holds_at_least_repeats():
    assert requests_per_worker(1, 5) == 5
    assert requests_per_worker(2, 5) == 3
    assert requests_per_worker(8, 5) == 1
    for concurrency in (1, 2, 4, 8):
        assert requests_per_worker(concurrency, 5) * concurrency >= 5


def test_summarize_level_overhead_from_client_and_server():
    """Two requests of 1 s each; the server computed 0.9 s per request: 10% outside compute."""
    records = [
        {
            "latency": 1.0,
            "total": 0.99,
            "encode_prompt": 0.1,
            "prior": 0.2,
            "decoder": 0.5,
            "decode_image": 0.19,
        }
    ] * 2
    ns = 1_000_000_000
    counters = {
        "text_encoder": {"compute_infer_ns": int(0.2 * ns), "success_ns": int(0.2 * ns)},
        "prior": {
            "compute_infer_ns": int(0.3 * ns),
            "success_ns": int(0.35 * ns),
            "queue_ns": int(0.05 * ns),
        },
        "unet": {
            "compute_infer_ns": int(0.9 * ns),
            "success_ns": int(0.95 * ns),
            "success_count": 40,
            "execution_count": 20,
        },
        "movq_decoder": {"compute_infer_ns": int(0.4 * ns), "success_ns": int(0.4 * ns)},
        # An ensemble repeats its steps' time: it must not be counted.
        "decode_image": {"compute_infer_ns": 5 * ns, "success_ns": 5 * ns},
    }
    level = summarize_level(1, Request(64, 64, 2, 2, 4.0), records, wall_s=2.0, delta=counters)
    assert level["images_per_s"] == pytest.approx(1.0)
    assert level["overhead"]["compute_s"] == pytest.approx(1.8)
    assert level["overhead"]["share"] == pytest.approx(0.1)
    assert level["overhead"]["queue_s"] == pytest.approx(0.05)
    assert level["overhead"]["client_and_transport_s"] == pytest.approx(2.0 - 1.9)
    assert level["stages"]["decoder"]["server_compute_per_request_s"] == pytest.approx(0.45)
    assert level["models"]["unet"]["requests_per_execution"] == pytest.approx(2.0)
    assert "decode_image" not in level["models"]


def test_targets():
    result = {
        "baseline": {"latency": {"p50": 10.0}},
        "served": {
            "levels": [
                {"concurrency": 1, "latency": {"p50": 7.5}, "overhead": {"share": 0.02}, "images_per_s": 0.1},
                {
                    "concurrency": 4,
                    "latency": {"p50": 30.0},
                    "overhead": {"share": 0.3},
                    "images_per_s": 0.12,
                },
            ]
        },
    }
    t = report.targets(result)
    assert t["speedup_p50_concurrency_1"] == pytest.approx(10 / 7.5)
    assert t["speedup_met"] and t["overhead_met"]
    assert t["throughput_4_vs_1"] == pytest.approx(1.2)
    assert report.targets({}) == {"speedup_target": 1.25, "overhead_target": 0.05}


# -- the command, end to end on the tiny preset -----------------------------------------------------


def _positive_finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_run_writes_json_markdown_and_chart(tmp_path, tiny_checkpoint_root, tiny_bundle, triton_server):
    from kandinsky_bench.cli import main

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "onnx").symlink_to(tiny_bundle[0])  # reused, not exported again
    output = tmp_path / "results"
    argv = [
        "--preset", "tiny",
        "--checkpoint", str(tiny_checkpoint_root),
        "--artifacts", str(artifacts),
        "--output", str(output),
        "--url", triton_server.grpc_url,
        "--warmup", "1",
        "--repeats", "2",
        "--component-repeats", "2",
        "--concurrency", "1", "2",
        "--components", "prior", "unet",
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0

    result = json.loads((output / "results.json").read_text())
    for key in (
        "date",
        "command",
        "settings",
        "machine",
        "versions",
        "components",
        "baseline",
        "served",
        "targets",
    ):
        assert key in result, key
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    for package in ("torch", "onnxruntime", "diffusers", "tritonclient", "tritonserver"):
        assert result["versions"].get(package), package
    assert result["settings"]["prior_steps"] == 2 and result["settings"]["height"] == 64

    assert [c["component"] for c in result["components"]] == ["prior", "unet"]
    for component in result["components"]:
        for run in (component["torch"], *component["onnxruntime"]):
            assert all(_positive_finite(run[p]) for p in ("p50", "p90", "p99")), run
        assert component["onnxruntime"][0]["max_abs_diff"] < 1e-3

    baseline = result["baseline"]
    assert baseline["torch_threads"] >= 1
    assert baseline["interleaved_with_served"]  # alternated with the served requests at concurrency 1
    assert _positive_finite(baseline["latency"]["p50"]) and baseline["latency"]["n"] == 2

    levels = result["served"]["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    for level in levels:
        assert level["requests"] >= 2
        assert _positive_finite(level["images_per_s"])
        for stage in ("encode_prompt", "prior", "decoder", "decode_image"):
            assert _positive_finite(level["stages"][stage]["p50"]), stage
        assert _positive_finite(level["overhead"]["compute_s"])
        assert 0 < level["overhead"]["share"] < 1
        assert level["models"]["unet"]["requests"] >= 2 * level["requests"]
    assert _positive_finite(result["targets"]["speedup_p50_concurrency_1"])

    table = (output / "results.md").read_text()
    for needle in ("| served (Triton, ONNX Runtime) | 1 |", "diffusers float32", "Components", "tiny preset"):
        assert needle in table, needle
    assert (output / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
