"""`kandinsky-client`: generate images from a running Kandinsky 2.2 Triton server.

    kandinsky-client generate "a photo of a cat" --output cat.png
    kandinsky-client generate "a castle" --negative-prompt "blurry" --height 768 --width 768 \\
        --seed 42 --url localhost:8000 --protocol http --output castle.png
    kandinsky-client generate "a cat" --server-loop --output cat.png    # the loop runs in the server
    kandinsky-client variations photo.png --num-images-per-prompt 2 --output variation.png
    kandinsky-client fuse "a snowy forest" @photo.png --weights 0.3 0.7 --output fused.png
    kandinsky-client img2img photo.png "a watercolor painting" --strength 0.5 --output painted.png
    kandinsky-client emb2emb photo.png "a watercolor painting" --strength 0.5 --output embedded.png
    kandinsky-client inpaint photo.png mask.png "a red hat" --output hat.png
    kandinsky-client outpaint photo.png "a wide beach" --left 128 --right 128 --output wide.png
    kandinsky-client controlnet depth.png "a robot, 4k photo" --output robot.png
    kandinsky-client controlnet-img2img photo.png depth.png "a robot" --strength 0.5 --output robot.png

Options are the request fields with dashes (`--num-inference-steps` is `num_inference_steps`); their
defaults are the request's (see `kandinsky_core.request`). Input images may be any format Pillow reads;
they are converted to RGB (transparency onto white). Masks: white = repaint, black = keep, the image's
size. In `fuse`, an item starting with "@" is an image file, any other item a prompt. ControlNet hints:
a depth map (grayscale or RGB, bright = near) at the output size, which defaults to the hint's.

Argument parsing only: the work is done by `KandinskyClient`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kandinsky_core.errors import InvalidRequest, KandinskyClientError
from kandinsky_core.generation import Generation
from kandinsky_core.modes import MODES, Mode
from kandinsky_core.request import GenerationRequest, field_specs, mode_fields, required_fields
from tqdm.auto import tqdm

from .pipeline import LOOPS, KandinskyClient
from .transport import DEFAULT_TIMEOUT_S, PROTOCOLS, check_timeout

logger = logging.getLogger("kandinsky_client")

# The subcommands are the modes' (`kandinsky_core.modes`: name, positional fields, help).
# Help of a positional field where it differs from the field's own (a file rather than any image).
_POSITIONAL_HELP = {
    "prompt": "what the image should show",
    "image": "input image file",
    "mask_image": "mask file of the image's size: white = repaint, black = keep",
    "hint": "depth map file (grayscale or RGB, bright = near) at the output size",
    "images_and_prompts": 'prompts, and image files written "@path"',
}
_ARG_TYPES = {"int": int, "float": float, "string": str, "strings": str, "image": Path, "json": str}
_NOT_FLAGS = {"mode", "latents", "output_type"}  # the CLI writes PNG files from seeded noise


def add_request_arguments(parser: argparse.ArgumentParser, mode: Mode) -> None:
    """The mode's positional arguments, then one option per other request field the mode uses; unset
    options keep the request's defaults."""
    specs = field_specs()
    positional = mode.command.args
    required = required_fields(mode.name)
    for name in positional:
        nargs = "+" if name == "images_and_prompts" else None
        parser.add_argument(name, nargs=nargs, help=_POSITIONAL_HELP.get(name, specs[name].metadata["help"]))
    for name in mode_fields(mode.name):
        if name in positional or name in _NOT_FLAGS:
            continue
        spec = specs[name]
        wire = spec.metadata["wire"]
        default = "" if spec.default is None else f" (default: {spec.default})"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=float if wire == "floats" else _ARG_TYPES[wire],
            nargs="+" if wire == "floats" else None,
            required=name in required,
            default=argparse.SUPPRESS,
            help=spec.metadata["help"] + default,
        )


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="server address (default: localhost:8001 for grpc, :8000 for http)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds a request may take (> 0)"
    )
    parser.add_argument("--token", default=os.environ.get("KANDINSKY_TOKEN"), help="gateway bearer token")
    parser.add_argument(
        "--server-loop", action="store_true", help="run the denoising loops in the server (one request)"
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", "-o", type=Path, required=True, help="PNG path (several images: _0, _1, ...)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix or '.png'}") for i in range(count)]


def check_output(output: Path) -> None:
    """Refuse an output path that cannot be written, before any generation work is done."""
    if output.is_dir():
        raise InvalidRequest("--output", f"'{output}' is a directory; give a file name such as image.png")
    folder = output.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidRequest("--output", f"cannot write '{output}': '{existing}' is not a writable directory")


def save_images(generation: Generation, output: Path) -> list[Path]:
    paths = output_paths(output, len(generation.images))
    for image, path in zip(generation.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return paths


def command_mode(command: str) -> Mode:
    """The mode whose subcommand is `command`."""
    return next(mode for mode in MODES.values() if mode.command.name == command)


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    mode = command_mode(args.command).name
    options = {name: getattr(args, name) for name in mode_fields(mode) if hasattr(args, name)}
    if "images_and_prompts" in options:  # "@file" is an image file, anything else a prompt
        options["images_and_prompts"] = [
            Path(item[1:]) if item.startswith("@") else item for item in options["images_and_prompts"]
        ]
    return GenerationRequest.build(mode, **options)


def run(args: argparse.Namespace) -> Generation:
    check_output(args.output)
    check_timeout(args.timeout)
    request = request_from_args(args)
    loop = LOOPS[1] if args.server_loop else LOOPS[0]
    with KandinskyClient(
        args.url, protocol=args.protocol, timeout_s=args.timeout, loop=loop, token=args.token
    ) as client:
        plan = client.plan(request)  # checked once: its step count sizes the bar, then it runs
        with tqdm(total=plan.total_steps, desc="denoising", unit="step", disable=args.no_progress) as bar:

            def advance(stage: str, step: int, timestep: int, latents: Any) -> None:
                bar.set_postfix_str(stage, refresh=False)
                bar.update(1)

            return client.generate(plan, callback_on_step_end=advance)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kandinsky-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for mode in MODES.values():
        command = mode.command
        mode_parser = sub.add_parser(
            command.name, help=command.help, description=f"{command.help} (mode {mode.name})"
        )
        add_request_arguments(mode_parser, mode)
        add_output_arguments(mode_parser)
        add_connection_arguments(mode_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        generation = run(args)
    except KandinskyClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
    for path in save_images(generation, args.output):
        print(f"wrote {path}")
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in generation.timings.items())
    logger.info("seed %s; timings: %s", generation.seed, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
