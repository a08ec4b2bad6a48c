"""`kandinsky-serve`: Triton on a generated repository, safe by default, supervised, deeply health-checked.

Where `tritonserver` is on PATH (the NGC Triton image) it is used as is. Elsewhere the server from the
nvidia-pytriton wheel is used: its python backend is copied to a writable cache with the stub for the
running Python version beside `libtriton_python.so`, and the current interpreter's `bin/` goes first on
PATH so python models import numpy, onnxruntime and this package from the same environment.

What `kandinsky-serve` adds around tritonserver (see the README's Security section):
- it listens on `--host` (127.0.0.1 unless told otherwise) for HTTP, gRPC and metrics;
- shared-memory, logging, trace and model-repository APIs need the admin key (`admin.py`);
- a supervisor restarts tritonserver when it or a python-backend stub dies (`supervisor.py`);
- deep readiness on `--health-port` (`health.py`), waited for before "Triton is serving";
- with `--gateway`, nginx listens on the HTTP/gRPC ports and Triton on internal loopback ports
  (`gateway.py`);
- ONNX Runtime's TensorRT engine cache (`--ort-tensorrt` repositories) is built before serving, without
  the ready timeout, or the start stops when it cannot be (`ort_trt_cache.py`); `--build-ort-trt-cache`
  only builds it (the prepare step).
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
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .admin import AdminKey, resolve_admin_key
from .settings import DEFAULTS

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

    `host` is the address Triton binds for HTTP, gRPC and metrics (loopback by default). With an
    `admin_key`, the APIs of `DEFAULTS.restricted_apis` need its header (kandinsky-serve always sets one;
    tests and benchmarks that start servers directly may leave them open). `start()` may be called again
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
        admin_key: AdminKey | None = None,
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
        self.admin_key = admin_key
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
            f"--metrics-address={self.host}",
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
            cmd += self.admin_key.triton_args()
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


def _parser() -> argparse.ArgumentParser:
    from .gateway import add_gateway_arguments

    parser = argparse.ArgumentParser(description="Serve a Kandinsky 2.2 model repository with Triton.")
    parser.add_argument("--repository", type=Path, required=True, help="generated model repository")
    parser.add_argument(
        "--host",
        default=DEFAULTS.host,
        help="address to listen on (HTTP, gRPC, metrics; the gateway's with --gateway); 0.0.0.0: every interface",
    )
    parser.add_argument("--http-port", type=int, default=DEFAULTS.http_port)
    parser.add_argument("--grpc-port", type=int, default=DEFAULTS.grpc_port)
    parser.add_argument("--metrics-port", type=int, default=DEFAULTS.metrics_port)
    parser.add_argument("--health-port", type=int, default=DEFAULTS.health_port, help="deep health endpoint")
    parser.add_argument("--health-host", default=DEFAULTS.health_host, help="its address")
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        help=f"read (or create) the admin key there; ${DEFAULTS.admin_key_env} wins; neither: random per start",
    )
    parser.add_argument("--gateway", action="store_true", help="serve through nginx (see kandinsky-gateway)")
    add_gateway_arguments(parser)
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    parser.add_argument(
        "--log-file",
        type=Path,
        help="Triton's log (default: <temporary folder>/kandinsky22/triton-<http port>.log; its end is "
        "printed when Triton fails to start)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        help=f"seconds to wait for models (default {DEFAULTS.ready_timeout_s:.0f}; with --build-ort-trt-cache: "
        "no limit)",
    )
    parser.add_argument(
        "--build-ort-trt-cache",
        action="store_true",
        help="only build ONNX Runtime's TensorRT engine cache of an --ort-tensorrt repository (load its "
        "accelerated models once on loopback, then stop): the prepare step",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from .gateway import Gateway, GatewayUnavailable, address, options_from_arguments
    from .health import HealthServer
    from .ort_trt_cache import build_cache, cache_state, not_built_message
    from .supervisor import Supervisor

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.build_ort_trt_cache:
        try:
            built = build_cache(args.repository, timeout=args.ready_timeout, log_file=args.log_file)
        except (RuntimeError, TimeoutError, OSError) as error:
            print(f"kandinsky-serve: ONNX Runtime's TensorRT engine cache: {error}", file=sys.stderr)
            return 1
        print(f"ONNX Runtime's TensorRT engine cache built for {len(built)} models", flush=True)
        return 0
    # An engine cache still to build: here, without the ready timeout (a build takes longer, and a timed-out
    # start left nothing in the cache), or not at all where it cannot be stored.
    cache = cache_state(args.repository)
    if cache.needed and not cache.writable():
        print(f"kandinsky-serve: {not_built_message(cache)}", file=sys.stderr)
        return 2
    try:
        admin_key = resolve_admin_key(args.admin_key_file)
    except (ValueError, OSError) as error:
        print(f"kandinsky-serve: admin key: {error}", file=sys.stderr)
        return 2
    internal = args.gateway  # Triton on loopback ports of its own, nginx on the public ones
    server = TritonServer(
        args.repository,
        host="127.0.0.1" if internal else args.host,
        http_port=free_port() if internal else args.http_port,
        grpc_port=free_port() if internal else args.grpc_port,
        metrics_port=args.metrics_port,
        admin_key=admin_key,
        log_verbose=args.log_verbose,
        log_file=args.log_file,
    )
    gateway = None
    if args.gateway:
        gateway = Gateway(
            options_from_arguments(
                args,
                triton_http=server.http_url,
                triton_grpc=server.grpc_url,
                health=address(
                    server.local_host if args.health_host in ("0.0.0.0", "::") else args.health_host,
                    args.health_port,
                ),
                repository=server.repository,
                admin_key=admin_key,
                host=args.host,
                http_port=args.http_port,
                grpc_port=args.grpc_port,
            ),
            args.gateway_runtime_dir,
        )
    ready_timeout = DEFAULTS.ready_timeout_s if args.ready_timeout is None else args.ready_timeout
    supervisor = Supervisor(server, ready_timeout_s=ready_timeout, gateway=gateway)

    def request_stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds to the `finally` below, wherever the main loop is

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    health = None
    try:
        try:
            health = HealthServer(
                args.health_host, args.health_port, supervisor.readiness, supervisor.liveness
            )
        except OSError as error:
            raise OSError(
                f"health endpoint {args.health_host}:{args.health_port}: {error.strerror}"
            ) from error
        health.start()
        if gateway is not None:
            gateway.prepare()  # fail before loading models when nginx or njs is missing
        if cache.needed:
            build_cache(args.repository, timeout=None, log_file=args.log_file)
        models = supervisor.start()
        if gateway is not None:
            gateway.start()
            gateway.wait_listening()
        http_url = gateway.http_url if gateway else server.http_url
        grpc_url = gateway.grpc_url if gateway else server.grpc_url
        print(f"Triton is serving {len(models)} models: {', '.join(models)}", flush=True)
        via = f" (gateway; Triton on {server.http_url} / {server.grpc_url})" if gateway else ""
        print(f"  HTTP    {http_url}\n  gRPC    {grpc_url}{via}", flush=True)
        print(f"  metrics {server.local_host}:{server.metrics_port}/metrics", flush=True)
        print(f"  health  http://{args.health_host}:{health.port}/health/ready", flush=True)
        print(f"  admin key: {admin_key.source}", flush=True)
        print("Ctrl-C or SIGTERM stops it.", flush=True)
        supervisor.run()
        return 0
    except (GatewayUnavailable, RuntimeError, TimeoutError, OSError) as error:
        print(f"kandinsky-serve: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the shutdown
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        supervisor.stop()
        if health is not None:
            health.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
