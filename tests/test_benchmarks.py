"""`kandinsky-bench`: the arithmetic of its numbers, the delaying proxy, and a smoke run that keeps the
command working.

The smoke run uses the tiny preset (its numbers mean nothing) with minimal repeats, and the session's
tiny bundle and Triton server, so it adds seconds rather than an export and a server start.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import pytest
from kandinsky_bench import report, stats
from kandinsky_bench.proxy import DelayProxy, parse_address, proxy_process
from kandinsky_bench.served import Request, requests_per_worker, summarize_level

TINY_REQUEST = Request(
    height=64, width=64, prior_num_inference_steps=2, num_inference_steps=2, guidance_scale=4.0
)

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


def test_per_execution():
    counters = {"success_count": 8, "inference_count": 16, "execution_count": 4}
    assert stats.per_execution(counters) == {"requests_per_execution": 2.0, "inferences_per_execution": 4.0}
    assert stats.per_execution({}) == {"requests_per_execution": 0.0, "inferences_per_execution": 0.0}


def test_request_steps_and_options():
    assert TINY_REQUEST.steps == 4
    assert TINY_REQUEST.expected_requests(3) == {"prior": 6, "unet": 6, "postprocess_image": 3}
    options = TINY_REQUEST.options()
    assert options["prior_num_inference_steps"] == 2 and options["num_inference_steps"] == 2
    assert options["prior_guidance_scale"] == options["guidance_scale"] == 4.0


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
    level = summarize_level(1, TINY_REQUEST, records, wall_s=2.0, delta=counters, loop="server")
    assert level["loop"] == "server"
    assert level["images_per_s"] == pytest.approx(1.0)
    assert level["overhead"]["compute_s"] == pytest.approx(1.8)
    assert level["overhead"]["share"] == pytest.approx(0.1)
    # 0.2 s outside compute over 2 requests of 4 denoising steps each.
    assert level["overhead"]["outside_per_step_s"] == pytest.approx(0.2 / 8)
    assert level["overhead"]["loop_outside_compute_s"] == pytest.approx(1.98 - 1.8)
    assert level["overhead"]["outside_loop_s"] == pytest.approx(0.02)
    assert level["overhead"]["queue_s"] == pytest.approx(0.05)
    assert level["overhead"]["client_and_transport_s"] == pytest.approx(2.0 - 1.9)
    assert level["stages"]["decoder"]["server_compute_per_request_s"] == pytest.approx(0.45)
    assert level["models"]["unet"]["requests_per_execution"] == pytest.approx(2.0)
    assert "decode_image" not in level["models"]
    # The server loop's own model is the loop, not model compute.
    counters["kandinsky"] = {"compute_infer_ns": 7 * ns, "success_ns": 7 * ns, "success_count": 2}
    again = summarize_level(1, TINY_REQUEST, records, wall_s=2.0, delta=counters, loop="server")
    assert again["overhead"]["compute_s"] == pytest.approx(1.8)
    assert again["models"]["kandinsky"]["requests"] == 2


def _level(loop: str, concurrency: int, p50: float, per_step: float, images_per_s: float) -> dict:
    return {
        "loop": loop,
        "concurrency": concurrency,
        "latency": {"p50": p50, "mean": p50},
        "overhead": {"share": 0.02, "outside_per_step_s": per_step},
        "images_per_s": images_per_s,
    }


def _rtt_row(loop: str, rtt_ms: float, p50: float) -> dict:
    latency = {"p50": p50, "mean": p50, "min": p50}
    return {"loop": loop, "rtt_ms": rtt_ms, "measured_rtt_ms": rtt_ms, "latency": latency}


def test_targets():
    result = {
        "settings": {"prior_num_inference_steps": 25, "num_inference_steps": 50},
        "baseline": {"latency": {"p50": 10.0}},
        "served": {
            "loops": ["client", "server"],
            "levels": [
                _level("client", 1, 8.0, 2.8e-3, 0.125),
                _level("server", 1, 7.5, 0.4e-3, 0.13),
                _level("client", 4, 30.0, 3e-3, 0.13),
                _level("server", 4, 31.0, 1e-3, 0.13),
            ],
            "rtt": [
                _rtt_row("client", 0, 8.0),
                _rtt_row("server", 0, 7.5),
                _rtt_row("client", 1, 8.1),
                _rtt_row("server", 1, 7.5),  # 0.6 s faster >= 75 x 1 ms
                _rtt_row("client", 10, 8.8),
                _rtt_row("server", 10, 7.6),  # 1.2 s faster < 75 x 10 ms
            ],
        },
    }
    t = report.targets(result)
    assert t["speedup_vs_diffusers"]["client"] == pytest.approx(10 / 8)
    assert t["speedup_vs_diffusers"]["server"] == pytest.approx(10 / 7.5)
    assert t["outside_per_step_concurrency_1_s"] == {"client": 2.8e-3, "server": 0.4e-3}
    assert t["outside_per_step_met"]
    assert t["throughput_4_vs_1"]["server"] == pytest.approx(1.0)
    assert [c["not_slower"] for c in t["server_vs_client"]] == [True, False]
    assert not t["server_not_slower_met"]
    rtt = {row["rtt_ms"]: row for row in t["rtt"]}
    assert rtt[1]["target_saved_s"] == pytest.approx(0.075) and rtt[1]["met"]
    assert rtt[10]["target_saved_s"] == pytest.approx(0.75) and rtt[10]["met"]
    assert rtt[10]["saved_p50_s"] == pytest.approx(1.2)
    result["served"]["rtt"][-1] = _rtt_row("server", 10, 8.3)  # 0.5 s faster < 0.75 s
    t = report.targets(result)
    assert not t["rtt_met"] and not t["rtt"][-1]["met"]
    table = report.rtt_rows(result)
    assert "75 x R" in table[0] and "**no**" in table[-1]
    # Runs that pair up (round i of both loops back to back) are compared pair by pair: the load of
    # the moment cancels out. Here the p50s differ by 0.5 s, but every pair by 0.8 s.
    result["served"]["rtt"][-2]["samples_s"] = [9.0, 8.8, 12.0]
    result["served"]["rtt"][-1]["samples_s"] = [8.2, 8.0, 11.2]
    row = report.targets(result)["rtt"][-1]
    assert row["saved_paired_median_s"] == pytest.approx(0.8) and row["saved_s"] == pytest.approx(0.8)
    assert row["met"]
    assert report.targets({}) == {
        "speedup_target": 1.25,
        "overhead_target": 0.05,
        "outside_per_step_target_s": 0.5e-3,
    }


# -- the delaying proxy ----------------------------------------------------------------------------


@pytest.fixture
def echo_server():
    """A TCP echo server on loopback; yields its (host, port)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(connection: socket.socket) -> None:
        with connection:
            while data := connection.recv(65536):
                connection.sendall(data)

    def accept() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[:2]
    server.close()


def _round_trips(address: tuple[str, int], count: int, size: int = 1000) -> list[float]:
    """Seconds per request-response of `size` bytes over one connection."""
    durations = []
    with socket.create_connection(address) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(count):
            payload = bytes([i % 256]) * size
            start = time.perf_counter()
            connection.sendall(payload)
            received = b""
            while len(received) < size:
                received += connection.recv(size - len(received))
            durations.append(time.perf_counter() - start)
            assert received == payload
        connection.shutdown(socket.SHUT_WR)  # the echo server's close comes back through the proxy
        assert connection.recv(1) == b""
    return durations


def test_proxy_adds_the_round_trip(echo_server):
    with DelayProxy(echo_server, rtt_s=0.010) as proxy:
        durations = _round_trips(proxy.address, 10)
        assert min(durations) >= 0.010, durations
        assert _round_trips(proxy.address, 3, size=300_000)  # large payloads arrive whole
    with DelayProxy(echo_server, rtt_s=0.0) as proxy:
        assert len(_round_trips(proxy.address, 3)) == 3


def test_proxy_process(echo_server):
    with proxy_process(f"{echo_server[0]}:{echo_server[1]}", rtt_ms=10) as url:
        assert min(_round_trips(parse_address(url), 5)) >= 0.010


def test_parse_address():
    assert parse_address("127.0.0.1:8001") == ("127.0.0.1", 8001)
    assert parse_address("http://localhost:8000") == ("localhost", 8000)
    with pytest.raises(ValueError):
        parse_address("localhost")


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
        "--rtt-ms", "0", "1",
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
    assert result["settings"]["prior_num_inference_steps"] == 2 and result["settings"]["height"] == 64
    assert result["settings"]["num_inference_steps"] == 2

    assert [c["component"] for c in result["components"]] == ["prior", "unet"]
    for component in result["components"]:
        for run in (component["torch"], *component["onnxruntime"]):
            assert all(_positive_finite(run[p]) for p in ("p50", "p90", "p99")), run
        assert component["onnxruntime"][0]["max_abs_diff"] < 1e-3

    baseline = result["baseline"]
    assert baseline["torch_threads"] >= 1
    assert baseline["interleaved_with_served"]  # alternated with the served requests at concurrency 1
    assert _positive_finite(baseline["latency"]["p50"]) and baseline["latency"]["n"] == 2

    served = result["served"]
    levels = served["levels"]
    assert served["loops"] == ["client", "server"]
    assert [(level["loop"], level["concurrency"]) for level in levels] == [
        ("client", 1),
        ("server", 1),
        ("client", 2),
        ("server", 2),
    ]
    for level in levels:
        assert level["requests"] >= 2
        assert _positive_finite(level["images_per_s"])
        for p in ("p50", "p90", "p99"):
            assert _positive_finite(level["latency"][p])
        for stage in ("encode_prompt", "prior", "decoder", "decode_image"):
            assert _positive_finite(level["stages"][stage]["p50"]), stage
        assert _positive_finite(level["overhead"]["compute_s"])
        assert 0 < level["overhead"]["share"] < 1
        assert _positive_finite(level["overhead"]["outside_per_step_s"])
        assert level["denoising_steps_per_request"] == 4
        for model in ("unet", "prior"):
            stats_ = level["models"][model]
            assert stats_["requests"] >= 2 * level["requests"], model
            assert stats_["requests_per_execution"] >= 1, model
            assert stats_["inferences_per_execution"] >= stats_["requests_per_execution"], model
    assert [(row["loop"], row["rtt_ms"]) for row in served["rtt"]] == [
        ("client", 0),
        ("server", 0),
        ("client", 1),
        ("server", 1),
    ]
    for row in served["rtt"]:
        assert row["requests"] == 2 and _positive_finite(row["latency"]["p50"])
    assert served["rtt"][2]["measured_rtt_ms"] > 0.5  # the proxy was really in the way

    targets = result["targets"]
    for loop in ("client", "server"):
        assert _positive_finite(targets["speedup_vs_diffusers"][loop])
        assert _positive_finite(targets["outside_per_step_concurrency_1_s"][loop])
    assert isinstance(targets["outside_per_step_met"], bool)
    assert [row["rtt_ms"] for row in targets["rtt"]] == [0, 1]
    assert targets["rtt"][1]["target_saved_s"] == pytest.approx(4 * 1e-3)

    table = (output / "results.md").read_text()
    for needle in (
        "| served, client loop | 1 |",
        "| served, server loop | 2 |",
        "Loops x concurrency",
        "Loops x added network round trip",
        "| 1 ms |",
        "diffusers float32",
        "Components",
        "tiny preset",
        # Per-model times are summed per generation, and said so; per model request too.
        "queue ms/generation",
        "compute_infer ms/model request",
    ):
        assert needle in table, needle
    assert "ms/request" not in table
    assert (output / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scheduler_benchmark_reports_scheduler_and_unet_time_per_step(tmp_path, triton_server):
    """`kandinsky-bench schedulers`: per scheduler and loop, its numpy time per step (measured where the
    loop ran) next to the UNet's compute, plus DPM-Solver++ 20 steps vs DDPM 50 end to end."""
    from kandinsky_bench.cli import main

    out = tmp_path / "schedulers.json"
    argv = [
        "schedulers", "--url", triton_server.grpc_url, "--height", "64", "--width", "64",
        "--num-inference-steps", "2", "--repeats", "1", "--schedulers", "DDIMScheduler", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["scheduler"], r["num_inference_steps"], r["loop"]) for r in rows] == [
        ("DDIMScheduler", 2, "client"),
        ("DDIMScheduler", 2, "server"),
        ("DPMSolverMultistepScheduler", 20, "client"),
        ("DPMSolverMultistepScheduler", 20, "server"),
        ("DDPMScheduler", 50, "client"),
        ("DDPMScheduler", 50, "server"),
    ]
    for row in rows:
        for key in ("scheduler_ms_per_step", "unet_compute_ms_per_step", "p50_s"):
            assert _positive_finite(row[key]), (row["scheduler"], row["loop"], key)
        # The scheduler's numpy step is a small part of a step; a wrong window would break this.
        assert row["scheduler_ms_per_step"] < 1e3 * row["p50_s"] / row["num_inference_steps"]


# -- `kandinsky-bench timed`: the timed flavour, modelled GPU time ------------------------------------


def test_batch_statistics_are_parsed_per_batch_size():
    raw = _raw_stats(5_000, 700, 3, as_strings=True)
    raw["model_stats"][0]["batch_stats"] = [
        {"batch_size": "2", "compute_infer": {"count": "2", "ns": "10"}},
        {"batch_size": "8", "compute_infer": {"count": "1", "ns": "40"}},
    ]
    before = stats.parse_model_stats(_raw_stats(0, 0, 0, as_strings=True))
    delta = stats.stats_delta(before, stats.parse_model_stats(raw))
    assert stats.executions_by_batch(delta["unet"]) == {2: 2, 8: 1}
    assert stats.executions_by_batch(delta["prior"]) == {}


def test_timed_schedules_ideal_rows_and_modelled_bound():
    from kandinsky_bench import timed
    from kandinsky_core.gpu_costs import load_costs, modelled_generation_seconds, modelled_seconds

    assert timed.parse_schedule("ddpm-25+50") == timed.Schedule("ddpm-25+50", "DDPMScheduler", 25, 50)
    dpm = timed.parse_schedule("dpm-20")
    assert (dpm.scheduler, dpm.prior_steps, dpm.steps) == ("DPMSolverMultistepScheduler", 25, 20)
    for bad in ("ddpm", "nope-25+50", "ddpm-x+50", "ddpm-0"):
        with pytest.raises(ValueError):
            timed.parse_schedule(bad)
    # Guided rows (2 per image) of every running generation, up to the batch limit (UNet 8, prior 16).
    assert [timed.ideal_rows("unet", c) for c in (1, 2, 4, 8, 32)] == [2, 4, 8, 8, 8]
    assert [timed.ideal_rows("prior", c) for c in (1, 8, 32)] == [2, 16, 16]
    costs = load_costs()
    schedule = timed.parse_schedule("ddpm-25+50")
    alone = timed.modelled_alone("h100", 768, schedule, costs)
    assert alone == pytest.approx(modelled_generation_seconds("h100", 768, 768).seconds_per_image)
    assert timed.modelled_bound("h100", 768, schedule, 1, costs) == pytest.approx(alone)
    # Batching can only share weight reads and floors: the bound per image never grows with concurrency.
    assert timed.modelled_bound("h100", 768, schedule, 8, costs) <= alone
    models = {"unet": {"executions_by_batch": {2: 3, 8: 1}}, "tokenizer": {"executions_by_batch": {1: 5}}}
    expected = 3 * modelled_seconds("unet", 2, 768, 768, "h100") + modelled_seconds(
        "unet", 8, 768, 768, "h100"
    )
    assert timed.modelled_busy(models, "h100", 768, costs) == pytest.approx(expected)
    with pytest.raises(SystemExit):  # 128 px is below the engine profiles' floor when 768 is served
        timed.parse_args(["--sizes", "128", "768"])


def test_timed_benchmark_smoke(tmp_path, tiny_checkpoint_root, tiny_bundle):
    """`kandinsky-bench timed` end to end at the smallest settings (both repositories, both loops): the
    JSON's structure and the sanity of its numbers, never their size."""
    from kandinsky_bench.cli import main
    from kandinsky_core.components import COMPONENTS
    from kandinsky_core.gpu_costs import modelled_generation_seconds

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "checkpoint").symlink_to(tiny_checkpoint_root)  # reused, not written and exported again
    (artifacts / "onnx").symlink_to(tiny_bundle[0])
    out = tmp_path / "timed.json"
    argv = [
        "timed", "--gpu", "h100", "--sizes", "128", "--concurrency", "1", "2", "--schedules", "ddpm-2+2",
        "--repeats", "2", "--artifacts", str(artifacts), "--output", str(tmp_path / "results"),
        "--json", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    for key in (
        "label",
        "command",
        "date",
        "machine",
        "versions",
        "settings",
        "estimate",
        "stub_hop",
        "rows",
    ):
        assert key in result, key
    assert "modelled" in result["label"] and "h100" in result["label"]
    assert result["estimate"]["cells"] == 4

    assert [(h["loop"], h["size"]) for h in result["stub_hop"]] == [("client", 128), ("server", 128)]
    for hop in result["stub_hop"]:
        assert _positive_finite(hop["stub_hop_per_step_s"]) and _positive_finite(hop["stub_hop_per_call_s"])

    rows = result["rows"]
    assert [(r["loop"], r["concurrency"]) for r in rows] == [
        ("client", 1),
        ("client", 2),
        ("server", 1),
        ("server", 2),
    ]
    alone = modelled_generation_seconds("h100", 128, 128, prior_steps=2, steps=2).seconds_per_image
    for row in rows:
        assert row["generations"] >= 2 and row["size"] == 128 and row["steps"] == 2
        assert _positive_finite(row["images_per_s"]) and _positive_finite(row["bound_images_per_s"])
        assert row["latency"]["p50"] <= row["latency"]["p99"]
        assert row["modelled_compute_per_image_s"] == pytest.approx(alone) and alone > 0
        assert 0 < row["gpu_busy_share"] <= 1  # the timed networks sleep one at a time
        assert row["queue_per_step_s"] >= 0
        assert row["stub_hop"]["stub_hop_per_step_s"] > 0
        # (p50 - modelled compute) / steps means something alone only; the GPU's idle time at any concurrency.
        assert (row["outside_modelled_per_step_s"] is None) == (row["concurrency"] > 1)
        assert math.isfinite(row["gpu_idle_per_step_s"])
        for model in ("unet", "prior"):
            ideal = row[f"{model}_ideal_rows"]
            assert ideal == min(2 * row["concurrency"], COMPONENTS[model].max_batch_size)
            # A generation has one step in flight: no execution holds more than every generation's rows.
            assert 0 < row[f"{model}_rows_per_execution"] <= ideal, (model, row["loop"], row["concurrency"])
            assert (
                sum(row["models"][model]["executions_by_batch"].values())
                == row["models"][model]["executions"]
            )
    table = (tmp_path / "results" / "results.md").read_text()
    for needle in ("modelled: h100 timed flavour", "stub hop ms/step", "| 128 | server | 2 |"):
        assert needle in table, needle
