"""`kandinsky-export`: checkpoints -> ONNX bundle (-> TensorRT engines where TensorRT exists).

    kandinsky-export checkpoint --preset tiny --output artifacts/tiny/checkpoint
    kandinsky-export onnx --checkpoint artifacts/tiny/checkpoint --output artifacts/tiny/onnx
    kandinsky-export onnx --prior kandinsky-community/kandinsky-2-2-prior \\
        --decoder kandinsky-community/kandinsky-2-2-decoder --output artifacts/released/onnx
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

from .checkpoint import Checkpoint
from .presets import PRESETS, write_preset_checkpoint


def _checkpoint_from_args(args: argparse.Namespace) -> Checkpoint:
    if args.checkpoint:
        return Checkpoint.from_root(args.checkpoint)
    if not (args.prior and args.decoder):
        raise SystemExit("give --checkpoint ROOT, or --prior and --decoder (folders or hub ids)")
    return Checkpoint(args.prior, args.decoder, args.decoder_inpaint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ckpt = sub.add_parser("checkpoint", help="write a random-weight preset as a diffusers checkpoint")
    ckpt.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ckpt.add_argument("--output", type=Path, required=True)
    ckpt.add_argument("--seed", type=int, default=0)

    onnx = sub.add_parser("onnx", help="export every component to ONNX and check it against PyTorch")
    onnx.add_argument("--checkpoint", type=Path, help="root with prior/, decoder/[, decoder_inpaint/]")
    onnx.add_argument("--prior", help="prior folder or hub id")
    onnx.add_argument("--decoder", help="decoder folder or hub id")
    onnx.add_argument("--decoder-inpaint", help="inpainting decoder folder or hub id (optional)")
    onnx.add_argument("--components", nargs="*", help="subset of components (default: all present)")
    onnx.add_argument("--output", type=Path, required=True)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", module=r"torch\..*")
    warnings.filterwarnings("ignore", category=UserWarning)

    if args.command == "checkpoint":
        write_preset_checkpoint(PRESETS[args.preset], args.output, seed=args.seed)
        print(f"wrote preset '{args.preset}' to {args.output}")
    elif args.command == "onnx":
        from .onnx_export import export_bundle

        reports = export_bundle(_checkpoint_from_args(args), args.output, args.components)
        print("\n".join(r.line() for r in reports))
        print(f"wrote ONNX bundle to {args.output}")
    return 0
