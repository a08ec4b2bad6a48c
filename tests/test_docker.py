"""The Docker image's logic without Docker : docker/entrypoint.sh run with stand-in
`kandinsky-export`, `kandinsky-repository`, `kandinsky-serve` and `df` commands (the real `kandinsky-export
profile` checks the sizes), and the Dockerfile and compose file read as text/YAML. Building the image needs
Docker and an NGC base image, which the test machines do not have (docs/gpu.md says what has not run).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
MIB = 1 << 20

STUBS = {
    # profile: the real command (it checks the sizes); the others record their arguments and write what
    # the real ones would leave behind.
    "kandinsky-export": r"""
echo "kandinsky-export $*" >> "$STUB_LOG"
output=""; previous=""
for arg in "$@"; do [[ "$previous" == "--output" ]] && output="$arg"; previous="$arg"; done
case "$1" in
    profile) exec "$REAL_PYTHON" -c 'import sys; from kandinsky_export.cli import main; sys.exit(main(sys.argv[1:]))' "$@" ;;
    checkpoint) mkdir -p "$output" ;;
    onnx) [[ "${STUB_PARITY:-pass}" == pass ]] || exit 1; mkdir -p "$output"; echo '{}' > "$output/manifest.json" ;;
esac
""",
    "kandinsky-repository": r"""
echo "kandinsky-repository $*" >> "$STUB_LOG"
output=""; previous=""
for arg in "$@"; do [[ "$previous" == "--output" ]] && output="$arg"; previous="$arg"; done
mkdir -p "$output"
echo "{\"shared_memory_bytes\": ${STUB_SHM_NEEDED:-1048576}}" > "$output/kandinsky_repository.json"
""",
    "kandinsky-serve": 'echo "kandinsky-serve $*" >> "$STUB_LOG"',
    "df": 'printf "1K-blocks\\n%s\\n" "${STUB_SHM_KB:-65536}"',
}


@pytest.fixture()
def container(tmp_path: Path):
    """Run the entrypoint like the container does; returns (run, log lines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\nset -euo pipefail\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.log"
    base = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "KANDINSKY_DATA": str(tmp_path / "data"),
        "STUB_LOG": str(log),
        "REAL_PYTHON": sys.executable,
    }

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(ENTRYPOINT), *args],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def calls() -> list[list[str]]:
        return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []

    return run, calls, tmp_path / "data"


def _commands(calls: list[list[str]]) -> list[str]:
    return [" ".join(c[:2]) for c in calls if c[1] != "profile"]


def test_prepare_runs_each_step_once_and_passes_only_what_is_set(container) -> None:
    run, calls, data = container
    first = run("prepare", KANDINSKY_PRESET="tiny")
    assert first.returncode == 0, first.stderr
    assert _commands(calls()) == [
        "kandinsky-export checkpoint",
        "kandinsky-export onnx",
        "kandinsky-export fp16",
        "kandinsky-export engines",
        "kandinsky-repository --bundle",
    ]
    repository = next(c for c in calls() if c[0] == "kandinsky-repository")
    # unset settings are the project's defaults: no number is spelled here (point 9)
    for option in ("--max-image-size", "--instances", "--max-queue-delay-us"):
        assert option not in repository, option
    assert "--max-size" not in next(c for c in calls() if c[:2] == ["kandinsky-export", "engines"])

    second = run("prepare", KANDINSKY_PRESET="tiny")  # a later start: the bundle is there
    assert second.returncode == 0, second.stderr
    assert [
        c for c in _commands(calls()) if c in ("kandinsky-export onnx", "kandinsky-export checkpoint")
    ] == [
        "kandinsky-export checkpoint",
        "kandinsky-export onnx",
    ]


def test_the_settings_reach_every_step(container) -> None:
    run, calls, _ = container
    env = {
        "KANDINSKY_MAX_IMAGE_SIZE": "640",
        "KANDINSKY_INSTANCES": "2",
        "KANDINSKY_MAX_QUEUE_DELAY_US": "500",
        "KANDINSKY_STEP_BATCHING": "on",
        "KANDINSKY_FLAVOUR": "onnxruntime",
        "KANDINSKY_ORT_TENSORRT": "1",
    }
    result = run("prepare", **env)
    assert result.returncode == 0, result.stderr
    by_command = {" ".join(c[:2]): c for c in calls()}
    assert by_command["kandinsky-export fp16"][-2:] == ["--max-size", "640"]
    repository = " ".join(by_command["kandinsky-repository --bundle"])
    for fragment in (
        "--max-image-size 640",
        "--instances 2",
        "--max-queue-delay-us 500",
        "--step-batching on",
        "--ort-tensorrt",
    ):
        assert fragment in repository
    assert "kandinsky-export engines" not in by_command  # onnxruntime: no engine build


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KANDINSKY_MAX_IMAGE_SIZE": "600"}, "not a positive multiple of 64"),
        ({"KANDINSKY_STATIC_SIZE": "768x700"}, "700"),
        ({"KANDINSKY_FLAVOUR": "cpu"}, "KANDINSKY_FLAVOUR must be tensorrt or onnxruntime"),
        ({"KANDINSKY_FLAVOUR": "onnxruntime", "KANDINSKY_PRECISION": "mixed"}, "mixed"),
    ],
)
def test_a_bad_setting_stops_before_the_export(container, env: dict, message: str) -> None:
    """A max image size below 768 crashed the engine build after the export, and with `restart:
    unless-stopped` the container looped; now sizes off the grid are refused before any work, and sizes
    below the default profile (e.g. 640) are served (test_the_settings_reach_every_step)."""
    run, calls, data = container
    result = run("prepare", **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert _commands(calls()) == [] and not (data / "bundle").exists()


def test_a_failed_export_is_exported_again_not_served(container) -> None:
    run, calls, data = container
    failed = run("prepare", KANDINSKY_PRESET="tiny", STUB_PARITY="fail")
    assert failed.returncode != 0
    assert "kandinsky-export fp16" not in _commands(calls())
    retried = run("prepare", KANDINSKY_PRESET="tiny")
    assert retried.returncode == 0, retried.stderr
    assert _commands(calls()).count("kandinsky-export onnx") == 2


def test_serve_checks_shared_memory_first(container) -> None:
    """`docker run` without --shm-size gives 64 MB of /dev/shm; four 1024 px images through the python
    backend need more, and failed on the first such request. The entrypoint says so before serving."""
    run, calls, data = container
    assert run("prepare", STUB_SHM_NEEDED=str(300 * MIB)).returncode == 0
    short = run("serve", STUB_SHM_KB=str(64 * 1024))
    assert short.returncode == 2
    assert "/dev/shm holds 64 MiB" in short.stderr and "--shm-size=1g" in short.stderr
    assert not [c for c in calls() if c[0] == "kandinsky-serve"]

    served = run(STUB_SHM_KB=str(2048 * 1024), KANDINSKY_SERVE_ARGS="--log-verbose 1")  # serve: the default
    assert served.returncode == 0, served.stderr
    (serve,) = [c for c in calls() if c[0] == "kandinsky-serve"]
    assert serve[1:] == [
        "--repository",
        str(data / "model_repository"),
        "--host",
        "0.0.0.0",
        "--health-host",
        "0.0.0.0",
        "--openai-host",
        "0.0.0.0",
        "--admin-key-file",
        str(data / "admin.key"),
        "--log-verbose",
        "1",
    ]


def test_serve_without_a_repository_says_what_to_run(container) -> None:
    run, _, _ = container
    result = run("serve")
    assert result.returncode == 2 and "run the prepare step first" in result.stderr


# -- the image and compose ------------------------------------------------------------------------


def _stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        match = re.match(r"FROM \S+ AS (\w+)", line)
        if match:
            current = match.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_the_serving_image_is_lean_and_keeps_ngc_entrypoint() -> None:
    stages = _stages()
    assert list(stages) == ["serve", "prepare"]  # prepare last: the default target (the Helm chart's image)
    serve = "\n".join(line for line in stages["serve"] if not line.lstrip().startswith("#"))
    installs = [" ".join(i.replace("\\", " ").split()) for i in re.findall(r"pip install[^&]*", serve)]
    # the serving side is its three packages, installed with their own (light) dependencies: no trick
    assert any(all(part in i for part in ("./core", "./client", "./model_repository")) for i in installs)
    assert not [i for i in installs if "--no-deps" in i or "./export" in i]
    for heavy in ("torch", "diffusers", "transformers", "tensorrt", "onnx"):
        assert not [i for i in installs if heavy in i], heavy
    prepare = "\n".join(stages["prepare"])
    assert all(word in prepare for word in ("torch==", "./export", "tensorrt-cu12"))
    entrypoint = next(line for line in stages["serve"] if line.startswith("ENTRYPOINT"))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT")) == [
        "/opt/nvidia/nvidia_entrypoint.sh",
        "/usr/local/bin/kandinsky-entrypoint",
    ]


def _entrypoint_variables() -> set[str]:
    """The environment the entrypoint declares in its header (and every KANDINSKY_ variable it reads)."""
    text = ENTRYPOINT.read_text()
    header = text.split("# Environment", 1)[1].split("set -euo pipefail", 1)[0]
    declared = set(re.findall(r"^#   ((?:KANDINSKY|HF)_[A-Z_]+)", header, re.M))
    used = set(re.findall(r"\$\{((?:KANDINSKY|HF)_[A-Z_]+)", text)) - {"KANDINSKY_DATA"}
    assert used <= declared, used - declared
    return declared


def test_compose_prepares_once_then_serves_and_passes_every_setting() -> None:
    """compose did not pass KANDINSKY_INSTANCES, KANDINSKY_MAX_QUEUE_DELAY_US or the serve arguments,
    although docs/gpu.md said it did; and every start re-ran the export steps in the serving container."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    prepare, triton = services["prepare"], services["triton"]
    assert prepare["build"]["target"] == "prepare" and prepare["command"] == ["prepare"]
    assert prepare["restart"] == "no"  # a bad setting stops it once instead of looping
    assert triton["build"]["target"] == "serve" and triton["command"] == ["serve"]
    assert triton["depends_on"] == {"prepare": {"condition": "service_completed_successfully"}}
    assert services["gateway"]["build"]["target"] == "serve"
    variables = _entrypoint_variables()
    assert {"KANDINSKY_INSTANCES", "KANDINSKY_MAX_QUEUE_DELAY_US", "KANDINSKY_SERVE_ARGS"} <= variables
    for service in (prepare, triton):
        assert variables <= set(service["environment"]), variables - set(service["environment"])
    assert "shm_size" in triton
    # docs/gpu.md's settings table lists exactly the variables the entrypoint reads
    table = (ROOT / "docs" / "gpu.md").read_text().split("Settings (environment", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"^\| `((?:KANDINSKY|HF)_[A-Z_]+)`", table, re.M))
    documented |= set(re.findall(r"`, `((?:KANDINSKY)_[A-Z_]+)`", table))
    assert documented == variables


def test_the_chart_prepares_through_the_same_entrypoint_mode() -> None:
    text = (ROOT / "deploy" / "chart" / "files" / "prepare.sh").read_text()
    assert "kandinsky-entrypoint prepare" in text


def test_pinned_revisions_reach_the_export_and_a_new_revision_exports_again(container) -> None:
    """KANDINSKY_*_REVISION become --*-revision; a bundle whose manifest records other sources
    or revisions is exported again, one that records these is not."""
    run, calls, data = container
    revisions = {"KANDINSKY_PRIOR_REVISION": "1" * 40, "KANDINSKY_DECODER_INPAINT_REVISION": "2" * 40}
    first = run("prepare", **revisions)
    assert first.returncode == 0, first.stderr
    onnx = " ".join(next(c for c in calls() if c[:2] == ["kandinsky-export", "onnx"]))
    assert f"--prior-revision {'1' * 40}" in onnx and f"--decoder-inpaint-revision {'2' * 40}" in onnx
    assert "--decoder-revision" not in onnx  # unset: the default branch

    recorded = {
        "prior": "kandinsky-community/kandinsky-2-2-prior",
        "decoder": "kandinsky-community/kandinsky-2-2-decoder",
        "decoder_inpaint": "kandinsky-community/kandinsky-2-2-decoder-inpaint",
        "revisions": {"prior": "1" * 40, "decoder_inpaint": "2" * 40},
    }
    manifest = data / "bundle" / "manifest.json"
    manifest.write_text(json.dumps({"checkpoint": recorded}))
    assert run("prepare", **revisions).returncode == 0
    assert [c[:2] for c in calls()].count(["kandinsky-export", "onnx"]) == 1  # same revisions: kept

    manifest.write_text(json.dumps({"checkpoint": {**recorded, "revisions": {"prior": "3" * 40}}}))
    again = run("prepare", **revisions)
    assert again.returncode == 0, again.stderr
    assert [c[:2] for c in calls()].count(
        ["kandinsky-export", "onnx"]
    ) == 2  # other revisions: exported again
    assert "exported from" in again.stderr


def test_controlnet_is_opt_in_and_pinned_like_the_other_parts(container) -> None:
    """KANDINSKY_CONTROLNET adds the ControlNet UNet (and its revision) to the export; unset, none is asked
    for; a bundle without it is exported again once it is asked for."""
    run, calls, data = container
    assert run("prepare").returncode == 0
    onnx = " ".join(next(c for c in calls() if c[:2] == ["kandinsky-export", "onnx"]))
    assert "--controlnet" not in onnx

    recorded = {
        "prior": "kandinsky-community/kandinsky-2-2-prior",
        "decoder": "kandinsky-community/kandinsky-2-2-decoder",
        "decoder_inpaint": "kandinsky-community/kandinsky-2-2-decoder-inpaint",
    }
    (data / "bundle" / "manifest.json").write_text(json.dumps({"checkpoint": recorded}))
    depth = "kandinsky-community/kandinsky-2-2-controlnet-depth"
    again = run("prepare", KANDINSKY_CONTROLNET=depth, KANDINSKY_CONTROLNET_REVISION="4" * 40)
    assert again.returncode == 0, again.stderr
    exports = [" ".join(c) for c in calls() if c[:2] == ["kandinsky-export", "onnx"]]
    assert len(exports) == 2, exports  # the bundle lacked the ControlNet: exported again
    assert f"--controlnet {depth}" in exports[-1] and f"--controlnet-revision {'4' * 40}" in exports[-1]
