"""The server command starts Triton behind its gateway, waits for every model, and stops without leaving
processes behind; without nginx it says how to go on; --no-gateway warns."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from kandinsky_client.pipeline import KandinskyClient
from kandinsky_core.errors import ModelNotReady
from kandinsky_repository.serving.triton import TritonServer, repository_models

from .conftest import free_port
from .serving import PORT_FLAGS, serve_command


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


def _serve_command(repository: Path, log: Path, *extra: str) -> list[str]:
    return serve_command(repository, log, [free_port() for _ in PORT_FLAGS], *extra)


def test_serve_command_stops_cleanly_on_sigterm(nginx_with_njs, tiny_repository, tmp_path):
    process = subprocess.Popen(
        _serve_command(tiny_repository, tmp_path / "server.log"),
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
    children = {
        name: subprocess.run(
            ["pgrep", "-P", str(process.pid), name], capture_output=True, text=True
        ).stdout.split()
        for name in ("tritonserver", "nginx")
    }
    assert len(children["tritonserver"]) == 1 and len(children["nginx"]) == 1, children
    server_group = os.getpgid(int(children["tritonserver"][0]))
    gateway_group = os.getpgid(int(children["nginx"][0]))
    assert len(_group_alive(server_group)) > 1, "the server runs python backend stubs in its group"
    assert len(_group_alive(gateway_group)) > 1, "nginx runs workers in its group"

    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "stopped" in out
    assert _group_alive(server_group) == [] and _group_alive(gateway_group) == []


def test_without_nginx_the_server_says_how_to_go_on(tiny_repository, tmp_path, monkeypatch, capsys):
    """The gateway is the default: where nginx is missing, kandinsky-serve stops before it starts anything
    and names both ways on (install it, or --no-gateway)."""
    from kandinsky_repository.gateway import nginx as gateway_module
    from kandinsky_repository.serving.server import main

    def missing() -> Path:
        raise gateway_module.GatewayUnavailable(f"nginx not found; {gateway_module.INSTALL_HINT}")

    monkeypatch.setattr(gateway_module, "find_nginx", missing)
    assert main(_serve_command(tiny_repository, tmp_path / "server.log")[3:]) == 2
    error = capsys.readouterr().err
    assert "apt-get install nginx libnginx-mod-http-js" in error and "--no-gateway" in error, error


def test_an_unknown_gateway_setting_is_refused(tiny_repository, tmp_path):
    env = {**os.environ, "KANDINSKY_GATEWAY": "haproxy"}
    result = subprocess.run(
        _serve_command(tiny_repository, tmp_path / "server.log"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        result.returncode == 2 and "KANDINSKY_GATEWAY is 'haproxy'; it must be nginx or none" in result.stderr
    )


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
