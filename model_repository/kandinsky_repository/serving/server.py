"""`kandinsky-serve`: Triton on a generated repository, safe by default, supervised, deeply health-checked.

The tritonserver process itself is `triton.py`.

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
import logging
import signal
import sys
from pathlib import Path

from ..admin import resolve_admin_key
from ..settings import DEFAULTS
from .triton import TritonServer, free_port

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    from ..gateway.nginx import add_gateway_arguments

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
    from ..gateway.nginx import Gateway, GatewayUnavailable, address, options_from_arguments
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
