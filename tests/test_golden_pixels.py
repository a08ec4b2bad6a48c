"""Golden pixels: every mode of the tiny preset, on both loops, gives the pixels recorded in
`tests/golden/mode_pixels.json` (a restructuring of the code must not move a single pixel).

Each record holds the sha256 of the uint8 pixels and an 8x8 thumbnail (block means) per image. The same
machine kind reproduces the hash exactly; a machine whose ONNX Runtime kernels round differently (another
CPU instruction set) may differ in single pixels by one level, so a different hash passes only when every
thumbnail value is within one level and the batch shape is the same: any change to a mode's arithmetic
moves the thumbnails of these noise-like images by far more.

`KANDINSKY_UPDATE_GOLDEN=1 pytest tests/test_golden_pixels.py` rewrites the file (only on purpose, with the
reason in the commit message).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from kandinsky_core.request import GenerationRequest

from .test_server_generation import MODE_CASES

GOLDEN = Path(__file__).with_name("golden") / "mode_pixels.json"
UPDATE = os.environ.get("KANDINSKY_UPDATE_GOLDEN") == "1"
THUMBNAIL = 8


def _record(generation) -> dict:
    pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in generation.images])
    batch, height, width, channels = pixels.shape
    blocks = pixels.reshape(batch, THUMBNAIL, height // THUMBNAIL, THUMBNAIL, width // THUMBNAIL, channels)
    thumbnail = np.rint(blocks.mean(axis=(2, 4))).astype(int)
    return {
        "shape": list(pixels.shape),
        "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
        "thumbnail": thumbnail.tolist(),
    }


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


@pytest.fixture(scope="module")
def recorded(golden: dict):
    """Cases run in this session; written back at the end when updating."""
    found: dict = {}
    yield found
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        records = {**golden, **found}
        lines = [f"{json.dumps(key)}: {json.dumps(records[key])}" for key in sorted(records)]
        GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one record per line


CASES = {case.id: case.values for case in MODE_CASES}


@pytest.mark.parametrize("loop", ["client", "server"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_gives_its_recorded_pixels(
    grpc_client, server_loop_clients, golden: dict, recorded: dict, loop: str, case: str
) -> None:
    mode, options = CASES[case]
    client = grpc_client if loop == "client" else server_loop_clients["grpc"]
    generation = client.generate(GenerationRequest.build(mode, seed=4321, **options))
    key = f"{case}/{loop}"
    found = recorded[key] = _record(generation)
    if UPDATE:
        return
    assert key in golden, f"no golden record for {key}: run with KANDINSKY_UPDATE_GOLDEN=1"
    expected = golden[key]
    assert found["shape"] == expected["shape"]
    if found["sha256"] != expected["sha256"]:
        difference = np.abs(np.array(found["thumbnail"]) - np.array(expected["thumbnail"]))
        assert difference.max() <= 1, f"{key}: the pixels moved (thumbnail off by up to {difference.max()})"
