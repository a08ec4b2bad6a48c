"""`kandinsky-export`: checkpoints -> ONNX bundle -> FP16 variants -> TensorRT engines.

    kandinsky-export checkpoint --preset tiny --output artifacts/tiny/checkpoint
    kandinsky-export onnx --checkpoint artifacts/tiny/checkpoint --output artifacts/tiny/onnx
    kandinsky-export onnx --prior kandinsky-community/kandinsky-2-2-prior \\
        --decoder kandinsky-community/kandinsky-2-2-decoder --output artifacts/released/onnx \\
        [--prior-revision COMMIT --decoder-revision COMMIT]   # pinned hub revisions (recorded in the manifest)
    kandinsky-export fp16 --bundle artifacts/released/onnx
    kandinsky-export engines --bundle artifacts/released/onnx            # needs TensorRT and a GPU
    kandinsky-export engines --bundle artifacts/released/onnx --static 768x768
    kandinsky-export engines --bundle artifacts/released/onnx --opt-sizes 768   # one profile (less memory)
    kandinsky-export profile --max-size 640                               # check sizes, print the profile
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from kandinsky_core.bundle import TIMING_CACHE
from kandinsky_core.components import MAX_IMAGE_SIZE
from kandinsky_core.profiles import PROFILE_OPT_SIZES, PROFILE_SIZE_STEP, ProfileSettings

from .checkpoint import Checkpoint
from .fp16 import FP16_TOLERANCE, FUSION_SETS
from .inpaint_movq import ALLOW_MISMATCH_FLAG
from .presets import PRESETS, write_preset_checkpoint
from .released_layout import CURRENT, LAYOUTS
from .tensorrt_engine import PRECISIONS

# Checkpoint parts that may come from the hub, each with its --<part>-revision flag.
REVISION_PARTS = ("prior", "decoder", "decoder_inpaint", "controlnet")


def _checkpoint_from_args(args: argparse.Namespace) -> Checkpoint:
    if args.checkpoint:
        if any(getattr(args, f"{part}_revision", None) for part in REVISION_PARTS):
            raise SystemExit("--*-revision pins hub ids: give --prior/--decoder hub ids, not --checkpoint")
        return Checkpoint.from_root(args.checkpoint)
    if not (args.prior and args.decoder):
        raise SystemExit("give --checkpoint ROOT, or --prior and --decoder (folders or hub ids)")
    return Checkpoint(
        args.prior,
        args.decoder,
        args.decoder_inpaint,
        controlnet=args.controlnet,
        revisions=_revisions_from_args(args),
    )


def _revisions_from_args(args: argparse.Namespace) -> dict[str, str]:
    """--<part>-revision values of the parts given as hub ids (a revision of a local folder is refused)."""
    revisions = {}
    for part in REVISION_PARTS:
        revision = getattr(args, f"{part}_revision", None)
        if not revision:
            continue
        source = getattr(args, part, None)
        if not source:
            raise SystemExit(f"--{part.replace('_', '-')}-revision given without --{part.replace('_', '-')}")
        if Path(source).is_dir():
            raise SystemExit(
                f"--{part.replace('_', '-')}-revision {revision}: {source} is a local folder, which has no "
                "revisions (check out the revision there instead)"
            )
        revisions[part] = revision
    return revisions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ckpt = sub.add_parser("checkpoint", help="write a random-weight preset as a diffusers checkpoint")
    ckpt.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ckpt.add_argument("--output", type=Path, required=True)
    ckpt.add_argument("--seed", type=int, default=0)
    ckpt.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=CURRENT,
        help="current: as transformers/diffusers save today; released: the files and configs of the released "
        "uploads (slow tokenizer files, fp16 image encoder, legacy configs, .bin next to .safetensors)",
    )

    onnx = sub.add_parser("onnx", help="export every component to ONNX and check it against PyTorch")
    onnx.add_argument(
        "--checkpoint", type=Path, help="root with prior/, decoder/[, decoder_inpaint/, controlnet/]"
    )
    onnx.add_argument("--prior", help="prior folder or hub id")
    onnx.add_argument("--decoder", help="decoder folder or hub id")
    onnx.add_argument("--decoder-inpaint", help="inpainting decoder folder or hub id (optional)")
    onnx.add_argument(
        "--controlnet", help="ControlNet-depth decoder folder or hub id (optional; controlnet modes)"
    )
    for part in REVISION_PARTS:
        flag = part.replace("_", "-")
        onnx.add_argument(
            f"--{flag}-revision",
            metavar="REVISION",
            help=f"hub revision of --{flag} (a commit id pins it; default: the repository's default branch)",
        )
    onnx.add_argument("--components", nargs="*", help="subset of components (default: all present)")
    onnx.add_argument(
        ALLOW_MISMATCH_FLAG,
        action="store_true",
        help="serve inpainting with the decoder's MoVQ even where the inpainting repo's own MoVQ differs "
        "(default: export the inpainting repo's MoVQ as components of its own; see inpaint_movq.py)",
    )
    onnx.add_argument("--output", type=Path, required=True)

    half = sub.add_parser(
        "fp16", help="optimise and convert the bundle's components to FP16, measure the error"
    )
    half.add_argument(
        "--bundle", type=Path, required=True, help="export bundle (kandinsky-export onnx output)"
    )
    half.add_argument("--components", nargs="*", help="subset of components (default: all in the bundle)")
    half.add_argument(
        "--fusions",
        choices=FUSION_SETS,
        default="portable",
        help="portable: standard ONNX ops only (TensorRT, any provider; variants.fp16); cuda: ONNX Runtime "
        "CUDA-only fusions, written next to the portable variant (variants.fp16_cuda; needs onnxruntime-gpu)",
    )
    half.add_argument(
        "--keep-fp32",
        nargs="*",
        metavar="OP",
        help="operator types kept in FP32 (default: measured, from none up to normalisations and reductions)",
    )
    half.add_argument(
        "--providers",
        nargs="+",
        help="ONNX Runtime providers the FP16 graph is checked on (default: CPUExecutionProvider for "
        "portable, CUDAExecutionProvider for cuda fusions)",
    )
    half.add_argument(
        "--check-size",
        type=_size,
        help="HEIGHTxWIDTH of the check's real run (default: the engines' optimum for --max-size)",
    )
    half.add_argument(
        "--max-size",
        type=int,
        default=MAX_IMAGE_SIZE,
        help="largest image side served: normalisation statistics are judged at this size",
    )
    half.add_argument("--tolerance", type=float, default=FP16_TOLERANCE, help="max error / output scale")
    half.add_argument("--force", action="store_true", help="convert even if the variant is current")
    half.add_argument("--strict", action="store_true", help="exit 1 when a component falls back to FP32")

    eng = sub.add_parser("engines", help="build TensorRT engines from the bundle (needs tensorrt and a GPU)")
    eng.add_argument("--bundle", type=Path, required=True)
    eng.add_argument("--components", nargs="*", help="subset of components (default: all in the bundle)")
    eng.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="default",
        help="default: the bundle's measured choice per component; fp16: the FP16 ONNX, strongly typed; "
        "fp32: FP32 ONNX (TF32); mixed: FP32 ONNX with TensorRT's FP16 flag",
    )
    _profile_arguments(eng)
    eng.add_argument("--timing-cache", type=Path, help=f"default: <bundle>/{TIMING_CACHE}")
    eng.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level (0-5)")
    eng.add_argument("--workspace-gib", type=float, help="TensorRT workspace limit (default: TensorRT's)")
    eng.add_argument("--force", action="store_true", help="rebuild even when the sidecar matches")
    eng.add_argument(
        "--dry-run", action="store_true", help="print profiles and rebuild decisions; build nothing"
    )

    prof = sub.add_parser(
        "profile", help="check image-size settings and print the engine profile they make (no bundle needed)"
    )
    _profile_arguments(prof)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # No process-wide warning filters: the exporter silences the tracer's warnings where it traces.

    if args.command == "checkpoint":
        write_preset_checkpoint(PRESETS[args.preset], args.output, seed=args.seed, layout=args.layout)
        print(f"wrote preset '{args.preset}' to {args.output}")
    elif args.command == "onnx":
        from .onnx_export import export_bundle

        reports = export_bundle(
            _checkpoint_from_args(args),
            args.output,
            args.components,
            allow_inpaint_movq_mismatch=args.allow_inpaint_movq_mismatch,
        )
        print("\n".join(r.line() for r in reports))
        print(f"wrote ONNX bundle to {args.output}")
    elif args.command == "fp16":
        return _fp16(args)
    elif args.command == "engines":
        return _engines(args)
    elif args.command == "profile":
        try:
            settings = _profile_settings(args)
            settings.validate()
        except ValueError as error:
            print(f"kandinsky-export profile: {error}", file=sys.stderr)
            return 2
        print(json.dumps(settings.as_dict()))
    return 0


def _profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-size", type=int, default=MAX_IMAGE_SIZE, help="largest image side (px)")
    parser.add_argument(
        "--min-size", type=int, help="smallest image side (px; default: 512, or --max-size when smaller)"
    )
    parser.add_argument(
        "--opt-sizes",
        "--opt-size",
        dest="opt_sizes",
        type=int,
        nargs="+",
        metavar="SIDE",
        help="image sides the engines are tuned for, one TensorRT profile each (px; default: "
        f"{' '.join(str(s) for s in PROFILE_OPT_SIZES)}, clipped to [--min-size, --max-size]); "
        "one value: one profile",
    )
    parser.add_argument("--size-step", type=int, default=PROFILE_SIZE_STEP, help="image side step (px)")
    parser.add_argument("--static", type=_size, help="HEIGHTxWIDTH: engines for this one size")


def _profile_settings(args: argparse.Namespace) -> ProfileSettings:
    return ProfileSettings.for_max_size(
        args.max_size,
        min_size=args.min_size,
        opt_sizes=args.opt_sizes,
        size_step=args.size_step,
        static_size=args.static,
    )


def _size(text: str) -> tuple[int, int]:
    """ "768x768" -> (768, 768): height x width in pixels."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, got '{text}'") from error
    return height, width


def _fp16(args: argparse.Namespace) -> int:
    from .fp16 import ProviderUnavailable, convert_bundle

    try:
        results = convert_bundle(
            args.bundle,
            args.components,
            fusion_set=args.fusions,
            op_block_list=args.keep_fp32,
            providers=args.providers,
            check_size=args.check_size,
            max_size=args.max_size,
            tolerance=args.tolerance,
            force=args.force,
        )
    except ProviderUnavailable as error:
        print(f"kandinsky-export fp16: {error}", file=sys.stderr)
        return 2
    for result in results:
        print("\n".join(result.lines()))
    fallback = [r.component for r in results if r.default_precision != "fp16"]
    if fallback:
        served = "FP32" if args.fusions == "portable" else "the portable FP16 variant (or FP32)"
        print(f"FP16 failed its check for {', '.join(fallback)}: the GPU flavours serve {served} for them")
    print(f"FP16 variants recorded in {args.bundle}/manifest.json ({len(results)} converted)")
    return 1 if fallback and args.strict else 0


def _engines(args: argparse.Namespace) -> int:
    from .tensorrt_engine import BuildOptions, EngineCheckError, build_engines, plan_engines

    try:
        settings = _profile_settings(args)
        settings.validate()
    except ValueError as error:
        print(f"kandinsky-export engines: {error}", file=sys.stderr)
        return 2
    options = BuildOptions(
        builder_optimization_level=args.opt_level,
        workspace_gib=args.workspace_gib,
        timing_cache=args.timing_cache,
    )
    if args.dry_run:
        from .tensorrt_engine import gpu_identity, tensorrt_version

        try:
            version = tensorrt_version()
        except RuntimeError:
            version = "not installed"
        try:
            gpu = gpu_identity()
        except RuntimeError:
            gpu = {"name": "none", "compute_capability": "none"}
        try:
            plans = plan_engines(
                args.bundle,
                args.components,
                settings=settings,
                precision=args.precision,
                trt_version=version,
                gpu=gpu,
                options=options,
            )
        except (RuntimeError, ValueError, FileNotFoundError) as error:
            print(f"kandinsky-export engines: {error}", file=sys.stderr)
            return 2
        for component, expected, reason in plans:
            source = expected["source"]
            print(f"{component}: {source['precision']} from {source['path']}; {reason or 'up to date'}")
            for index, profile in enumerate(expected["profile"]["profiles"]):
                optimum = "x".join(str(s) for s in profile["optimum"]) if profile["optimum"] else "any size"
                print(f"  profile {index} (tuned for {optimum}):")
                for name, shapes in profile["inputs"].items():
                    print(f"    {name:>22s}: min {shapes['min']} opt {shapes['opt']} max {shapes['max']}")
        return 0
    try:
        results = build_engines(
            args.bundle,
            args.components,
            settings=settings,
            precision=args.precision,
            options=options,
            force=args.force,
        )
    except EngineCheckError as error:  # built and recorded, but not to be served
        print("\n".join(r.line() for r in error.results), file=sys.stderr)
        print(f"kandinsky-export engines: {error}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError, FileNotFoundError) as error:  # no TensorRT/GPU, bad sizes, no bundle
        print(f"kandinsky-export engines: {error}", file=sys.stderr)
        return 2
    print("\n".join(r.line() for r in results))
    return 0
