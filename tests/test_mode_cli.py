"""Every `kandinsky-client` mode subcommand reads image files, runs against the server and writes PNGs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from .reference import mask, picture

DECODER_FAST = ["--num-inference-steps", "2", "--seed", "5", "--no-progress"]
PRIOR_FAST = ["--prior-num-inference-steps", "2", *DECODER_FAST]
SMALL = ["--height", "64", "--width", "64"]  # these modes default to 512x512, not the input's size


def _client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kandinsky_client.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files as users have them: a JPEG photo, a palette PNG, a grayscale PNG mask."""
    folder = tmp_path_factory.mktemp("cli-inputs")
    picture(64, 64, seed=1).save(folder / "photo.jpg", quality=95)
    picture(48, 40, seed=2).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    mask(64, 64, (8, 16, 40, 56)).save(folder / "mask.png")
    picture(64, 128, seed=3).convert("L").save(folder / "depth.png")  # a ControlNet hint, 128x64
    return folder


MODES = [
    pytest.param(["variations", "{photo}", "--num-images-per-prompt", "2"], 2, (64, 64), id="variations"),
    pytest.param(["fuse", "a red fox", "@{palette}", "--weights", "0.4", "0.6"], 1, (64, 64), id="fuse"),
    pytest.param(
        ["img2img", "{photo}", "a watercolor", "--strength", "0.5", "--width", "128"],
        1,
        (128, 64),
        id="img2img",
    ),
    pytest.param(["emb2emb", "{palette}", "a snowy owl", "--strength", "0.5"], 1, (64, 64), id="emb2emb"),
    pytest.param(
        ["inpaint", "{photo}", "{mask}", "a red hat", "--num-images-per-prompt", "2"],
        2,
        (64, 64),
        id="inpaint",
    ),
    pytest.param(
        ["outpaint", "{palette}", "a beach", "--left", "24", "--top", "16"], 1, (64, 64), id="outpaint"
    ),
    pytest.param(["controlnet", "{depth}", "a robot"], 1, (128, 64), id="controlnet"),  # the hint's size
    pytest.param(
        ["controlnet-img2img", "{photo}", "{depth}", "a robot", "--strength", "0.5"],
        1,
        (128, 64),
        id="controlnet-img2img",
    ),
]


@pytest.mark.parametrize(("args", "count", "size"), MODES)
def test_mode_subcommand_writes_images(triton_server, files, tmp_path, args, count, size):
    sizes = SMALL if args[0] in ("variations", "fuse", "emb2emb") else []
    flags = DECODER_FAST if args[0] == "variations" else PRIOR_FAST
    paths = {name: files / f"{name}.png" for name in ("palette", "mask", "depth")}
    paths["photo"] = files / "photo.jpg"
    args = [a.format(**paths) for a in args]
    output = tmp_path / "result.png"
    result = _client(*args, *sizes, *flags, "--output", str(output), "--url", triton_server.grpc_url)
    assert result.returncode == 0, result.stderr
    written = [output] if count == 1 else [tmp_path / f"result_{i}.png" for i in range(count)]
    for path in written:
        image = Image.open(path)
        assert image.mode == "RGB" and image.size == size
        assert np.asarray(image).std() > 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fuse", "a", "@{photo}", "--weights", "1"], "weights: has 1 entries for 2 images_and_prompts"),
        (["fuse", "a", "@{missing}", "--weights", "1", "1"], "images_and_prompts[1]: no such image file"),
        (["img2img", "{photo}", "x", "--strength", "1.5"], "strength: is 1.5; valid values are (0, 1]"),
        (
            ["inpaint", "{photo}", "{palette}", "x"],
            "mask_image: is 40x48 pixels; it must have the image's size 64x64",
        ),
        (
            ["outpaint", "{photo}", "x", "--right", "2000"],
            "left, right: image width 64 + left 0 + right 2000",
        ),
        (["variations", "{empty}"], "empty.png' is empty (0 bytes)"),
        (
            ["controlnet", "{photo}", "x", "--width", "128"],
            "hint: is 64x64 pixels (width x height); it must have the output's size 128x64",
        ),
    ],
)
def test_mode_subcommand_reports_bad_input(triton_server, files, tmp_path, args, message):
    (tmp_path / "empty.png").write_bytes(b"")
    paths = {
        "photo": files / "photo.jpg",
        "palette": files / "palette.png",
        "missing": tmp_path / "missing.png",
        "empty": tmp_path / "empty.png",
    }
    output = tmp_path / "x.png"
    args = [a.format(**paths) for a in args]
    result = _client(*args, "--output", str(output), "--url", triton_server.grpc_url, "--no-progress")
    assert result.returncode == 2
    assert message in result.stderr
    assert not output.exists()
