"""`kandinsky-client generate` writes PNGs from the running server; bad input exits 2 with the reason."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image


def _client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kandinsky_client.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_writes_png_files(triton_server, tmp_path):
    output = tmp_path / "out" / "cat.png"
    args = ["generate", "a photo of a cat", "--output", str(output), "--url", triton_server.grpc_url]
    args += [
        "--height",
        "64",
        "--width",
        "128",
        "--prior-num-inference-steps",
        "2",
        "--num-inference-steps",
        "3",
        "--seed",
        "7",
    ]
    args += ["--num-images-per-prompt", "2", "--no-progress"]
    result = _client(*args)
    assert result.returncode == 0, result.stderr
    paths = [tmp_path / "out" / "cat_0.png", tmp_path / "out" / "cat_1.png"]
    images = [np.asarray(Image.open(p)) for p in paths]
    assert all(image.shape == (64, 128, 3) and image.dtype == np.uint8 for image in images)
    assert not np.array_equal(images[0], images[1]), "two images of one prompt draw different noise"

    again = _client(*[a if a != str(output) else str(tmp_path / "again.png") for a in args])
    assert again.returncode == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again_0.png")), images[0])  # same seed


def test_generate_over_http(triton_server, tmp_path):
    output = tmp_path / "http.png"
    result = _client(
        "generate",
        "an owl",
        "--output",
        str(output),
        "--url",
        triton_server.http_url,
        "--protocol",
        "http",
        "--height",
        "64",
        "--width",
        "64",
        "--prior-num-inference-steps",
        "2",
        "--num-inference-steps",
        "2",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(output).size == (64, 64)


def test_generate_reports_bad_input(triton_server, tmp_path):
    result = _client(
        "generate",
        "x",
        "--output",
        str(tmp_path / "x.png"),
        "--url",
        triton_server.grpc_url,
        "--height",
        "100",
    )
    assert result.returncode == 2
    assert "height: is 100; it must be a multiple of 64" in result.stderr
    assert not (tmp_path / "x.png").exists()
