"""Helpers for tests that run `kandinsky-serve` as users do (a child process) and talk raw HTTP to it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kandinsky_repository.serving.triton import free_port

from .conftest import TEST_ADMIN_KEY


def generate_once(client) -> None:
    """One small text-to-image generation; the only line that knows the client's generation API."""
    result = client.text_to_image(
        "a cat", height=64, width=64, prior_num_inference_steps=2, num_inference_steps=2
    )
    assert result.images[0].size == (64, 64)


def http(
    method: str,
    url: str,
    body: bytes | str | dict | None = None,
    headers: dict | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict | str]:
    """(status, JSON body or text) of one request; HTTP errors are answers too."""
    if isinstance(body, dict):
        body = json.dumps(body)
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate()` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met after {timeout:.0f}s")


@dataclass
class Served:
    """A running `kandinsky-serve` child process and its ports."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    health_port: int
    openai_port: int
    log_file: Path
    lines: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def health(self) -> tuple[int, dict]:
        try:
            return http("GET", f"http://127.0.0.1:{self.health_port}/health/ready", timeout=10)
        except OSError as error:
            return 0, {"error": str(error)}

    def _internal_ports(self) -> tuple[int, int] | None:
        """Triton's (HTTP, gRPC) ports behind the gateway, as kandinsky-serve prints them (None: none)."""
        found = re.search(r"Triton on 127\.0\.0\.1:(\d+) / 127\.0\.0\.1:(\d+)\)", self.output)
        return (int(found[1]), int(found[2])) if found else None

    def triton_http_port(self) -> int:
        """Triton's own HTTP port (an internal one behind the gateway)."""
        ports = self._internal_ports()
        return ports[0] if ports else self.http_port

    def triton_grpc_port(self) -> int:
        """Triton's own gRPC port (an internal one behind the gateway)."""
        ports = self._internal_ports()
        return ports[1] if ports else self.grpc_port

    def nginx_master(self) -> int | None:
        """The gateway's nginx master process (a child of kandinsky-serve), if one runs."""
        for pid in subprocess.run(
            ["pgrep", "-P", str(self.process.pid), "nginx"], capture_output=True, text=True
        ).stdout.split():
            return int(pid)
        return None

    def wait_recovered(self, recoveries: int, timeout: float = 180.0) -> dict:
        """The health report once deep-ready with at least `recoveries` recoveries behind it."""

        def done() -> dict | None:
            status, report = self.health()
            ok = status == 200 and report.get("recoveries", 0) >= recoveries
            return report if ok else None

        return wait_for(done, timeout, what=f"deep readiness after {recoveries} recoveries")

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM; seconds until the process exited."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout)
        return time.monotonic() - started


PORT_FLAGS = ("--http-port", "--grpc-port", "--metrics-port", "--health-port", "--openai-port")


def serve_command(repository: Path, log_file: Path, ports: list[int], *extra: str) -> list[str]:
    """The `kandinsky-serve` command line on `ports` (one per PORT_FLAGS)."""
    flags = [str(value) for pair in zip(PORT_FLAGS, ports, strict=True) for value in pair]
    return [
        sys.executable,
        "-m",
        "kandinsky_repository.serving.server",
        "--repository",
        str(repository),
        *flags,
        "--log-file",
        str(log_file),
        *extra,
    ]


def start_serve(repository: Path, log_dir: Path, *extra: str, timeout: float = 240.0) -> Served:
    """`kandinsky-serve` on free ports with TEST_ADMIN_KEY (its defaults otherwise: the gateway in front);
    returns once it prints "Triton is serving"."""
    ports = [free_port() for _ in PORT_FLAGS]
    log_file = log_dir / "triton.log"
    command = serve_command(repository, log_file, ports, *extra)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "KANDINSKY_ADMIN_KEY": TEST_ADMIN_KEY},
    )
    served = Served(process, *ports, log_file)

    def read() -> None:
        for line in process.stdout:
            served.lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(
            lambda: "Triton is serving" in served.output or process.poll() is not None,
            timeout,
            what="kandinsky-serve start",
        )
    except TimeoutError:
        served.stop()
        raise
    if process.poll() is not None:
        raise RuntimeError(f"kandinsky-serve exited with {process.returncode}:\n{served.output}")
    return served
