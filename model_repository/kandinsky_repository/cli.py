"""`kandinsky-repository`: write a Triton model repository from an export bundle."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .generate import DEFAULT_MAX_IMAGE_SIZE, FLAVOURS, RepositoryOptions, generate_repository


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, required=True, help="export bundle (kandinsky-export output)")
    parser.add_argument("--output", type=Path, required=True, help="repository folder (replaced)")
    parser.add_argument("--flavour", choices=FLAVOURS, default="cpu")
    parser.add_argument("--max-image-size", type=int, default=DEFAULT_MAX_IMAGE_SIZE)
    parser.add_argument("--instances", type=int, default=1, help="instances per network model")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="cpu flavour: ONNX Runtime threads")
    parser.add_argument("--max-queue-delay-us", type=int, default=0, help="dynamic batching window")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = RepositoryOptions(
        flavour=args.flavour,
        max_image_size=args.max_image_size,
        instances=args.instances,
        intra_op_threads=args.intra_op_threads,
        max_queue_delay_us=args.max_queue_delay_us,
    )
    models = generate_repository(args.bundle, args.output, options)
    print(f"wrote {len(models)} models to {args.output}: {', '.join(models)}")
    return 0
