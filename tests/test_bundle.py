"""The export bundle: a failed export is never served, a re-export into
a bundle with FP16 variants and engines works, large files are hashed once, the exporter leaves warning
filters alone, and every shared name has one home."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from kandinsky_core import bundle as layout
from kandinsky_export import onnx_export

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bundle(tiny_bundle, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], target)
    return target


def _quiet_export(checkpoint, out: Path, components: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return onnx_export.export_bundle(checkpoint, out, components)


def test_a_failed_parity_check_leaves_no_manifest_and_every_later_step_refuses(
    tiny_checkpoint, bundle: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Point 1: the manifest was written before "ONNX parity failed" was raised, and the Docker entrypoint
    only checks that it exists: the next start converted, built and served graphs that had failed."""
    from kandinsky_export.fp16 import convert_bundle
    from kandinsky_repository.generator.cli import main as repository_main
    from kandinsky_repository.generator.repository import generate_repository

    assert layout.manifest_path(bundle).is_file()  # a bundle that passed, exported again: the second start
    monkeypatch.setattr(onnx_export, "FP32_TOLERANCE", 0.0)  # every real error now fails the check
    with pytest.raises(RuntimeError, match="ONNX parity failed"):
        _quiet_export(tiny_checkpoint, bundle, ["prior"])
    assert not layout.manifest_path(bundle).exists()
    failed = json.loads((bundle / layout.FAILED_EXPORT).read_text())
    assert failed["failed"] and "prior" in failed["failed"][0]

    with pytest.raises(FileNotFoundError, match="failed its parity check"):
        layout.read_manifest(bundle)
    with pytest.raises(FileNotFoundError, match="parity"):
        convert_bundle(bundle, ["prior"])
    with pytest.raises(FileNotFoundError, match="parity"):
        generate_repository(bundle, tmp_path / "repo")
    assert repository_main(["--bundle", str(bundle), "--output", str(tmp_path / "repo")]) == 2
    assert "parity" in capsys.readouterr().err


def test_a_manifest_recording_a_failed_check_is_refused(bundle: Path) -> None:
    """Manifests of the older exporter recorded failures and were trusted anyway."""
    manifest = json.loads(layout.manifest_path(bundle).read_text())
    manifest["components"]["unet"]["parity"][0]["max_rel_error"] = 1.0
    layout.manifest_path(bundle).write_text(json.dumps(manifest))
    with pytest.raises(layout.BundleError, match="unet failed the ONNX parity check"):
        layout.read_manifest(bundle)


def test_re_export_into_a_bundle_with_fp16_and_engines(tiny_checkpoint, bundle: Path) -> None:
    """Point 2: re-exporting unlinked every entry of the component folder and died on fp16/ and tensorrt/
    with IsADirectoryError. Now the FP32 files are replaced, the folders kept (their steps see from the
    source digest whether they are stale), and the manifest drops the re-exported component's records."""
    component = bundle / "prior"
    (component / layout.FP16_DIR).mkdir()
    (component / layout.FP16_DIR / layout.ONNX_FILE).write_bytes(b"fp16 of the previous export")
    (component / layout.ENGINE_DIR).mkdir()
    (component / layout.ENGINE_DIR / layout.ENGINE_FILE).write_bytes(b"engine of the previous export")
    manifest = json.loads(layout.manifest_path(bundle).read_text())
    manifest["components"]["prior"]["variants"] = {"fp16": {"passed": True}}
    manifest["components"]["prior"]["tensorrt"] = {"engine": "tensorrt/model.plan"}
    layout.manifest_path(bundle).write_text(json.dumps(manifest))

    reports = _quiet_export(tiny_checkpoint, bundle, ["prior"])
    assert all(r.passed for r in reports)
    assert (component / layout.FP16_DIR).is_dir() and (component / layout.ENGINE_DIR).is_dir()
    entry = layout.read_manifest(bundle)["components"]["prior"]
    assert entry["files"] == [layout.ONNX_FILE] and "variants" not in entry and "tensorrt" not in entry
    assert set(layout.read_manifest(bundle)["components"]) == set(manifest["components"])  # others kept


def test_large_files_are_hashed_once(bundle: Path, monkeypatch) -> None:
    """Point 6: every container start checked the FP16 variants and engines against their source ONNX by
    hashing tens of GB. The digest is cached next to the file while its size, inode and mtime stay."""
    reads = []
    real = layout.sha256_of_file
    monkeypatch.setattr(layout, "sha256_of_file", lambda path: reads.append(path) or real(path))
    model = bundle / "unet" / layout.ONNX_FILE
    first = layout.onnx_digest(model)
    assert reads == [model]
    assert layout.onnx_digest(model) == first and reads == [model]  # the second start reads nothing
    model.write_bytes(model.read_bytes() + b" ")  # a new export of the file
    assert layout.onnx_digest(model) != first and len(reads) == 2


def test_the_exporter_leaves_warning_filters_alone() -> None:
    """Point 8: `kandinsky-export` ignored every UserWarning process-wide; only the tracer's warnings are
    silenced, where the export traces."""
    from kandinsky_export.cli import main

    before = list(warnings.filters)
    assert main(["profile"]) == 0
    assert warnings.filters == before
    source = (ROOT / "export" / "kandinsky_export" / "onnx_export.py").read_text()
    assert 'warnings.simplefilter("ignore", torch.jit.TracerWarning)' in source


# -- point 9: one home for each shared name -------------------------------------------------------


def _python_files() -> list[Path]:
    folders = ("core", "client", "export", "model_repository", "benchmarks")
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _module_assignments(path: Path) -> dict[str, ast.AST]:
    tree = ast.parse(path.read_text())
    found = {}
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        for target in targets:
            if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
                found[target.id] = node.value
    return found


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("MANIFEST", "core/kandinsky_core/bundle.py"),
        ("ENGINE_FILE", "core/kandinsky_core/bundle.py"),
        ("IMAGE_PROCESSOR_CONFIG", "core/kandinsky_core/bundle.py"),
        ("ONNX_FILE", "core/kandinsky_core/bundle.py"),
        ("FP16_DIR", "core/kandinsky_core/bundle.py"),
        ("MAX_IMAGES_PER_REQUEST", "core/kandinsky_core/components.py"),
    ],
)
def test_each_shared_name_is_defined_once(name: str, home: str) -> None:
    """Two copies of ENGINE_FILE and MANIFEST, and two IMAGE_PROCESSOR_CONFIG with different values."""
    defined = [
        str(p.relative_to(ROOT))
        for p in _python_files()
        if isinstance(_module_assignments(p).get(name), ast.Constant)
    ]
    assert defined == [home]


def test_one_dtype_table_and_one_image_size() -> None:
    """Four dtype tables (Triton, TensorRT, torch, the python models') and the image sizes 1024/768/512
    spelled in several modules: the registry's DTYPES and MAX_IMAGE_SIZE, and the profile defaults."""
    tables, sizes = [], []
    for path in _python_files():
        for name, value in _module_assignments(path).items():
            if isinstance(value, ast.Dict) and any(
                isinstance(k, ast.Constant) and k.value in ("float32", "TYPE_FP32") for k in value.keys
            ):
                tables.append(f"{path.relative_to(ROOT)}:{name}")
            if isinstance(value, ast.Constant) and value.value in (512, 768, 1024):
                sizes.append(f"{path.relative_to(ROOT)}:{name}")
    assert tables == []  # DTYPES is built from DType rows, not a dict literal
    assert sorted(sizes) == [
        "core/kandinsky_core/components.py:MAX_IMAGE_SIZE",
        "core/kandinsky_core/profiles.py:PROFILE_MIN_SIZE",
        "core/kandinsky_core/profiles.py:PROFILE_OPT_SIZE",
        "core/kandinsky_core/request.py:DEFAULT_IMAGE_SIDE",  # a request's default size, as diffusers'
    ]


def test_the_generator_modules_do_not_import_each_other() -> None:
    """The repository writer and the GPU flavour modules imported each other (inside functions, to dodge
    the cycle): the flavours import the shared building blocks (configs.py), never the writer. The
    package-level rules (no import of the exporter here) are tests/test_layout.py's."""

    def imports(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found.add("." * node.level + (node.module or ""))
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        return found

    generator = ROOT / "model_repository" / "kandinsky_repository" / "generator"
    flavours = ("gpu_backends.py", "onnxruntime_flavour.py", "tensorrt_flavour.py", "timed_flavour.py")
    gpu = set().union(*(imports(generator / name) for name in flavours))
    assert ".repository" not in gpu and "kandinsky_repository.generator.repository" not in gpu
    assert ".gpu_backends" in imports(generator / "repository.py")


def test_the_profile_and_bundle_modules_are_pure_python() -> None:
    """The client stays torch- and tensorrt-free; the serving image imports the bundle layout without onnx."""
    code = (
        "import sys\n"
        "for heavy in ('torch', 'tensorrt', 'onnx', 'onnxruntime', 'diffusers', 'transformers'):\n"
        "    sys.modules[heavy] = None\n"
        "import kandinsky_core.profiles, kandinsky_core.bundle, kandinsky_repository.generator.repository\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shell_and_compose_spell_no_sizes_and_only_the_default_ports() -> None:
    """Image sizes, batching windows and ports were repeated in the entrypoint, compose and docs."""
    from kandinsky_repository.settings import DEFAULTS

    scripts = [ROOT / "docker" / "entrypoint.sh", *sorted((ROOT / "deploy" / "chart" / "files").glob("*.sh"))]
    for script in scripts:
        code = "\n".join(line.split("#", 1)[0] for line in script.read_text().splitlines())
        assert not re.findall(r"(?<!\d)(?:512|640|768|1024|2000)(?!\d)", code), script.name
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    ports = {int(p) for p in re.findall(r":(\d{4})\"", compose)}
    assert ports <= {DEFAULTS.http_port, DEFAULTS.grpc_port, DEFAULTS.metrics_port, DEFAULTS.openai_port}, (
        ports
    )
    code = "\n".join(line.split("#", 1)[0] for line in compose.splitlines())
    assert not re.findall(r"(?<!\d)(?:512|640|768|1024|2000)(?!\d)", code)
