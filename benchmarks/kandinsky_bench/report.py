"""Writes a benchmark result as JSON (everything), a markdown table (what a reader compares) and a chart."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STAGES = ("encode_prompt", "prior", "decoder", "decode_image")
STAGE_LABELS = {
    "encode_prompt": "prompt encoding",
    "prior": "prior loop",
    "decoder": "decoder loop",
    "decode_image": "image decoding",
}
TARGET_SPEEDUP = 1.25
TARGET_OVERHEAD = 0.05


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's CPU targets, evaluated on this run's numbers (None where a part was skipped)."""
    levels = {level["concurrency"]: level for level in result.get("served", {}).get("levels", [])}
    baseline = result.get("baseline")
    out: dict[str, Any] = {"speedup_target": TARGET_SPEEDUP, "overhead_target": TARGET_OVERHEAD}
    first = levels.get(1)
    if first and baseline:
        out["speedup_p50_concurrency_1"] = baseline["latency"]["p50"] / first["latency"]["p50"]
        out["speedup_met"] = out["speedup_p50_concurrency_1"] >= TARGET_SPEEDUP
    if first:
        out["overhead_share_concurrency_1"] = first["overhead"]["share"]
        out["overhead_met"] = first["overhead"]["share"] < TARGET_OVERHEAD
    if first and levels.get(4):
        out["throughput_4_vs_1"] = levels[4]["images_per_s"] / first["images_per_s"]
    return out


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


def _s(value: float) -> str:
    return f"{value:.3f}"


def _ms(value: float) -> str:
    return f"{1000 * value:.1f}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def end_to_end_rows(result: dict[str, Any]) -> list[str]:
    header = (
        "| run | concurrency | requests | p50 s | p90 s | p99 s | images/s | "
        + " | ".join(f"{STAGE_LABELS[s]} p50 s" for s in STAGES)
        + " | outside compute |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    baseline = result.get("baseline")
    if baseline:
        lat = baseline["latency"]
        rows.append(
            f"| {baseline['label']}, {baseline['torch_threads']} torch threads | 1 | {lat['n']} | "
            f"{_s(lat['p50'])} | {_s(lat['p90'])} | {_s(lat['p99'])} | {baseline['images_per_s']:.3f} | "
            + " | ".join(_s(baseline["stages"][s]["p50"]) for s in STAGES)
            + " | n/a |"
        )
    for level in result.get("served", {}).get("levels", []):
        lat = level["latency"]
        rows.append(
            f"| served (Triton, ONNX Runtime) | {level['concurrency']} | {level['requests']} | "
            f"{_s(lat['p50'])} | {_s(lat['p90'])} | {_s(lat['p99'])} | {level['images_per_s']:.3f} | "
            + " | ".join(_s(level["stages"][s]["p50"]) for s in STAGES)
            + f" | {_pct(level['overhead']['share'])} |"
        )
    return rows


def component_rows(result: dict[str, Any]) -> list[str]:
    rows = [
        "| component | batch | run | p50 ms | p90 ms | p99 ms | vs torch (p50) | max abs diff | max rel diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for comp in result.get("components", []):
        t = comp["torch"]
        rows.append(
            f"| {comp['component']} | {comp['batch']} | {t['label']} | {_ms(t['p50'])} | {_ms(t['p90'])} | "
            f"{_ms(t['p99'])} | 1.00x | | |"
        )
        for run in comp.get("torch_sweep", []):
            rows.append(
                f"| {comp['component']} | {comp['batch']} | {run['label']} | {_ms(run['p50'])} | "
                f"{_ms(run['p90'])} | {_ms(run['p99'])} | {run['speedup_vs_torch']:.2f}x | | |"
            )
        for run in comp["onnxruntime"]:
            rows.append(
                f"| {comp['component']} | {comp['batch']} | {run['label']} | {_ms(run['p50'])} | "
                f"{_ms(run['p90'])} | {_ms(run['p99'])} | {run['speedup_vs_torch']:.2f}x | "
                f"{run['max_abs_diff']:.1e} | {run['max_rel_diff']:.1e} |"
            )
    return rows


def server_rows(level: dict[str, Any]) -> list[str]:
    count = level["requests"]
    rows = [
        "| model | requests | executions | requests/execution | queue ms/request | compute_input ms/request "
        "| compute_infer ms/request | compute_output ms/request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, stats in level["models"].items():
        if not stats["requests"]:
            continue
        rows.append(
            f"| {model} | {stats['requests']} | {stats['executions']} | {stats['requests_per_execution']:.2f} | "
            f"{_ms(stats['queue_s'] / count)} | {_ms(stats['compute_input_s'] / count)} | "
            f"{_ms(stats['compute_infer_s'] / count)} | {_ms(stats['compute_output_s'] / count)} |"
        )
    return rows


def overhead_rows(level: dict[str, Any]) -> list[str]:
    o = level["overhead"]
    count = level["requests"]
    rows = [
        "| per request | seconds | share of end to end |",
        "|---|---|---|",
        f"| end to end (client wall time) | {_s(o['end_to_end_s'] / count)} | 100% |",
        f"| model compute (Triton compute_infer) | {_s(o['compute_s'] / count)} | "
        f"{_pct(o['compute_s'] / o['end_to_end_s'])} |",
        f"| outside model compute | {_s(o['outside_s'] / count)} | {_pct(o['share'])} |",
        f"| of which: Triton queue | {_s(o['queue_s'] / count)} | {_pct(o['queue_s'] / o['end_to_end_s'])} |",
        f"| of which: tensor copies in/out of the python models | {_s(o['compute_io_s'] / count)} | "
        f"{_pct(o['compute_io_s'] / o['end_to_end_s'])} |",
        f"| of which: client, serialization, transport | {_s(o['client_and_transport_s'] / count)} | "
        f"{_pct(o['client_and_transport_s'] / o['end_to_end_s'])} |",
    ]
    for stage in STAGES:
        s = level["stages"][stage]
        outside = s["mean"] - s["server_compute_per_request_s"]
        rows.append(
            f"| {STAGE_LABELS[stage]}: client {_s(s['mean'])} s, compute {_s(s['server_compute_per_request_s'])} s"
            f" | {_s(outside)} | {_pct(outside / (o['end_to_end_s'] / count))} |"
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    settings, machine, versions = result["settings"], result["machine"], result["versions"]
    gpu = ", ".join(machine["gpus"]) or "none"
    lines = [
        f"# Kandinsky 2.2 benchmark: preset `{settings['preset']}`",
        "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- settings: {settings['height']}x{settings['width']}, {settings['prior_steps']} prior + "
        f"{settings['decoder_steps']} decoder steps, guidance {settings['guidance_scale']}, "
        f"{settings['images_per_request']} image(s) per request, warm-up {settings['warmup']}, "
        f"repeats {settings['repeats']} (components {settings['component_repeats']}), "
        f"protocol {settings['protocol']}, repository {settings['repository_options']}",
        f"- server: {settings['server']}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM, GPU: {gpu}; "
        f"load average at start {machine['load_average_start']}, at end {machine.get('load_average_end')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]
    if settings["preset"] == "tiny":
        lines.append("- **tiny preset: a smoke run, its numbers mean nothing**")
    t = result.get("targets", {})
    lines += ["", "## End to end, per request", "", *end_to_end_rows(result), ""]
    if "speedup_p50_concurrency_1" in t:
        verdict = "met" if t["speedup_met"] else "not met"
        lines.append(
            f"- served p50 at concurrency 1 is **{t['speedup_p50_concurrency_1']:.2f}x** the diffusers "
            f"baseline's speed (target >= {t['speedup_target']}x: {verdict})"
        )
    if "overhead_share_concurrency_1" in t:
        verdict = "met" if t["overhead_met"] else "not met"
        lines.append(
            f"- time outside model compute at concurrency 1: **{_pct(t['overhead_share_concurrency_1'])}** "
            f"of end to end (target < {_pct(t['overhead_target'])}: {verdict})"
        )
    if "throughput_4_vs_1" in t:
        lines.append(f"- throughput at concurrency 4 vs 1: **{t['throughput_4_vs_1']:.2f}x**")
    levels = result.get("served", {}).get("levels", [])
    if levels:
        first = levels[0]
        lines += [
            "",
            f"## Overhead at concurrency {first['concurrency']} (Triton statistics, deltas over the window)",
            "",
            *overhead_rows(first),
            "",
            *server_rows(first),
        ]
        for level in levels[1:]:
            lines += [
                "",
                f"### Server statistics at concurrency {level['concurrency']}",
                "",
                *server_rows(level),
            ]
    if result.get("components"):
        lines += [
            "",
            "## Components: PyTorch eager vs ONNX Runtime, same inputs",
            "",
            *component_rows(result),
        ]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    """Latency by stage (stacked p50 bars) and throughput vs concurrency, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: list[tuple[str, dict[str, float], float]] = []
    baseline = result.get("baseline")
    if baseline:
        runs.append(
            ("diffusers", {s: baseline["stages"][s]["p50"] for s in STAGES}, baseline["latency"]["p50"])
        )
    levels = result.get("served", {}).get("levels", [])
    for level in levels:
        runs.append(
            (
                f"served\nc={level['concurrency']}",
                {s: level["stages"][s]["p50"] for s in STAGES},
                level["latency"]["p50"],
            )
        )
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = [name for name, _, _ in runs]
    bottoms = [0.0] * len(runs)
    for stage in STAGES:
        heights = [stages[stage] for _, stages, _ in runs]
        left.bar(names, heights, bottom=bottoms, label=STAGE_LABELS[stage])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    other = [max(0.0, total - b) for (_, _, total), b in zip(runs, bottoms, strict=True)]
    left.bar(names, other, bottom=bottoms, label="other (client)", color="lightgrey")
    left.set_ylim(0, 1.08 * max([b + o for b, o in zip(bottoms, other, strict=True)] or [1.0]))
    left.set_ylabel("seconds per request (p50 of each stage)")
    left.set_title("Latency by stage")
    left.legend(fontsize=8)

    if levels:
        conc = [level["concurrency"] for level in levels]
        right.plot(conc, [level["images_per_s"] for level in levels], marker="o", label="served")
        right.set_xscale("log", base=2)
        right.set_xticks(conc, [str(c) for c in conc])
    if baseline:
        right.axhline(baseline["images_per_s"], linestyle="--", color="grey", label="diffusers (sequential)")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("images per second")
    right.set_ylim(bottom=0)
    right.set_title("Throughput vs concurrency")
    right.legend(fontsize=8)
    settings = result["settings"]
    fig.suptitle(
        f"Kandinsky 2.2 `{settings['preset']}` {settings['height']}x{settings['width']}, "
        f"{settings['prior_steps']}+{settings['decoder_steps']} steps, {result['machine']['cpu']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: dict[str, Any], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": folder / "results.json",
        "markdown": folder / "results.md",
        "chart": folder / "results.png",
    }
    result["targets"] = targets(result)
    write_json(result, paths["json"])
    paths["markdown"].write_text(markdown(result))
    chart(result, paths["chart"])
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
