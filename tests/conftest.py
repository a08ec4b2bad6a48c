"""Shared fixtures: the `tiny` preset built once per session, and a real Triton server serving it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from kandinsky_repository.server import free_port

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kandinsky_export.presets import PRESETS, write_preset_checkpoint

    root = tmp_path_factory.mktemp("tiny") / "checkpoint"
    return write_preset_checkpoint(PRESETS["tiny"], root, seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_root: Path):
    from kandinsky_export.checkpoint import Checkpoint

    return Checkpoint.from_root(tiny_checkpoint_root)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """The ONNX bundle of the tiny preset, with the parity reports of its export."""
    from kandinsky_export.onnx_export import export_bundle

    out = tmp_path_factory.mktemp("tiny-onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reports = export_bundle(tiny_checkpoint, out)
    return out, reports


@pytest.fixture(scope="session")
def tiny_repository(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kandinsky_repository.generate import generate_repository

    out = tmp_path_factory.mktemp("tiny-repo") / "model_repository"
    generate_repository(tiny_bundle[0], out)
    return out


@pytest.fixture(scope="session")
def triton_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tritonserver process serving the tiny repository, stopped at the end of the session."""
    from kandinsky_repository.server import TritonServer

    log = tmp_path_factory.mktemp("triton") / "server.log"
    server = TritonServer(
        tiny_repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_file=log,
    )
    with server:
        yield server
    logging.getLogger(__name__).info("server log: %s", log)


@pytest.fixture(scope="session", params=["grpc", "http"])
def client(request: pytest.FixtureRequest, triton_server):
    from kandinsky_client.pipeline import KandinskyClient

    url = triton_server.grpc_url if request.param == "grpc" else triton_server.http_url
    with KandinskyClient(url, protocol=request.param) as c:
        yield c


@pytest.fixture(scope="session")
def grpc_client(triton_server):
    from kandinsky_client.pipeline import KandinskyClient

    with KandinskyClient(triton_server.grpc_url, protocol="grpc") as c:
        yield c
