"""Start a Triton Inference Server on a generated repository, wait until every model is ready, stop cleanly.

Where `tritonserver` is on PATH (the NGC Triton image) it is used as is. Elsewhere the server from the
nvidia-pytriton wheel is used: its python backend is copied to a writable cache with the stub for the
running Python version beside `libtriton_python.so`, and the current interpreter's `bin/` goes first on
PATH so python models import numpy, onnxruntime and this package from the same environment.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path | None
    env: dict[str, str] = field(default_factory=dict)


def _pytriton_install(cache_dir: Path) -> TritonInstall:
    try:
        import pytriton
    except ImportError as error:
        raise RuntimeError(
            "no `tritonserver` on PATH and nvidia-pytriton is not installed: "
            "`pip install nvidia-pytriton` (CPU) or use the NGC Triton image (GPU)"
        ) from error
    root = Path(pytriton.__file__).parent / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton ships no python backend stub for Python {version}")
    backend_dir = cache_dir / f"triton-backends-py{version}"
    python_dir = backend_dir / "python"
    if not (python_dir / "triton_python_backend_stub").exists():
        if backend_dir.exists():
            shutil.rmtree(backend_dir)
        shutil.copytree(root / "backends", backend_dir)
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    env = {
        "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")])),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    return TritonInstall(root / "bin" / "tritonserver", backend_dir, env)


def find_triton(cache_dir: Path | None = None) -> TritonInstall:
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None)
    cache = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kandinsky22"
    return _pytriton_install(cache)


def free_port() -> int:
    """A TCP port free on loopback now, for servers started by tests and benchmarks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repository_models(repository: Path) -> list[str]:
    return sorted(p.name for p in Path(repository).iterdir() if (p / "config.pbtxt").is_file())


class TritonServer:
    """A tritonserver child process in its own process group (so stopping it also stops the stubs)."""

    def __init__(
        self,
        repository: Path,
        *,
        http_port: int = DEFAULT_PORTS["http"],
        grpc_port: int = DEFAULT_PORTS["grpc"],
        metrics_port: int = DEFAULT_PORTS["metrics"],
        log_verbose: int = 0,
        log_file: Path | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not repository_models(self.repository):
            raise FileNotFoundError(f"{self.repository} holds no model (no */config.pbtxt)")
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_verbose = log_verbose
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            "--exit-on-error=true",
            "--strict-readiness=true",
        ]
        if install.backend_dir:
            cmd.append(f"--backend-directory={install.backend_dir}")
        return cmd

    def start(self) -> None:
        install = find_triton()
        env = {**os.environ, **install.env}
        output = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115 - lives with the child
        logger.info("starting %s", " ".join(self.command(install)))
        self.process = subprocess.Popen(
            self.command(install),
            env=env,
            stdout=output or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if output else subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180.0) -> list[str]:
        """Block until the server and every model of the repository are ready; return the model names."""
        import tritonclient.http as httpclient

        models = repository_models(self.repository)
        client = httpclient.InferenceServerClient(self.http_url)
        deadline = time.monotonic() + timeout
        pending = list(models)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"tritonserver exited with code {self.process.returncode} while loading models"
                        + (f"; see {self.log_file}" if self.log_file else "")
                    )
                try:
                    if client.is_server_live():
                        pending = [m for m in pending if not client.is_model_ready(m)]
                        if not pending and client.is_server_ready():
                            return models
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()  # an open keep-alive connection would hold up the server's shutdown
        raise TimeoutError(f"models not ready after {timeout:.0f}s: {pending}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group (server and python stubs), SIGKILL what is left after `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("tritonserver did not stop in %.0fs; killing it", timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # stray stubs, if any
        self.process.wait()

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a Kandinsky 2.2 model repository with Triton.")
    parser.add_argument("--repository", type=Path, required=True, help="generated model repository")
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"])
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"])
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"])
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    parser.add_argument("--log-file", type=Path, help="server log (default: discarded)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    server = TritonServer(
        args.repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        log_file=args.log_file,
    )

    def request_stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds to the `finally` below, wherever the main loop is

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server.start()
        models = server.wait_ready(args.ready_timeout)
        print(f"Triton is serving {len(models)} models: {', '.join(models)}", flush=True)
        print(f"  HTTP    {server.http_url}\n  gRPC    {server.grpc_url}", flush=True)
        print(f"  metrics localhost:{server.metrics_port}/metrics\nCtrl-C or SIGTERM stops it.", flush=True)
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.2)
        print(f"tritonserver exited with code {server.process.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the shutdown
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
