"""`kandinsky-client`: generate images from a running Kandinsky 2.2 Triton server.

    kandinsky-client generate "a photo of a cat" --output cat.png
    kandinsky-client generate "a castle" --negative-prompt "blurry" --height 768 --width 768 \\
        --seed 42 --url localhost:8000 --protocol http --output castle.png

Argument parsing only: the work is done by `KandinskyClient`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from .errors import KandinskyClientError
from .pipeline import Generation, KandinskyClient
from .transport import PROTOCOLS

logger = logging.getLogger("kandinsky_client")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="server address (default: localhost:8001 for grpc, :8000 for http)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", "-o", type=Path, required=True, help="PNG path (several images: _0, _1, ...)"
    )
    parser.add_argument("--seed", type=int, help="random seed (numpy); omit for a random one")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--decoder-steps", type=int, default=50)
    parser.add_argument("--decoder-guidance", type=float, default=4.0)


def add_prior_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--negative-prompt", help="what the image should not show")
    parser.add_argument("--prior-steps", type=int, default=25)
    parser.add_argument("--prior-guidance", type=float, default=4.0)


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix or '.png'}") for i in range(count)]


def save_images(generation: Generation, output: Path) -> list[Path]:
    paths = output_paths(output, len(generation.images))
    for image, path in zip(generation.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return paths


def run_with_progress(
    total_steps: int, enabled: bool, work: Callable[[Callable[[], None]], Generation]
) -> Generation:
    with tqdm(total=total_steps, desc="denoising", unit="step", disable=not enabled) as bar:
        return work(lambda: bar.update(1))


def generate(args: argparse.Namespace) -> Generation:
    with KandinskyClient(args.url, protocol=args.protocol, timeout_s=args.timeout) as client:
        return run_with_progress(
            args.prior_steps + args.decoder_steps,
            not args.no_progress,
            lambda on_step: client.text_to_image(
                args.prompt,
                negative_prompt=args.negative_prompt,
                num_images_per_prompt=args.num_images,
                height=args.height,
                width=args.width,
                prior_steps=args.prior_steps,
                prior_guidance_scale=args.prior_guidance,
                decoder_steps=args.decoder_steps,
                decoder_guidance_scale=args.decoder_guidance,
                seed=args.seed,
                on_step=on_step,
            ),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kandinsky-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    text = sub.add_parser("generate", help="text-to-image")
    text.add_argument("prompt", help="what the image should show")
    add_prior_arguments(text)
    add_decoder_arguments(text)
    add_output_arguments(text)
    add_connection_arguments(text)
    text.set_defaults(handler=generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        generation = args.handler(args)
    except KandinskyClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in save_images(generation, args.output):
        print(f"wrote {path}")
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in generation.timings.items())
    logger.info("timings: %s", timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
