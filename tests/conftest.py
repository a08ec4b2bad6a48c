"""Shared fixtures: the `tiny` preset built once per session, and a real Triton server serving it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from kandinsky_core.components import ModelDims
from kandinsky_repository.serving.triton import free_port

TINY_SEED = 0
# The tiny preset's dims (export/kandinsky_export/presets.py), for tests that need them without a bundle
# (movq_scale_factor 8: a latent side of 8 is 64 px).
TINY_DIMS = ModelDims(
    text_seq_len=77,
    text_hidden=32,
    text_embed=32,
    embed_dim=32,
    image_size=32,
    latent_channels=4,
    unet_out_channels=8,
    inpaint_in_channels=9,
    movq_scale_factor=8,
    unet_downscale=2,
)
# The admin key of the servers tests start (Triton's restricted APIs: shared memory, logging, ...).
TEST_ADMIN_KEY = "test-admin-key-0123456789"


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
    from kandinsky_repository.generator.repository import generate_repository

    out = tmp_path_factory.mktemp("tiny-repo") / "model_repository"
    generate_repository(tiny_bundle[0], out)
    return out


@pytest.fixture(scope="session")
def triton_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tritonserver process serving the tiny repository, stopped at the end of the session.

    Its restricted APIs (shared memory, logging, trace, model repository) need TEST_ADMIN_KEY.
    """
    log = tmp_path_factory.mktemp("triton") / "server.log"
    with local_triton_server(tiny_repository, log) as server:
        yield server
    logging.getLogger(__name__).info("server log: %s", log)


def local_triton_server(repository: Path, log: Path):
    """A TritonServer (not started) on free loopback ports, its restricted APIs behind TEST_ADMIN_KEY."""
    from kandinsky_repository.admin import AdminKey
    from kandinsky_repository.serving.triton import TritonServer

    return TritonServer(
        repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        admin_key=AdminKey(TEST_ADMIN_KEY, "tests"),
        log_file=log,
    )


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


@pytest.fixture(scope="session")
def nginx_with_njs() -> None:
    """Skip (with the reason) where nginx or its njs module is missing; `bash .ci/run` installs both."""
    from kandinsky_repository.gateway.nginx import GatewayUnavailable, find_nginx, njs_load_module

    try:
        njs_load_module(find_nginx())
    except GatewayUnavailable as error:
        pytest.skip(f"no gateway here: {error}")


TICKER_MODEL = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    \"\"\"Decoupled test model: `count` responses, `delay` seconds apart, each echoing `text`.\"\"\"

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)[0]
            count = int(pb_utils.get_input_tensor_by_name(request, "count").as_numpy().reshape(-1)[0])
            delay = float(pb_utils.get_input_tensor_by_name(request, "delay").as_numpy().reshape(-1)[0])
            for index in range(count):
                if index:
                    time.sleep(delay)
                value = np.array([text + b" " + str(index).encode()], dtype=np.object_)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("text", value)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""

TICKER_CONFIG = """
name: "ticker"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input { name: "text" data_type: TYPE_STRING dims: [ 1 ] }
input { name: "count" data_type: TYPE_INT32 dims: [ 1 ] }
input { name: "delay" data_type: TYPE_FP32 dims: [ 1 ] }
output { name: "text" data_type: TYPE_STRING dims: [ 1 ] }
instance_group { kind: KIND_CPU count: 1 }
"""


@pytest.fixture(scope="session")
def ticker_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one tiny decoupled python model (`ticker`): streaming and stub tests."""
    root = tmp_path_factory.mktemp("ticker") / "repository"
    (root / "ticker" / "1").mkdir(parents=True)
    (root / "ticker" / "config.pbtxt").write_text(TICKER_CONFIG)
    (root / "ticker" / "1" / "model.py").write_text(TICKER_MODEL)
    return root


@pytest.fixture(scope="session")
def server_loop_clients(triton_server):
    """Clients whose generations run on the server (the `kandinsky` model), by protocol."""
    from kandinsky_client.pipeline import KandinskyClient

    clients = {
        "grpc": KandinskyClient(triton_server.grpc_url, "grpc", loop="server"),
        "http": KandinskyClient(triton_server.http_url, "http", loop="server"),
    }
    yield clients
    for c in clients.values():
        c.close()
