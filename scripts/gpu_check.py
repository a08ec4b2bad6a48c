"""The measurements of scripts/gpu-check.sh, on one GPU: FP16 error, latency per component, end to end.

    python3 scripts/gpu_check.py --checkpoint CKPT --bundle BUNDLE --out OUT [--size 768] [--device cuda]

- FP16 vs FP32 per component: the reports `kandinsky-export fp16 --providers CUDAExecutionProvider` wrote
  into the bundle's manifest (storage emulation on the CPU, the FP16 graph natively on the GPU).
- Latency per component: ONNX Runtime's CUDA provider on the served precision (the bundle's measured
  choice) against PyTorch FP16 eager on the same GPU, on the inputs each component gets in a real
  text-to-image run at --size (recorded by `kandinsky_export.calibration`), batch as text-to-image uses it.
- End to end: the generation core (the code the server runs) over those ONNX Runtime sessions, and the
  diffusers FP16 pipelines (prior + decoder), same size and steps, same GPU.
- Served (`--serve-flavour`): the bundle served by Triton in that repository flavour, both loops (client
  and server) at concurrency 1, and the difference between their images.

Writes OUT/gpu-check.json and OUT/gpu-check.md (a table headed by the card's name). `--device cpu` runs
the same code on the CPU (ONNX Runtime's CPU provider, PyTorch FP32): the plumbing check of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from kandinsky_bench.timing import median_seconds


def _gpu_name(device: str) -> str:
    if device != "cuda":
        return f"CPU ({platform.processor() or platform.machine()}), no GPU"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        return out.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        import torch

        return torch.cuda.get_device_name(0)


def fp16_errors(bundle: Path) -> list[dict[str, Any]]:
    """Per component: the FP16 check's reports as `kandinsky-export fp16` recorded them."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = []
    for component, entry in manifest["components"].items():
        variant = entry.get("variants", {}).get("fp16")
        if not variant:
            continue
        for report in variant["parity"]:
            rows.append(
                {
                    "component": component,
                    "check": report["precision"],
                    "output": report["output"],
                    "max_abs": report["max_abs_error"],
                    "max_rel": report["max_rel_error"],
                    "kept_fp32": ", ".join(variant["op_block_list"]) or "-",
                    "default_precision": entry.get("default_precision", "fp32"),
                }
            )
    return rows


def component_latency(
    checkpoint: Path, bundle: Path, run: Any, *, device: str, warmup: int, repeats: int
) -> list[dict[str, Any]]:
    """ONNX Runtime (served precision) vs PyTorch eager (FP16 on a GPU) per component, one text-to-image call."""
    import torch
    from kandinsky_export.calibration import onnx_file
    from kandinsky_export.checkpoint import Checkpoint
    from kandinsky_export.modules import build_wrapper
    from kandinsky_export.onnx_export import onnx_session, run_session

    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    dtype = torch.float16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ckpt = Checkpoint.from_root(checkpoint)
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = []
    for component, calls in run.calls.items():
        if component not in manifest["components"]:
            continue
        inputs = calls[0]  # the first call: the batch text-to-image sends
        path = onnx_file(bundle, component, "default")
        session = onnx_session(path, providers)
        names = [o.name for o in session.get_outputs()]
        ort_s = median_seconds(
            lambda s=session, n=names, i=inputs: s.run(n, i), warmup=warmup, repeats=repeats, progress=False
        )
        wrapper = build_wrapper(component, ckpt.load_component(component)).to(device=device, dtype=dtype)
        feed = {
            k: torch.from_numpy(np.ascontiguousarray(v)).to(
                device=device, dtype=dtype if v.dtype.kind == "f" else None
            )
            for k, v in inputs.items()
        }

        def torch_call(w=wrapper, f=feed) -> Any:
            with torch.inference_mode():
                return w(**f)

        torch_s = median_seconds(torch_call, warmup=warmup, repeats=repeats, progress=False, sync=sync)
        reference = run_session(onnx_session(bundle / component / "model.onnx", providers), inputs)
        served = run_session(session, inputs)
        error = max(
            float(
                np.abs(served[k].astype(np.float64) - reference[k]).max()
                / max(1.0, float(np.abs(reference[k]).max()))
            )
            for k in reference
        )
        rows.append(
            {
                "component": component,
                "batch": int(next(iter(inputs.values())).shape[0]),
                "shapes": {k: list(v.shape) for k, v in inputs.items()},
                "precision": manifest["components"][component].get("default_precision", "fp32"),
                "ort_ms": 1e3 * ort_s,
                "torch_ms": 1e3 * torch_s,
                "speedup": torch_s / ort_s,
                "served_vs_fp32_rel_error": error,
            }
        )
        del wrapper, session
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def end_to_end(
    checkpoint: Path,
    bundle: Path,
    *,
    device: str,
    size: int,
    prior_steps: int,
    decoder_steps: int,
    repeats: int,
) -> dict[str, Any]:
    """Seconds per image: the generation core over ONNX Runtime, and diffusers, same GPU and settings."""
    from kandinsky_bench.baseline import DiffusersBaseline
    from kandinsky_core.generation import Generator
    from kandinsky_core.request import GenerationRequest
    from kandinsky_core.validation import check_request
    from kandinsky_export.calibration import PROMPT, BundleInfer, bundle_info

    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    info = bundle_info(manifest, size)
    generator = Generator(BundleInfer(bundle, providers, precision="default"), info)
    request = check_request(
        GenerationRequest(
            prompt=PROMPT,
            height=size,
            width=size,
            prior_num_inference_steps=prior_steps,
            num_inference_steps=decoder_steps,
            seed=0,
        ),
        info,
    )
    ours = median_seconds(lambda: generator.generate(request), warmup=1, repeats=repeats, progress=False)
    baseline = DiffusersBaseline(
        checkpoint,
        prompt=PROMPT,
        height=size,
        width=size,
        prior_num_inference_steps=prior_steps,
        num_inference_steps=decoder_steps,
        guidance_scale=4.0,
        device=device,
        dtype="float16" if device == "cuda" else "float32",
    )
    theirs = median_seconds(lambda: baseline.generate(0), warmup=1, repeats=repeats, progress=False)
    return {
        "size": size,
        "prior_steps": prior_steps,
        "decoder_steps": decoder_steps,
        "ours_s": ours,
        "diffusers_s": theirs,
        "speedup": theirs / ours,
        "ours": "generation core + ONNX Runtime "
        + ("CUDA" if device == "cuda" else "CPU")
        + ", served precision",
        "diffusers": "diffusers " + ("FP16" if device == "cuda" else "FP32") + f" on {device}",
    }


def served(
    bundle: Path, out: Path, *, flavour: str, size: int, prior_steps: int, decoder_steps: int, repeats: int
) -> dict[str, Any]:
    """Both loops through a Triton serving `flavour` (a GPU flavour in the NGC image; `cpu` checks the
    plumbing): seconds per image at concurrency 1, and how far the server loop's image is from the
    client loop's (the server loop fetches every network output over BLS, GPU memory included)."""
    from kandinsky_client.pipeline import KandinskyClient
    from kandinsky_export.calibration import PROMPT
    from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository
    from kandinsky_repository.serving.triton import TritonServer, free_port

    repository = out / f"repository-{flavour}"
    generate_repository(bundle, repository, RepositoryOptions(flavour=flavour))
    request = {
        "prompt": PROMPT,
        "height": size,
        "width": size,
        "prior_num_inference_steps": prior_steps,
        "num_inference_steps": decoder_steps,
        "seed": 0,
        "output_type": "np",
    }
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    seconds, images = {}, {}
    with TritonServer(repository, log_file=out / f"triton-{flavour}.log", **ports) as server:
        for loop in ("client", "server"):
            with KandinskyClient(server.grpc_url, loop=loop) as client:
                images[loop] = np.asarray(client.text_to_image(**request).images)
                seconds[loop] = median_seconds(
                    lambda c=client: c.text_to_image(**request), warmup=0, repeats=repeats, progress=False
                )
    return {
        "flavour": flavour,
        "size": size,
        "prior_steps": prior_steps,
        "decoder_steps": decoder_steps,
        "client_loop_s": seconds["client"],
        "server_loop_s": seconds["server"],
        "loops_max_abs_difference": float(np.abs(images["server"] - images["client"]).max()),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['gpu']}",
        "",
        f"{result['when']}, {result['preset']} preset, {result['size']}x{result['size']}, "
        f"onnxruntime {result['versions']['onnxruntime']}, torch {result['versions']['torch']}",
        "",
        "| component | check | max abs | max rel | kept in FP32 | served |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['component']} | {r['check']} | {r['max_abs']:.1e} | {r['max_rel']:.1e} | {r['kept_fp32']} | "
        f"{r['default_precision']} |"
        for r in result["fp16"]
    ]
    lines += [
        "",
        "| component (text-to-image batch) | served | ONNX Runtime | PyTorch eager | speed-up | served vs FP32 |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['component']} (batch {r['batch']}) | {r['precision']} | {r['ort_ms']:.1f} ms | {r['torch_ms']:.1f} ms | "
        f"{r['speedup']:.2f}x | {r['served_vs_fp32_rel_error']:.1e} |"
        for r in result["components"]
    ]
    e2e = result["end_to_end"]
    lines += [
        "",
        f"| end to end ({e2e['prior_steps']} prior + {e2e['decoder_steps']} decoder steps) | seconds per image |",
        "|---|---|",
        f"| {e2e['ours']} | {e2e['ours_s']:.3f} |",
        f"| {e2e['diffusers']} | {e2e['diffusers_s']:.3f} |",
        f"| speed-up | {e2e['speedup']:.2f}x |",
    ]
    serve = result.get("served")
    if serve:
        lines += [
            "",
            f"| served, {serve['flavour']} flavour ({serve['prior_steps']} + {serve['decoder_steps']} steps, "
            f"{serve['size']} px) | seconds per image |",
            "|---|---|",
            f"| client loop | {serve['client_loop_s']:.3f} |",
            f"| server loop | {serve['server_loop_s']:.3f} |",
            f"| largest difference between the loops' images (0..1) | {serve['loops_max_abs_difference']:.1e} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--prior-steps", type=int, default=25)
    parser.add_argument("--decoder-steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--e2e-repeats", type=int, default=3)
    parser.add_argument(
        "--serve-flavour",
        choices=("none", "cpu", "onnxruntime", "tensorrt"),
        default="none",
        help="also serve the bundle with this repository flavour and run both loops through Triton "
        "(gpu-check.sh picks tensorrt or onnxruntime inside the NGC image)",
    )
    args = parser.parse_args(argv)

    import onnxruntime
    import torch
    from kandinsky_export.calibration import record_run

    if args.device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        print(
            "gpu_check: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)", file=sys.stderr
        )
        return 2
    providers = ["CUDAExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    run = record_run(args.bundle, (args.size, args.size), providers=providers)
    result = {
        "gpu": _gpu_name(args.device),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset": args.preset,
        "size": args.size,
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "fp16": fp16_errors(args.bundle),
        "components": component_latency(
            args.checkpoint, args.bundle, run, device=args.device, warmup=args.warmup, repeats=args.repeats
        ),
        "end_to_end": end_to_end(
            args.checkpoint,
            args.bundle,
            device=args.device,
            size=args.size,
            prior_steps=args.prior_steps,
            decoder_steps=args.decoder_steps,
            repeats=args.e2e_repeats,
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.serve_flavour != "none":
        result["served"] = served(
            args.bundle,
            args.out,
            flavour=args.serve_flavour,
            size=args.size,
            prior_steps=args.prior_steps,
            decoder_steps=args.decoder_steps,
            repeats=args.e2e_repeats,
        )
    (args.out / "gpu-check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu-check.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
