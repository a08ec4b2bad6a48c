"""The export bundle: its layout, its manifest and the digests of its large files, in one place.

Every step reads and extends the same folder; each finds its files through the names below:

    <bundle>/manifest.json                       written by `kandinsky-export onnx` only when every
                                                 component passed its parity check (later steps add to it)
    <bundle>/export_failed.json                  instead, when the last export failed a check: what failed
    <bundle>/<component>/model.onnx              FP32 (+ model.onnx_data over 2 GB)
    <bundle>/<component>/fp16/model.onnx         `kandinsky-export fp16` (standard ONNX ops: TensorRT, any provider)
    <bundle>/<component>/fp16_cuda/model.onnx    `kandinsky-export fp16 --fusions cuda` (ONNX Runtime CUDA only)
    <bundle>/<component>/tensorrt/model.plan     `kandinsky-export engines` (+ engine.json, its sidecar)
    <bundle>/tensorrt_timing.cache               TensorRT's timing cache, shared by every build
    <bundle>/tokenizer/                          tokenizer.json + tokenizer_config.json, built by the export
                                                 from the checkpoint's tokenizer (tokenizer.py)
    <bundle>/image_processor/preprocessor_config.json   the checkpoint's CLIPImageProcessor config
    <bundle>/prior_postprocess/*.npy             clip_mean, clip_std, the zero-image embedding

Only the standard library is imported here: the repository generator and the python models read these
names in images without torch or onnx.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FAILED_EXPORT = "export_failed.json"
ONNX_FILE = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx_data"
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # protobuf's 2 GB limit, with room for the graph itself
FP16_DIR = "fp16"  # also the manifest's `variants` key of the portable FP16 variant
FP16_CUDA_DIR = "fp16_cuda"  # and of the one with ONNX Runtime's CUDA-only fusions
ENGINE_DIR = "tensorrt"
ENGINE_FILE = "model.plan"
ENGINE_METADATA = "engine.json"
TIMING_CACHE = "tensorrt_timing.cache"
TOKENIZER_DIR = "tokenizer"
CONSTANTS_DIR = "prior_postprocess"
# The CLIP image processor's config: this path inside the bundle, and inside the version folder of the
# served `preprocess_clip_image` model (the generator copies it there, the python model reads it).
IMAGE_PROCESSOR_CONFIG = "image_processor/preprocessor_config.json"
# sha256 of large files, cached next to them, keyed by size, inode and modification time.
DIGEST_CACHE = ".sha256.json"


class BundleError(RuntimeError):
    """The bundle cannot be used as it is (a failed check, a missing step); the message says what to run."""


def manifest_path(bundle: Path) -> Path:
    return Path(bundle) / MANIFEST


def read_manifest(bundle: Path) -> dict[str, Any]:
    """The manifest of a bundle whose export passed every check.

    Raises FileNotFoundError when there is none (with what failed, if the last export failed) and
    BundleError when a component's recorded parity failed (a manifest of an older exporter).
    """
    bundle = Path(bundle)
    path = manifest_path(bundle)
    if not path.is_file():
        failed = bundle / FAILED_EXPORT
        if failed.is_file():
            lines = json.loads(failed.read_text()).get("failed", [])
            raise FileNotFoundError(
                f"{path} not found: the last `kandinsky-export onnx` into {bundle} failed its parity check "
                f"({'; '.join(lines) or 'see ' + str(failed)}); nothing of it may be served"
            )
        raise FileNotFoundError(f"{path} not found: run `kandinsky-export onnx` first")
    manifest = json.loads(path.read_text())
    failed_components = [
        name
        for name, entry in manifest.get("components", {}).items()
        if not all(_passed(report) for report in entry.get("parity", []))
    ]
    if failed_components:
        raise BundleError(
            f"{path}: {', '.join(failed_components)} failed the ONNX parity check; re-export with "
            "`kandinsky-export onnx` (nothing of this bundle may be served)"
        )
    return manifest


def _passed(report: dict[str, Any]) -> bool:
    return bool(report.get("finite", False)) and float(report["max_rel_error"]) <= float(report["tolerance"])


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (a reader never sees half a file, a crash never leaves one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def write_manifest(bundle: Path, manifest: dict[str, Any]) -> None:
    write_json(manifest_path(bundle), manifest)


def update_component(bundle: Path, component: str, **values: Any) -> None:
    """Add to one component's manifest entry (a later step: FP16 variants, engines); dicts are merged."""
    manifest = read_manifest(bundle)
    entry = manifest["components"][component]
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key] = {**entry[key], **value}
        else:
            entry[key] = value
    write_manifest(bundle, manifest)


def file_digest(path: Path) -> str:
    """sha256 of one file, cached in its folder's DIGEST_CACHE while its size, inode and mtime stay.

    Every start of the Docker image checks whether the FP16 variants and engines are current against
    their source ONNX; hashing tens of GB each time took minutes, a cache hit takes a stat.
    """
    path = Path(path)
    stat = path.stat()
    key = [stat.st_size, stat.st_ino, stat.st_mtime_ns]
    cache_path = path.parent / DIGEST_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    cached = cache.get(path.name)
    if cached and cached.get("key") == key:
        return str(cached["sha256"])
    digest = sha256_of_file(path)
    cache[path.name] = {"key": key, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only bundle: correct, just not cached
        write_json(cache_path, cache)
    return digest


def sha256_of_file(path: Path) -> str:
    """Read the whole file (what the cache above saves)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_digest(model_path: Path) -> str:
    """sha256 over an ONNX file and its external data: names the graph an FP16 file or engine came from."""
    model_path = Path(model_path)
    data = sorted(p for p in model_path.parent.glob(f"{model_path.name}_data*") if p.is_file())
    digest = hashlib.sha256()
    for path in (model_path, *data):
        digest.update(path.name.encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()
