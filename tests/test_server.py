"""The server command starts Triton, waits for every model, and stops without leaving processes behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kandinsky_client.pipeline import KandinskyClient
from kandinsky_core.errors import ModelNotReady
from kandinsky_repository.serving.triton import TritonServer, repository_models

from .conftest import free_port


def _group_alive(pgid: int) -> list[int]:
    """Pids still in process group `pgid` (the server and its python backend stubs)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            alive.append(int(entry.name))
    return alive


def test_serve_command_stops_cleanly_on_sigterm(tiny_repository, tmp_path):
    ports = [free_port(), free_port(), free_port(), free_port()]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kandinsky_repository.serving.server",
            "--repository",
            str(tiny_repository),
            "--http-port",
            str(ports[0]),
            "--grpc-port",
            str(ports[1]),
            "--metrics-port",
            str(ports[2]),
            "--health-port",
            str(ports[3]),
            "--log-file",
            str(tmp_path / "server.log"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "Triton is serving" in line or process.poll() is not None:
            break
    assert any("Triton is serving" in line for line in lines), "".join(lines)
    assert all(m in "".join(lines) for m in repository_models(tiny_repository))
    children = subprocess.run(
        ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 1, "one tritonserver child"
    server_group = os.getpgid(int(children[0]))
    assert len(_group_alive(server_group)) > 1, "the server runs python backend stubs in its group"

    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "stopped" in out
    assert _group_alive(server_group) == []


def test_missing_model_is_reported_by_name(tiny_repository, tmp_path):
    partial = tmp_path / "repository"
    shutil.copytree(tiny_repository, partial, symlinks=True)
    for model in ("decode_image", "movq_decoder"):
        shutil.rmtree(partial / model)
    with TritonServer(
        partial, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    ) as server:
        with KandinskyClient(server.grpc_url) as client, pytest.raises(ModelNotReady, match="decode_image"):
            client.text_to_image(
                "a cat", height=64, width=64, prior_num_inference_steps=2, num_inference_steps=2
            )
        group = os.getpgid(server.process.pid)
    assert _group_alive(group) == []


def test_server_refuses_an_empty_repository(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model"):
        TritonServer(tmp_path)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_one_client_serves_every_thread(triton_server, protocol: str) -> None:
    """A client opened in one thread and used from others (what a web app's worker pool does): over HTTP
    tritonclient's gevent connections belong to the thread that opened them and failed elsewhere with
    "Cannot switch to a different thread"."""
    import threading

    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    errors: list[BaseException] = []

    def use(client: KandinskyClient) -> None:
        try:
            for _ in range(3):
                client.transport.model_parameters("unet")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    with KandinskyClient(url, protocol=protocol) as client:
        threads = [threading.Thread(target=use, args=(client,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        use(client)
    assert not errors, errors[0]
