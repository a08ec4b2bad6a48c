"""Where checkpoint parts come from: tokenizer files, pinned hub revisions, the inpainting MoVQ.

Hub downloads cannot run here, but the hub's loading path can: a local Hugging Face cache holding two
snapshots (two commits) of the tiny preset's repositories, read with HF_HUB_OFFLINE=1, is what
`hf_hub_download` and `from_pretrained` resolve a pinned `revision` against, exactly as after a download.
The commit ids there are made-up test values, not revisions of the released repositories.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kandinsky_core.components import INPAINT_MOVQ_COMPONENTS
from kandinsky_core.processing import load_tokenizer, tokenize
from kandinsky_core.server_info import INPAINT_MOVQ_PARAMETER
from kandinsky_export.checkpoint import Checkpoint
from kandinsky_export.inpaint_movq import InpaintMovqMismatch, movq_record, own_movq_components
from kandinsky_export.onnx_export import export_tokenizer
from kandinsky_export.released_layout import write_released_tokenizer
from safetensors.torch import load_file, save_file

PRIOR_REPO = "kandinsky-community/kandinsky-2-2-prior"
DECODER_REPO = "kandinsky-community/kandinsky-2-2-decoder"
COMMIT_A = "a" * 40  # test snapshot ids (the cache's refs/main points at A)
COMMIT_B = "b" * 40
B_CLIP_STD_SCALE = 2.0  # snapshot B's prior differs from A's: clip_std scaled by this


def _copy_checkpoint(root: Path, target: Path) -> Path:
    shutil.copytree(root, target, ignore=shutil.ignore_patterns("controlnet"))
    return target


def test_tokenizer_export_builds_tokenizer_json_without_transformers(
    tiny_checkpoint_root, tmp_path, monkeypatch
):
    """Slow files only (as released): the export converts them itself; no transformers save is involved."""
    from transformers import CLIPTokenizer
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    root = _copy_checkpoint(tiny_checkpoint_root, tmp_path / "checkpoint")
    folder = root / "prior" / "tokenizer"
    write_released_tokenizer(folder, model_max_length=77)
    assert not (folder / "tokenizer.json").exists()

    def no_resave(*args, **kwargs):
        raise AssertionError("the export must not re-save the tokenizer through transformers")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", no_resave)
    export_tokenizer(Checkpoint.from_root(root), tmp_path / "bundle")
    served = load_tokenizer(tmp_path / "bundle" / "tokenizer")
    prompts = ["a photo of a cat", "", "A  CASTLE,\tin the mountains!! " * 12, "émoji 🐱, 日本語 and ÄÖÜ"]
    expected = CLIPTokenizer.from_pretrained(str(folder))(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    )
    got = tokenize(served, prompts)
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"].astype(bool))


# -- pinned revisions ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_cache(tiny_checkpoint_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache with snapshots A and B of the prior and decoder repos (B's prior differs)."""
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    for part, repo in (("prior", PRIOR_REPO), ("decoder", DECODER_REPO)):
        base = cache / f"models--{repo.replace('/', '--')}"
        for commit in (COMMIT_A, COMMIT_B):
            shutil.copytree(tiny_checkpoint_root / part, base / "snapshots" / commit)
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(COMMIT_A)
    weights = cache / f"models--{PRIOR_REPO.replace('/', '--')}" / "snapshots" / COMMIT_B / "prior"
    tensors = load_file(weights / "diffusion_pytorch_model.safetensors")
    tensors["clip_std"] = tensors["clip_std"] * B_CLIP_STD_SCALE
    save_file(tensors, weights / "diffusion_pytorch_model.safetensors")
    return cache


def _offline_env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HOME": str(cache.parent),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


LOAD_AT_REVISIONS = """
import json, sys
from kandinsky_export.checkpoint import Checkpoint
result = {}
prior_repo, decoder_repo, *revisions = sys.argv[1:]
for revision in revisions:
    checkpoint = Checkpoint(prior_repo, decoder_repo, revisions={"prior": revision})
    prior = checkpoint.load_component("prior")
    result[revision] = {
        "clip_std_sum": float(prior.clip_std.sum()),
        "scheduler": checkpoint.scheduler_config("prior")["_class_name"],
        "tokenizer_ids": checkpoint.load_tokenizer()("a cat").input_ids,
    }
print(json.dumps(result))
"""


def test_revision_reaches_the_hub_loading_calls(hub_cache):
    """Each pinned commit loads that snapshot's weights; an unknown commit is not silently replaced."""
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AT_REVISIONS, PRIOR_REPO, DECODER_REPO, COMMIT_A, COMMIT_B],
        env=_offline_env(hub_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    a, b = result[COMMIT_A], result[COMMIT_B]
    assert b["clip_std_sum"] == pytest.approx(B_CLIP_STD_SCALE * a["clip_std_sum"], rel=1e-6)
    assert a["scheduler"] == b["scheduler"] == "UnCLIPScheduler"
    assert a["tokenizer_ids"] == b["tokenizer_ids"]
    missing = subprocess.run(
        [sys.executable, "-c", LOAD_AT_REVISIONS, PRIOR_REPO, DECODER_REPO, "c" * 40],
        env=_offline_env(hub_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode != 0


def test_export_cli_pins_revisions_and_records_them(hub_cache, tmp_path):
    """`kandinsky-export onnx --prior-revision`: the exported prior is snapshot B's, the manifest says so."""
    out = tmp_path / "bundle"
    arguments = ["onnx", "--prior", PRIOR_REPO, "--decoder", DECODER_REPO, "--prior-revision", COMMIT_B]
    arguments += ["--components", "prior", "--output", str(out)]
    code = "import sys; from kandinsky_export.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        env=_offline_env(hub_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["revisions"] == {"prior": COMMIT_B}
    assert manifest["checkpoint"]["prior"] == PRIOR_REPO
    snapshot = hub_cache / f"models--{PRIOR_REPO.replace('/', '--')}" / "snapshots"
    clip_std = {
        commit: load_file(snapshot / commit / "prior" / "diffusion_pytorch_model.safetensors")["clip_std"]
        for commit in (COMMIT_A, COMMIT_B)
    }
    exported = np.load(out / "prior_postprocess" / "clip_std.npy")
    np.testing.assert_allclose(exported, clip_std[COMMIT_B].float().numpy().reshape(-1), rtol=1e-6)
    assert not np.allclose(exported, clip_std[COMMIT_A].float().numpy().reshape(-1))


def test_revision_flags_refuse_local_folders(tiny_checkpoint_root):
    from kandinsky_export.cli import main

    with pytest.raises(SystemExit, match="local folder"):
        main(
            [
                "onnx",
                "--prior",
                str(tiny_checkpoint_root / "prior"),
                "--decoder",
                str(tiny_checkpoint_root / "decoder"),
                "--prior-revision",
                COMMIT_A,
                "--output",
                "unused",
            ]
        )
    with pytest.raises(SystemExit, match="hub ids"):
        main(
            [
                "onnx",
                "--checkpoint",
                str(tiny_checkpoint_root),
                "--decoder-revision",
                COMMIT_A,
                "--output",
                "x",
            ]
        )


# -- the inpainting repo's own MoVQ ------------------------------------------------------------------


def test_identical_inpaint_movq_is_shared_and_recorded(tiny_bundle):
    manifest = json.loads((tiny_bundle[0] / "manifest.json").read_text())
    movq = manifest["movq"]
    assert movq["exported_from"] == "decoder"
    assert movq["decoder_inpaint_movq"] == "decoder"
    assert movq["digests"]["decoder_inpaint"] == movq["digests"]["decoder"]
    assert not set(INPAINT_MOVQ_COMPONENTS) & set(manifest["components"])  # no second MoVQ exported


def test_identical_inpaint_movq_serves_no_extra_models(tiny_repository):
    from kandinsky_core.components import DECODE_IMAGE_INPAINT, ENCODE_LATENTS_INPAINT
    from kandinsky_repository.generator.repository import read_config

    for name in (*INPAINT_MOVQ_COMPONENTS, DECODE_IMAGE_INPAINT.name, ENCODE_LATENTS_INPAINT.name):
        assert not (tiny_repository / name).exists(), name
    parameters = read_config(tiny_repository / "unet_inpaint").parameters
    assert parameters[INPAINT_MOVQ_PARAMETER].string_value == "false"


def test_different_inpaint_movq_is_exported_unless_shared_on_purpose(tiny_checkpoint_root, tmp_path):
    root = _copy_checkpoint(tiny_checkpoint_root, tmp_path / "checkpoint")
    weights = root / "decoder_inpaint" / "movq" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + torch.full_like(tensors[name], 1e-3)
    save_file(tensors, weights)
    checkpoint = Checkpoint.from_root(root)
    record = movq_record(checkpoint)
    assert record["decoder_inpaint_movq"] == "decoder_inpaint"
    assert record["digests"]["decoder_inpaint"] != record["digests"]["decoder"]
    assert own_movq_components(record) == list(INPAINT_MOVQ_COMPONENTS)
    shared = movq_record(checkpoint, allow_mismatch=True)  # ALLOW_MISMATCH_FLAG: one MoVQ served
    assert shared["decoder_inpaint_movq"].startswith("decoder (differs")
    assert own_movq_components(shared) == []


def test_inpaint_movq_with_other_latent_shapes_is_refused(tiny_checkpoint_root, tmp_path):
    """One set of dims serves both MoVQs, so the inpainting one must make latents of the same shape."""
    from diffusers import VQModel

    root = _copy_checkpoint(tiny_checkpoint_root, tmp_path / "checkpoint")
    folder = root / "decoder_inpaint" / "movq"
    config = dict(VQModel.load_config(folder))
    shutil.rmtree(folder)
    VQModel.from_config({**config, "latent_channels": 2 * config["latent_channels"]}).save_pretrained(folder)
    with pytest.raises(InpaintMovqMismatch, match="latents"):
        movq_record(Checkpoint.from_root(root))


def test_merges_are_read_as_clips_reader_reads_them():
    """The header line is skipped and at most CLIP_MAX_MERGES merges are taken (transformers 4.x's limit)."""
    from kandinsky_export.tokenizer import CLIP_MAX_MERGES, MERGES_HEADER, read_merges

    text = MERGES_HEADER + "\n" + "a b\n" * (CLIP_MAX_MERGES + 5)
    merges = read_merges(text)
    assert len(merges) == CLIP_MAX_MERGES and merges[0] == ("a", "b")
