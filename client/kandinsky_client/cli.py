"""`kandinsky-client`: generate images from a running Kandinsky 2.2 Triton server.

    kandinsky-client generate "a photo of a cat" --output cat.png
    kandinsky-client generate "a castle" --negative-prompt "blurry" --height 768 --width 768 \\
        --seed 42 --url localhost:8000 --protocol http --output castle.png
    kandinsky-client variations photo.png --num-images 2 --output variation.png
    kandinsky-client fuse "a snowy forest" @photo.png --weights 0.3 0.7 --output fused.png
    kandinsky-client img2img photo.png "a watercolor painting" --strength 0.5 --output painted.png
    kandinsky-client emb2emb photo.png "a watercolor painting" --strength 0.5 --output embedded.png
    kandinsky-client inpaint photo.png mask.png "a red hat" --output hat.png
    kandinsky-client outpaint photo.png "a wide beach" --left 128 --right 128 --output wide.png

Input images may be any format Pillow reads; they are converted to RGB (transparency onto white).
Masks: white = repaint, black = keep, the image's size. In `fuse`, an item starting with "@" is an
image file, any other item a prompt.

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
from .pipeline import Generation, KandinskyClient, strength_steps
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


def add_decoder_arguments(parser: argparse.ArgumentParser, size_from_image: bool = False) -> None:
    if size_from_image:
        parser.add_argument("--height", type=int, help="output height (default: the input image's)")
        parser.add_argument("--width", type=int, help="output width (default: the input image's)")
    else:
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


def _client(args: argparse.Namespace) -> KandinskyClient:
    return KandinskyClient(args.url, protocol=args.protocol, timeout_s=args.timeout)


def _common(args: argparse.Namespace, on_step: Callable[[], None]) -> dict:
    """The decoder, seed and progress keywords every image mode takes."""
    return {
        "height": args.height,
        "width": args.width,
        "decoder_steps": args.decoder_steps,
        "decoder_guidance_scale": args.decoder_guidance,
        "seed": args.seed,
        "on_step": on_step,
    }


def _prompted(args: argparse.Namespace, on_step: Callable[[], None]) -> dict:
    """`_common` plus the prompt-side keywords of the modes that run the prior on a prompt."""
    return {
        **_common(args, on_step),
        "negative_prompt": args.negative_prompt,
        "num_images_per_prompt": args.num_images,
        "prior_steps": args.prior_steps,
        "prior_guidance_scale": args.prior_guidance,
    }


def variations(args: argparse.Namespace) -> Generation:
    with _client(args) as client:
        return run_with_progress(
            args.decoder_steps,
            not args.no_progress,
            lambda on_step: client.variations(
                args.image, num_images=args.num_images, **_common(args, on_step)
            ),
        )


def fusion_item(item: str) -> str | Path:
    """An item "@file" is an image file; anything else is a prompt."""
    return Path(item[1:]) if item.startswith("@") else item


def fuse(args: argparse.Namespace) -> Generation:
    items = [fusion_item(item) for item in args.items]
    prior_runs = sum(isinstance(item, str) for item in items)
    prior_runs += bool(args.negative_prompt or args.negative_prior_prompt)
    with _client(args) as client:
        return run_with_progress(
            args.prior_steps * prior_runs + args.decoder_steps,
            not args.no_progress,
            lambda on_step: client.fuse(
                items,
                args.weights,
                negative_prior_prompt=args.negative_prior_prompt,
                **{**_prompted(args, on_step), "negative_prompt": args.negative_prompt or ""},
            ),
        )


def img2img(args: argparse.Namespace) -> Generation:
    with _client(args) as client:
        return run_with_progress(
            args.prior_steps + strength_steps(args.decoder_steps, args.strength),
            not args.no_progress,
            lambda on_step: client.image_to_image(
                args.image, args.prompt, strength=args.strength, **_prompted(args, on_step)
            ),
        )


def emb2emb(args: argparse.Namespace) -> Generation:
    with _client(args) as client:
        return run_with_progress(
            strength_steps(args.prior_steps, args.strength) + args.decoder_steps,
            not args.no_progress,
            lambda on_step: client.emb2emb(
                args.image, args.prompt, strength=args.strength, **_prompted(args, on_step)
            ),
        )


def inpaint(args: argparse.Namespace) -> Generation:
    with _client(args) as client:
        return run_with_progress(
            args.prior_steps + args.decoder_steps,
            not args.no_progress,
            lambda on_step: client.inpaint(args.image, args.mask, args.prompt, **_prompted(args, on_step)),
        )


def outpaint(args: argparse.Namespace) -> Generation:
    margins = {"left": args.left, "top": args.top, "right": args.right, "bottom": args.bottom}
    with _client(args) as client:
        return run_with_progress(
            args.prior_steps + args.decoder_steps,
            not args.no_progress,
            lambda on_step: client.outpaint(args.image, args.prompt, **margins, **_prompted(args, on_step)),
        )


def _mode_parser(
    sub: argparse._SubParsersAction,
    name: str,
    help_text: str,
    handler: Callable[[argparse.Namespace], Generation],
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


def _finish(parser: argparse.ArgumentParser, *, prior: bool = True, size_from_image: bool = False) -> None:
    """The options shared by the modes, after each mode's own positional arguments."""
    if prior:
        add_prior_arguments(parser)
    add_decoder_arguments(parser, size_from_image)
    add_output_arguments(parser)
    add_connection_arguments(parser)


def _strength(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--strength", type=float, default=0.3, help=f"part of the {what} schedule to run, in (0, 1]"
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

    mode = _mode_parser(sub, "variations", "images like the input image (its CLIP embedding)", variations)
    mode.add_argument("image", help="input image file")
    _finish(mode, prior=False)

    mode = _mode_parser(sub, "fuse", "a weighted mix of prompts and images (@file)", fuse)
    mode.add_argument("items", nargs="+", help='prompts, and image files written "@path"')
    mode.add_argument("--weights", type=float, nargs="+", required=True, help="one weight >= 0 per item")
    mode.add_argument("--negative-prior-prompt", help="negative prompt of the prior runs")
    _finish(mode)

    mode = _mode_parser(sub, "img2img", "redraw an image following a prompt (decoder side)", img2img)
    mode.add_argument("image", help="input image file")
    mode.add_argument("prompt", help="what the image should show")
    _strength(mode, "decoder")
    _finish(mode, size_from_image=True)

    mode = _mode_parser(sub, "emb2emb", "move an image's embedding towards a prompt (prior side)", emb2emb)
    mode.add_argument("image", help="input image file")
    mode.add_argument("prompt", help="what the image should show")
    _strength(mode, "prior")
    _finish(mode)

    mode = _mode_parser(sub, "inpaint", "repaint the white part of a mask following a prompt", inpaint)
    mode.add_argument("image", help="input image file")
    mode.add_argument("mask", help="mask file of the image's size: white = repaint, black = keep")
    mode.add_argument("prompt", help="what the repainted part should show")
    _finish(mode, size_from_image=True)

    mode = _mode_parser(sub, "outpaint", "extend an image on any side following a prompt", outpaint)
    mode.add_argument("image", help="input image file")
    mode.add_argument("prompt", help="what the new area should show")
    for side in ("left", "top", "right", "bottom"):
        mode.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    _finish(mode, size_from_image=True)
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
