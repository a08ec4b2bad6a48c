"""Writes a benchmark result as JSON (everything), a markdown table (what a reader compares) and a chart."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .stats import percentile

logger = logging.getLogger(__name__)

STAGES = ("encode_prompt", "prior", "decoder", "decode_image")
STAGE_LABELS = {
    "encode_prompt": "prompt encoding",
    "prior": "prior loop",
    "decoder": "decoder loop",
    "decode_image": "image decoding",
}
LOOP_LABELS = {"client": "client loop", "server": "server loop"}
# Earlier targets (the served pipeline against diffusers, concurrency 1).
TARGET_SPEEDUP = 1.25
TARGET_OVERHEAD = 0.05
# The loops' targets: the server loop's time outside model compute per denoising step (concurrency 1), the
# server loop never slower than the client loop without added delay, and with an added round trip R
# faster by at least (denoising steps) x R (75 x R for 25 + 50 steps).
TARGET_OUTSIDE_PER_STEP_S = 0.5e-3


def served_levels(result: dict[str, Any]) -> list[dict[str, Any]]:
    return result.get("served", {}).get("levels", [])


def level_of(result: dict[str, Any], loop: str, concurrency: int) -> dict[str, Any] | None:
    for level in served_levels(result):
        if level.get("loop", "client") == loop and level["concurrency"] == concurrency:
            return level
    return None


def denoising_steps(result: dict[str, Any]) -> int:
    settings = result.get("settings", {})
    return int(settings.get("prior_num_inference_steps", 0)) + int(settings.get("num_inference_steps", 0))


def paired_saving(client: dict[str, Any], server: dict[str, Any]) -> float | None:
    """Median over rounds of (client loop latency - server loop latency), where round i of both loops ran
    back to back (concurrency 1 and the round-trip runs take turns): the load of the moment cancels out.
    None when the runs cannot be paired."""
    a, b = client.get("samples_s"), server.get("samples_s")
    if not a or not b or len(a) != len(b):
        return None
    return percentile([x - y for x, y in zip(a, b, strict=True)], 50)


def rtt_comparison(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per added round trip: both loops' p50 and how much faster the server loop is, vs steps x R."""
    rows = result.get("served", {}).get("rtt", [])
    steps = denoising_steps(result)
    out = []
    for rtt in sorted({row["rtt_ms"] for row in rows}):
        by_loop = {row["loop"]: row for row in rows if row["rtt_ms"] == rtt}
        if not {"client", "server"} <= set(by_loop):
            continue
        client, server = by_loop["client"]["latency"], by_loop["server"]["latency"]
        paired = paired_saving(by_loop["client"], by_loop["server"])
        # The verdict uses the paired median where the runs pair up (robust to the load drifting between
        # rounds on a shared machine), else the difference of the p50s; both are reported.
        saved = paired if paired is not None else client["p50"] - server["p50"]
        target = steps * rtt / 1e3
        out.append(
            {
                "rtt_ms": rtt,
                "measured_rtt_ms": by_loop["client"].get("measured_rtt_ms", 0.0),
                "client_p50_s": client["p50"],
                "server_p50_s": server["p50"],
                "saved_s": saved,
                "saved_paired_median_s": paired,
                "saved_p50_s": client["p50"] - server["p50"],
                "saved_mean_s": client["mean"] - server["mean"],
                "saved_min_s": client["min"] - server["min"],
                "speedup": client["p50"] / server["p50"],
                "target_saved_s": target,
                # At R = 0 the target is "never slower": saved >= 0.
                "met": saved >= target,
            }
        )
    return out


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The targets, evaluated on this run's numbers (absent where a part was skipped)."""
    baseline = result.get("baseline")
    out: dict[str, Any] = {
        "speedup_target": TARGET_SPEEDUP,
        "overhead_target": TARGET_OVERHEAD,
        "outside_per_step_target_s": TARGET_OUTSIDE_PER_STEP_S,
    }
    loops = result.get("served", {}).get("loops", [])
    for loop in loops:
        first = level_of(result, loop, 1)
        if first is None:
            continue
        if baseline:
            out.setdefault("speedup_vs_diffusers", {})[loop] = (
                baseline["latency"]["p50"] / first["latency"]["p50"]
            )
        out.setdefault("overhead_share_concurrency_1", {})[loop] = first["overhead"]["share"]
        out.setdefault("outside_per_step_concurrency_1_s", {})[loop] = first["overhead"]["outside_per_step_s"]
        fourth = level_of(result, loop, 4)
        if fourth:
            out.setdefault("throughput_4_vs_1", {})[loop] = fourth["images_per_s"] / first["images_per_s"]
    if "server" in out.get("outside_per_step_concurrency_1_s", {}):
        out["outside_per_step_met"] = (
            out["outside_per_step_concurrency_1_s"]["server"] <= TARGET_OUTSIDE_PER_STEP_S
        )
    comparisons = []
    for level in served_levels(result):
        if level.get("loop") != "server":
            continue
        client = level_of(result, "client", level["concurrency"])
        if client is None:
            continue
        paired = paired_saving(client, level) if level["concurrency"] == 1 else None
        saved = paired if paired is not None else client["latency"]["p50"] - level["latency"]["p50"]
        comparisons.append(
            {
                "concurrency": level["concurrency"],
                "client_p50_s": client["latency"]["p50"],
                "server_p50_s": level["latency"]["p50"],
                "speedup": client["latency"]["p50"] / level["latency"]["p50"],
                "saved_s": saved,
                "saved_paired_median_s": paired,
                "not_slower": saved >= 0,
            }
        )
    if comparisons:
        out["server_vs_client"] = comparisons
        out["server_not_slower_met"] = all(c["not_slower"] for c in comparisons)
    rtt = rtt_comparison(result)
    if rtt:
        out["rtt"] = rtt
        added = [row for row in rtt if row["rtt_ms"] > 0]
        if added:
            out["rtt_met"] = all(row["met"] for row in added)
    return out


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


def _s(value: float) -> str:
    return f"{value:.3f}"


def _ms(value: float) -> str:
    return f"{1000 * value:.1f}"


def _ms2(value: float) -> str:
    return f"{1000 * value:.2f}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _per_exec(level: dict[str, Any], model: str) -> str:
    stats = level["models"].get(model)
    return f"{stats['requests_per_execution']:.2f}" if stats and stats["executions"] else "n/a"


def end_to_end_rows(result: dict[str, Any]) -> list[str]:
    header = (
        "| run | concurrency | requests | p50 s | p90 s | p99 s | images/s | "
        + " | ".join(f"{STAGE_LABELS[s]} p50 s" for s in STAGES)
        + " | outside compute | outside compute ms/step | unet requests/execution | prior requests/execution |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    baseline = result.get("baseline")
    if baseline:
        lat = baseline["latency"]
        rows.append(
            f"| {baseline['label']}, {baseline['torch_threads']} torch threads | 1 | {lat['n']} | "
            f"{_s(lat['p50'])} | {_s(lat['p90'])} | {_s(lat['p99'])} | {baseline['images_per_s']:.3f} | "
            + " | ".join(_s(baseline["stages"][s]["p50"]) for s in STAGES)
            + " | n/a | n/a | n/a | n/a |"
        )
    for level in served_levels(result):
        lat = level["latency"]
        o = level["overhead"]
        rows.append(
            f"| served, {LOOP_LABELS[level.get('loop', 'client')]} | {level['concurrency']} | {level['requests']} | "
            f"{_s(lat['p50'])} | {_s(lat['p90'])} | {_s(lat['p99'])} | {level['images_per_s']:.3f} | "
            + " | ".join(_s(level["stages"][s]["p50"]) for s in STAGES)
            + f" | {_pct(o['share'])} | {_ms2(o['outside_per_step_s'])} | {_per_exec(level, 'unet')} | "
            f"{_per_exec(level, 'prior')} |"
        )
    return rows


def _queue_per_step(level: dict[str, Any]) -> float:
    steps = level["requests"] * (level.get("denoising_steps_per_request") or 1)
    return level["overhead"]["queue_s"] / steps


def loops_rows(result: dict[str, Any]) -> list[str]:
    """Loops x concurrency: the two loops side by side."""
    columns: list[tuple[str, Any]] = [
        ("p50 s", lambda lv: _s(lv["latency"]["p50"])),
        ("p90 s", lambda lv: _s(lv["latency"]["p90"])),
        ("p99 s", lambda lv: _s(lv["latency"]["p99"])),
        ("images/s", lambda lv: f"{lv['images_per_s']:.3f}"),
        ("outside compute ms/step", lambda lv: _ms2(lv["overhead"]["outside_per_step_s"])),
        ("of which Triton queue ms/step", lambda lv: _ms2(_queue_per_step(lv))),
        ("unet requests/execution", lambda lv: _per_exec(lv, "unet")),
        ("prior requests/execution", lambda lv: _per_exec(lv, "prior")),
    ]
    header = "| concurrency | " + " | ".join(f"{name} (client / server)" for name, _ in columns)
    rows = [header + " | server vs client (p50) |", "|---|" + "---|" * (len(columns) + 1)]
    for concurrency in sorted({level["concurrency"] for level in served_levels(result)}):
        client = level_of(result, "client", concurrency)
        server = level_of(result, "server", concurrency)
        cells = [
            " / ".join(value(level) if level else "n/a" for level in (client, server)) for _, value in columns
        ]
        ratio = f"{client['latency']['p50'] / server['latency']['p50']:.2f}x" if client and server else "n/a"
        rows.append(f"| {concurrency} | " + " | ".join(cells) + f" | {ratio} |")
    return rows


def rtt_rows(result: dict[str, Any]) -> list[str]:
    """Loops x added round trip (concurrency 1)."""
    steps = denoising_steps(result)
    rows = [
        "| added round trip R | measured | client p50 s | server p50 s | server faster by: paired median "
        f"| p50 difference | min difference | target: {steps} x R | met | server vs client (p50) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rtt_comparison(result):
        target = "not slower" if row["rtt_ms"] == 0 else f"{_s(row['target_saved_s'])} s"
        paired = row["saved_paired_median_s"]
        rows.append(
            f"| {row['rtt_ms']:g} ms | {row['measured_rtt_ms']:.2f} ms | {_s(row['client_p50_s'])} | "
            f"{_s(row['server_p50_s'])} | {'n/a' if paired is None else _s(paired) + ' s'} | "
            f"{_s(row['saved_p50_s'])} s | {_s(row['saved_min_s'])} s | {target} | "
            f"{'yes' if row['met'] else '**no**'} | {row['speedup']:.2f}x |"
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
    """Per served model: its requests (a per-step model gets one per denoising step) and its Triton times
    summed per generation (what one generation spent in that model), then compute per model request."""
    generations = level["requests"]
    rows = [
        "| model | model requests | executions | model requests/execution | batch rows/execution "
        "| queue ms/generation | compute_input ms/generation | compute_infer ms/generation "
        "| compute_output ms/generation | compute_infer ms/model request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, stats in level["models"].items():
        if not stats["requests"]:
            continue
        rows.append(
            f"| {model} | {stats['requests']} | {stats['executions']} | {stats['requests_per_execution']:.2f} | "
            f"{stats['inferences_per_execution']:.2f} | {_ms(stats['queue_s'] / generations)} | "
            f"{_ms(stats['compute_input_s'] / generations)} | {_ms(stats['compute_infer_s'] / generations)} | "
            f"{_ms(stats['compute_output_s'] / generations)} | {_ms2(stats['compute_infer_s'] / stats['requests'])} |"
        )
    return rows


def overhead_rows(level: dict[str, Any]) -> list[str]:
    o = level["overhead"]
    count = level["requests"]
    steps = level.get("denoising_steps_per_request", 0) or 1
    end_to_end = o["end_to_end_s"]

    def row(label: str, seconds: float) -> str:
        return (
            f"| {label} | {_s(seconds / count)} | {_ms2(seconds / count / steps)} | "
            f"{_pct(seconds / end_to_end)} |"
        )

    where = "client" if level.get("loop", "client") == "client" else "server"
    rows = [
        "| per generation (one end-to-end request) | seconds | ms per denoising step | share of end to end |",
        "|---|---|---|---|",
        row("end to end (client wall time)", end_to_end),
        row("model compute (Triton compute_infer of the network models)", o["compute_s"]),
        row("**outside model compute**", o["outside_s"]),
        row(f"of which: in the generation core ({where}), outside compute", o["loop_outside_compute_s"]),
        row("of which: outside the generation core", o["outside_loop_s"]),
        row("of which: Triton queue (network models)", o["queue_s"]),
        row("of which: tensor copies in/out of the python models", o["compute_io_s"]),
    ]
    for stage in STAGES:
        s = level["stages"][stage]
        outside = s["mean"] - s["server_compute_per_request_s"]
        rows.append(
            f"| {STAGE_LABELS[stage]}: {_s(s['mean'])} s, compute {_s(s['server_compute_per_request_s'])} s"
            f" | {_s(outside)} | | {_pct(outside / (end_to_end / count))} |"
        )
    return rows


def _verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def target_lines(t: dict[str, Any]) -> list[str]:
    lines = []
    per_step = t.get("outside_per_step_concurrency_1_s", {})
    if per_step:
        values = ", ".join(f"{LOOP_LABELS[loop]} {_ms2(v)} ms" for loop, v in per_step.items())
        verdict = (
            f" (target for the server loop <= {_ms2(t['outside_per_step_target_s'])} ms: "
            f"{_verdict(t['outside_per_step_met'])})"
            if "outside_per_step_met" in t
            else ""
        )
        lines.append(f"- time outside model compute per denoising step, concurrency 1: {values}{verdict}")
    if "server_vs_client" in t:
        ratios = ", ".join(
            f"c={c['concurrency']} {c['speedup']:.2f}x (faster by {_s(c['saved_s'])} s"
            + (", paired median)" if c["saved_paired_median_s"] is not None else ", p50)")
            for c in t["server_vs_client"]
        )
        lines.append(
            f"- server loop vs client loop, no added delay, p50 ratio: {ratios} (target: never slower: "
            f"{_verdict(t['server_not_slower_met'])})"
        )
    for row in t.get("rtt", []):
        if row["rtt_ms"] == 0:
            continue
        lines.append(
            f"- added round trip {row['rtt_ms']:g} ms: server loop faster by {_s(row['saved_s'])} s "
            f"({'paired median' if row['saved_paired_median_s'] is not None else 'p50 difference'}; "
            f"p50 difference {_s(row['saved_p50_s'])} s, min difference {_s(row['saved_min_s'])} s); "
            f"target {_s(row['target_saved_s'])} s: {_verdict(row['met'])}"
        )
    for loop, value in t.get("speedup_vs_diffusers", {}).items():
        lines.append(
            f"- {LOOP_LABELS[loop]} p50 at concurrency 1 vs diffusers: **{value:.2f}x** "
            f"(earlier target >= {t['speedup_target']}x: {_verdict(value >= t['speedup_target'])})"
        )
    for loop, value in t.get("overhead_share_concurrency_1", {}).items():
        lines.append(
            f"- {LOOP_LABELS[loop]}, time outside model compute at concurrency 1: {_pct(value)} of end to end "
            f"(earlier target < {_pct(t['overhead_target'])}: {_verdict(value < t['overhead_target'])})"
        )
    for loop, value in t.get("throughput_4_vs_1", {}).items():
        lines.append(f"- {LOOP_LABELS[loop]}, throughput at concurrency 4 vs 1: {value:.2f}x")
    return lines


def markdown(result: dict[str, Any]) -> str:
    settings, machine, versions = result["settings"], result["machine"], result["versions"]
    gpu = ", ".join(machine["gpus"]) or "none"
    lines = [
        f"# Kandinsky 2.2 benchmark: preset `{settings['preset']}`",
        "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- settings: {settings['height']}x{settings['width']}, {settings['prior_num_inference_steps']} prior + "
        f"{settings['num_inference_steps']} decoder steps, guidance {settings['guidance_scale']} "
        f"(prior {settings['prior_guidance_scale']}), {settings['num_images_per_prompt']} image(s) per request, "
        f"warm-up {settings['warmup']}, repeats {settings['repeats']} "
        f"(components {settings['component_repeats']}), protocol {settings['protocol']}, "
        f"repository {settings['repository_options']}",
        f"- server: {settings['server']}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM, GPU: {gpu}; "
        f"load average at start {machine['load_average_start']}"
        + (
            f", before the round-trip runs {machine['load_average_before_rtt']}"
            if "load_average_before_rtt" in machine
            else ""
        )
        + f", at end {machine.get('load_average_end')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]
    if settings["preset"] == "tiny":
        lines.append(
            "- **tiny preset: model compute is tiny, so only the time outside it (the loops' overhead) "
            "means something; the diffusers and component numbers mean nothing**"
        )
    t = result.get("targets", {})
    lines += ["", "## Targets", "", *target_lines(t)]
    levels = served_levels(result)
    if levels:
        lines += ["", "## Loops x concurrency (no added delay)", "", *loops_rows(result)]
    if result.get("served", {}).get("rtt"):
        lines += ["", "## Loops x added network round trip (concurrency 1)", "", *rtt_rows(result)]
    lines += ["", "## End to end, per request", "", *end_to_end_rows(result)]
    for level in levels:
        if level["concurrency"] != 1:
            continue
        lines += [
            "",
            f"## Overhead at concurrency 1, {LOOP_LABELS[level.get('loop', 'client')]} "
            "(Triton statistics, deltas over the window)",
            "",
            *overhead_rows(level),
            "",
            *server_rows(level),
        ]
    for level in levels:
        if level["concurrency"] == 1:
            continue
        lines += [
            "",
            f"### Server statistics, {LOOP_LABELS[level.get('loop', 'client')]}, concurrency "
            f"{level['concurrency']}",
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
    """Latency by stage at concurrency 1, throughput and p50 latency vs concurrency, latency vs added
    round trip; one line per loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: list[tuple[str, dict[str, float], float]] = []
    baseline = result.get("baseline")
    if baseline:
        runs.append(
            ("diffusers", {s: baseline["stages"][s]["p50"] for s in STAGES}, baseline["latency"]["p50"])
        )
    levels = served_levels(result)
    loops = result.get("served", {}).get("loops", [])
    for level in levels:
        if level["concurrency"] == 1:
            runs.append(
                (
                    LOOP_LABELS[level.get("loop", "client")].replace(" ", "\n"),
                    {s: level["stages"][s]["p50"] for s in STAGES},
                    level["latency"]["p50"],
                )
            )
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    (stages_ax, throughput_ax), (latency_ax, rtt_ax) = axes
    names = [name for name, _, _ in runs]
    bottoms = [0.0] * len(runs)
    for stage in STAGES:
        heights = [stages[stage] for _, stages, _ in runs]
        stages_ax.bar(names, heights, bottom=bottoms, label=STAGE_LABELS[stage])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    other = [max(0.0, total - b) for (_, _, total), b in zip(runs, bottoms, strict=True)]
    stages_ax.bar(names, other, bottom=bottoms, label="other", color="lightgrey")
    stages_ax.set_ylim(0, 1.08 * max([b + o for b, o in zip(bottoms, other, strict=True)] or [1.0]))
    stages_ax.set_ylabel("seconds per request (p50 of each stage)")
    stages_ax.set_title("Latency by stage, concurrency 1")
    stages_ax.legend(fontsize=8)

    for loop in loops:
        mine = [level for level in levels if level.get("loop", "client") == loop]
        if not mine:
            continue
        conc = [level["concurrency"] for level in mine]
        throughput_ax.plot(conc, [lv["images_per_s"] for lv in mine], marker="o", label=LOOP_LABELS[loop])
        latency_ax.plot(conc, [lv["latency"]["p50"] for lv in mine], marker="o", label=LOOP_LABELS[loop])
        for ax in (throughput_ax, latency_ax):
            ax.set_xscale("log", base=2)
            ax.set_xticks(conc, [str(c) for c in conc])
    if baseline:
        throughput_ax.axhline(
            baseline["images_per_s"], linestyle="--", color="grey", label="diffusers (sequential)"
        )
    throughput_ax.set_ylabel("images per second")
    throughput_ax.set_title("Throughput vs concurrency")
    latency_ax.set_ylabel("p50 seconds per request")
    latency_ax.set_title("Latency vs concurrency")
    for ax in (throughput_ax, latency_ax):
        ax.set_xlabel("concurrent clients")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)

    rtt = result.get("served", {}).get("rtt", [])
    for loop in loops:
        mine = sorted((row for row in rtt if row["loop"] == loop), key=lambda row: row["rtt_ms"])
        if mine:
            rtt_ax.plot(
                [row["rtt_ms"] for row in mine],
                [row["latency"]["p50"] for row in mine],
                marker="o",
                label=LOOP_LABELS[loop],
            )
    rtt_ax.set_xlabel("added network round trip (ms)")
    rtt_ax.set_ylabel("p50 seconds per request")
    rtt_ax.set_title("Latency vs added round trip, concurrency 1")
    rtt_ax.set_ylim(bottom=0)
    if rtt:
        rtt_ax.legend(fontsize=8)
    settings = result["settings"]
    fig.suptitle(
        f"Kandinsky 2.2 `{settings['preset']}` {settings['height']}x{settings['width']}, "
        f"{settings['prior_num_inference_steps']}+{settings['num_inference_steps']} steps, "
        f"{result['machine']['cpu']}"
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
