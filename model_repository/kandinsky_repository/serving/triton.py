"""A tritonserver child process: where the binary is, its ports, its log, start, readiness and stop.

Where `tritonserver` is on PATH (the NGC Triton image) it is used as is. Elsewhere the server from the
nvidia-pytriton wheel is used: its python backend is copied to a writable cache with the stub for the
running Python version beside `libtriton_python.so`, and the current interpreter's `bin/` goes first on
PATH so python models import numpy, onnxruntime and this package from the same environment.

Used by `kandinsky-serve` (`server.py`, through the supervisor), the engine-cache build, the tests and
the benchmarks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..admin import AdminKey
from ..settings import DEFAULTS

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": DEFAULTS.http_port, "grpc": DEFAULTS.grpc_port, "metrics": DEFAULTS.metrics_port}
LOG_TAIL_LINES = 40  # of the Triton log, in the error when the server fails to start


def default_log_file(http_port: int) -> Path:
    """Where Triton's log goes unless told: a file per HTTP port under the temporary folder (writable in
    the containers, whose root filesystem may be read-only), appended to across restarts."""
    return Path(tempfile.gettempdir()) / "kandinsky22" / f"triton-{http_port}.log"


def log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines written to `path` after byte `offset` (empty when there is none)."""
    try:
        with Path(path).open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


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
    """A tritonserver child process in its own process group (so stopping it also stops the stubs).

    `host` is the address Triton binds for HTTP, gRPC and (unless `metrics_host` says otherwise) metrics
    (loopback by default). With an
    `admin_key`, the APIs of `restricted_apis` (`DEFAULTS.restricted_apis` unless told) need its header
    (kandinsky-serve always sets one, and behind its gateway restricts inference too; tests and
    benchmarks that start servers directly may leave them open). `start()` may be called again
    after the process died (the supervisor restarts it on the same ports). With `models`, only those are
    loaded (Triton's explicit model control) and waited for.
    """

    def __init__(
        self,
        repository: Path,
        *,
        http_port: int = DEFAULT_PORTS["http"],
        grpc_port: int = DEFAULT_PORTS["grpc"],
        metrics_port: int = DEFAULT_PORTS["metrics"],
        host: str = DEFAULTS.host,
        metrics_host: str | None = None,
        admin_key: AdminKey | None = None,
        restricted_apis: tuple[str, ...] = DEFAULTS.restricted_apis,
        exit_timeout_s: int = DEFAULTS.exit_timeout_s,
        log_verbose: int = 0,
        log_file: Path | None = None,
        models: Sequence[str] | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not repository_models(self.repository):
            raise FileNotFoundError(f"{self.repository} holds no model (no */config.pbtxt)")
        self.models = None if models is None else list(models)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.metrics_host = metrics_host or host  # (behind the gateway Triton's HTTP/gRPC are internal)
        self.admin_key = admin_key
        self.restricted_apis = restricted_apis
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.log_file = Path(log_file) if log_file else default_log_file(http_port)
        self._log_offset = 0  # where this start's lines begin in the log
        self.process: subprocess.Popen | None = None
        self.started_at: float | None = None  # time.time() of the last start

    @property
    def local_host(self) -> str:
        """Where a client on this machine reaches the server."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    @property
    def http_url(self) -> str:
        return f"{self.local_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.local_host}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.metrics_host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        if self.models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={name}" for name in self.models]
        if self.admin_key is not None:
            cmd += self.admin_key.triton_args(self.restricted_apis)
        if install.backend_dir:
            cmd.append(f"--backend-directory={install.backend_dir}")
        return cmd

    def start(self) -> None:
        install = find_triton()
        env = {**os.environ, **install.env}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        output = open(self.log_file, "ab")  # noqa: SIM115 - lives with the child
        self._log_offset = output.tell()
        command = self.command(install)
        shown = [a.split(":", 1)[0] + ":<admin key>" if "restricted" in a else a for a in command]
        logger.info("starting %s (log: %s)", " ".join(shown), self.log_file)
        self.started_at = time.time()
        try:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            output.close()  # the child holds its own descriptor

    def log_since_start(self) -> str:
        """The end of what Triton logged since the last start, for error messages."""
        tail = log_tail(self.log_file, self._log_offset)
        return f"; the end of {self.log_file}:\n{tail}" if tail else f"; see {self.log_file}"

    def wait_ready(self, timeout: float | None = 180.0) -> list[str]:
        """Block until the server and every model it loads are ready; return the model names.

        `timeout` None: no limit (the wait still ends when tritonserver exits).
        """
        import tritonclient.http as httpclient

        models = repository_models(self.repository) if self.models is None else list(self.models)
        client = httpclient.InferenceServerClient(self.http_url)
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(models)
        try:
            while deadline is None or time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"tritonserver exited with code {self.process.returncode} while loading models"
                        + self.log_since_start()
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
        raise TimeoutError(f"models not ready after {timeout:.0f}s: {pending}{self.log_since_start()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group (server and python stubs), SIGKILL what is left after `timeout`
        (at once when `timeout` is 0)."""
        if self.process is None:
            return
        group = self.process.pid
        if self.process.poll() is None and timeout > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop in %.0fs; killing it", timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # stray stubs, if any; everything when timeout is 0
        self.process.wait()

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (the supervisor's recovery: nothing to save)."""
        self.stop(timeout=0)

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
