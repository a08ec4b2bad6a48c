"""Build what a benchmark needs, or reuse it: preset checkpoint -> ONNX bundle -> model repository.

Layout under the artifacts folder (default `artifacts/<preset>/`, git-ignored):

    checkpoint/         the preset written as a diffusers checkpoint (skipped with --checkpoint)
    onnx/               the export bundle (kandinsky-export onnx)
    model_repository/   the Triton repository (kandinsky-repository), for this run's options
    preset.json         the preset's settings the checkpoint was written from
    repository.json     the options (and repository format) the repository was generated with

A stamp that disagrees with what is asked for (the preset changed, other repository options) rebuilds the
stale stage and everything after it; a missing stamp trusts what is there (built by the CLIs by hand).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kandinsky_core.server_info import REPOSITORY_FORMAT

if TYPE_CHECKING:
    from kandinsky_repository.generator.repository import RepositoryOptions

logger = logging.getLogger(__name__)


@dataclass
class Artifacts:
    checkpoint_root: Path
    bundle: Path
    repository: Path
    built: dict[str, float] = field(default_factory=dict)  # stage -> seconds, for stages built this run


def _read_stamp(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_stamp(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _normalised(value: Any) -> Any:
    """JSON round trip, so a stamp read back compares equal to the value it was written from."""
    return json.loads(json.dumps(value, sort_keys=True))


def checkpoint_present(root: Path) -> bool:
    return (root / "prior" / "model_index.json").is_file() and (
        root / "decoder" / "model_index.json"
    ).is_file()


def bundle_present(bundle: Path) -> bool:
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        return False
    components = json.loads(manifest.read_text()).get("components", {})
    return bool(components) and all((bundle / name / "model.onnx").is_file() for name in components)


def _export(checkpoint_root: Path, bundle: Path) -> None:
    from kandinsky_export.checkpoint import Checkpoint
    from kandinsky_export.onnx_export import export_bundle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings
        export_bundle(Checkpoint.from_root(checkpoint_root), bundle)


def ensure_artifacts(
    folder: Path,
    *,
    preset: str | None,
    checkpoint_root: Path | None,
    repository_options: RepositoryOptions | None,
) -> Artifacts:
    """Make sure checkpoint, bundle and repository exist under `folder`; build the missing stages.

    `preset` names a random-weight preset to write when no `checkpoint_root` is given; without
    `repository_options` no repository is generated (the benchmark measures a server started elsewhere).
    """
    from kandinsky_export.presets import PRESETS, write_preset_checkpoint
    from kandinsky_repository.generator.repository import generate_repository

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    built: dict[str, float] = {}
    stale = False

    if checkpoint_root is None:
        if preset is None:
            raise ValueError("give a preset or a checkpoint root")
        checkpoint_root = folder / "checkpoint"
        wanted = _normalised(asdict(PRESETS[preset]))
        stamp = folder / "preset.json"
        recorded = _read_stamp(stamp)
        if recorded is not None and recorded != wanted:
            logger.info("preset '%s' changed since %s was written: rebuilding", preset, checkpoint_root)
            stale = True
        if stale or not checkpoint_present(checkpoint_root):
            if checkpoint_root.exists():
                shutil.rmtree(checkpoint_root)
            start = time.perf_counter()
            write_preset_checkpoint(PRESETS[preset], checkpoint_root)
            built["checkpoint"] = time.perf_counter() - start
            _write_stamp(stamp, wanted)
            stale = True
    checkpoint_root = Path(checkpoint_root)

    bundle = folder / "onnx"
    if stale or not bundle_present(bundle):
        if bundle.exists():
            shutil.rmtree(bundle)
        start = time.perf_counter()
        _export(checkpoint_root, bundle)
        built["onnx"] = time.perf_counter() - start
        stale = True

    repository = folder / "model_repository"
    if repository_options is None:  # measuring a server started elsewhere
        return Artifacts(checkpoint_root, bundle, repository, built)
    # The repository format is part of the stamp: a repository written by an older generator is refused by
    # this release's models and client, so it is regenerated even when the options are the same.
    options = _normalised({**asdict(repository_options), "repository_format": REPOSITORY_FORMAT})
    stamp = folder / "repository.json"
    if stale or _read_stamp(stamp) != options or not (repository / "unet" / "config.pbtxt").is_file():
        start = time.perf_counter()
        try:
            generate_repository(bundle, repository, repository_options)
        except FileNotFoundError as error:  # a bundle from an older exporter lacks a newer file
            logger.info("%s: exporting the bundle again", error)
            shutil.rmtree(bundle)
            export_start = time.perf_counter()
            _export(checkpoint_root, bundle)
            built["onnx"] = time.perf_counter() - export_start
            generate_repository(bundle, repository, repository_options)
        built["repository"] = time.perf_counter() - start
        _write_stamp(stamp, options)
    for stage, seconds in built.items():
        logger.info("built %s in %.1fs", stage, seconds)
    return Artifacts(checkpoint_root, bundle, repository, built)


def subcommand_artifacts(args: Any) -> Artifacts:
    """The preset's artifacts with the default repository, for `kandinsky-bench <subcommand>` (its
    `--preset` and `--artifacts`, from `served.add_subcommand_arguments`)."""
    from kandinsky_repository.generator.repository import RepositoryOptions

    folder = args.artifacts or Path("artifacts") / args.preset
    return ensure_artifacts(
        folder, preset=args.preset, checkpoint_root=None, repository_options=RepositoryOptions()
    )
