"""`kandinsky-serve`: Triton on a generated repository, safe by default, supervised, deeply health-checked.

The tritonserver process itself is `triton.py`.

What `kandinsky-serve` adds around tritonserver (see the README's Security section):
- the gateway (nginx + njs, `gateway/`) listens on `--host` (127.0.0.1 unless told otherwise) on the HTTP
  and gRPC ports and checks every request before Triton reads it; Triton listens on internal loopback
  ports, where inference needs the admin key, which only the gateway adds. Triton's request readers
  crash on some requests (a declared shape allocated before the data is counted, deep JSON nesting,
  shapes whose product overflows): no port of a default kandinsky-serve lets one reach them.
  `--no-gateway` (or KANDINSKY_GATEWAY=none: the Docker and Kubernetes setups, which run
  kandinsky-gateway separately) puts Triton itself on those ports, with a warning;
- the OpenAI Images API and the playground page (`openai_api/`) on `--openai-host`:`--openai-port`
  (127.0.0.1:8004), and through the gateway at /v1/ and /; same token as the gateway's;
- shared-memory, logging, trace and model-repository APIs need the admin key (`admin.py`);
- a supervisor restarts tritonserver when it or a python-backend stub dies, and the OpenAI app when its
  thread ended (`supervisor.py`);
- deep readiness on `--health-port` (`health.py`), waited for before "Triton is serving";
- a tensorrt repository whose engines do not fit the GPU's free memory is refused before Triton starts
  (`device_memory.py`);
- ONNX Runtime's TensorRT engine cache (`--ort-tensorrt` repositories) is built before serving, without
  the ready timeout, or the start stops when it cannot be (`ort_trt_cache.py`); `--build-ort-trt-cache`
  only builds it (the prepare step).
"""

from __future__ import annotations

import argparse
import logging
import os
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
        help="address to listen on (the gateway's HTTP and gRPC; Triton's own with --no-gateway, metrics too); "
        "0.0.0.0: every interface",
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
    parser.add_argument(
        "--gateway",
        dest="gateway",
        action="store_true",
        default=None,
        help=f"serve through the gateway, nginx + njs (the default unless ${DEFAULTS.gateway_env}=none)",
    )
    parser.add_argument(
        "--no-gateway",
        dest="gateway",
        action="store_false",
        help="Triton itself on the HTTP and gRPC ports, taking requests unchecked (some crash it): only "
        "behind a separate kandinsky-gateway or for trusted clients",
    )
    add_gateway_arguments(parser)
    parser.add_argument(
        "--openai-port",
        type=int,
        default=DEFAULTS.openai_port,
        help="the OpenAI Images API (/v1/...) and the playground page (/), also served through the gateway's "
        "HTTP port; 0: not served",
    )
    parser.add_argument(
        "--openai-host",
        default=DEFAULTS.host,
        help="its address (loopback by default, whatever --host says: the gateway is the way in)",
    )
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


def _use_gateway(flag: bool | None) -> bool:
    """--gateway / --no-gateway, else $KANDINSKY_GATEWAY ("nginx", the default, or "none")."""
    if flag is not None:
        return flag
    value = os.environ.get(DEFAULTS.gateway_env, "").strip().lower() or "nginx"
    if value not in ("nginx", "none"):
        raise ValueError(f"${DEFAULTS.gateway_env} is '{value}'; it must be nginx or none")
    return value == "nginx"


def _no_gateway_warning(host: str, http_port: int, grpc_port: int) -> str:
    return (
        f"kandinsky-serve: WARNING: no gateway (--no-gateway or ${DEFAULTS.gateway_env}=none): Triton's own "
        f"HTTP ({host}:{http_port}) and gRPC ({host}:{grpc_port}) readers take requests unchecked, and some "
        "malformed ones crash it (the supervisor restarts it; requests in flight fail). Keep these ports "
        "behind kandinsky-gateway (as the Docker compose file and the Helm chart do) or to trusted clients."
    )


def main(argv: list[str] | None = None) -> int:
    from ..gateway.nginx import Gateway, GatewayUnavailable, address, loopback_for, options_from_arguments
    from ..openai_api.server import OpenAIServer
    from .device_memory import device_memory_problem
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
    problem = device_memory_problem(args.repository)
    if problem:
        print(f"kandinsky-serve: {problem}", file=sys.stderr)
        return 2
    try:
        admin_key = resolve_admin_key(args.admin_key_file)
    except (ValueError, OSError) as error:
        print(f"kandinsky-serve: admin key: {error}", file=sys.stderr)
        return 2
    try:
        internal = _use_gateway(args.gateway)  # Triton on loopback ports of its own, nginx on the public ones
    except ValueError as error:
        print(f"kandinsky-serve: {error}", file=sys.stderr)
        return 2
    server = TritonServer(
        args.repository,
        host="127.0.0.1" if internal else args.host,
        http_port=free_port() if internal else args.http_port,
        grpc_port=free_port() if internal else args.grpc_port,
        metrics_port=args.metrics_port,
        metrics_host=args.host,  # GET /metrics only, nothing parsed: on --host, as without the gateway
        admin_key=admin_key,
        # behind the gateway, only what it checked (and keyed) reaches Triton's inference readers
        restricted_apis=DEFAULTS.restricted_apis + (DEFAULTS.gateway_restricted_apis if internal else ()),
        log_verbose=args.log_verbose,
        log_file=args.log_file,
    )
    openai = None
    if args.openai_port:
        openai = OpenAIServer(
            server.grpc_url,
            host=args.openai_host,
            port=args.openai_port,
            token=args.gateway_token,
            # behind the gateway Triton's inference APIs need the key; the app checks every request itself
            headers={admin_key.grpc_header: admin_key.key},
        )
    gateway = None
    if internal:
        try:
            gateway = Gateway(
                options_from_arguments(
                    args,
                    triton_http=server.http_url,
                    triton_grpc=server.grpc_url,
                    health=address(
                        server.local_host if args.health_host in ("0.0.0.0", "::") else args.health_host,
                        args.health_port,
                    ),
                    openai=address(loopback_for(args.openai_host), args.openai_port) if openai else None,
                    repository=server.repository,
                    admin_key=admin_key,
                    host=args.host,
                    http_port=args.http_port,
                    grpc_port=args.grpc_port,
                ),
                args.gateway_runtime_dir,
            )
        except GatewayUnavailable as error:
            print(
                f"kandinsky-serve: the gateway: {error}.\nWithout it Triton would take requests unchecked; "
                "to serve so anyway (trusted clients only), add --no-gateway.",
                file=sys.stderr,
            )
            return 2
    else:
        print(_no_gateway_warning(args.host, args.http_port, args.grpc_port), file=sys.stderr, flush=True)
    ready_timeout = DEFAULTS.ready_timeout_s if args.ready_timeout is None else args.ready_timeout
    supervisor = Supervisor(server, ready_timeout_s=ready_timeout, gateway=gateway, openai=openai)

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
        if openai is not None:
            openai.start()
        if gateway is not None:
            gateway.start()
            gateway.wait_listening()
        http_url = gateway.http_url if gateway else server.http_url
        grpc_url = gateway.grpc_url if gateway else server.grpc_url
        print(f"Triton is serving {len(models)} models: {', '.join(models)}", flush=True)
        via = f" (gateway; Triton on {server.http_url} / {server.grpc_url})" if gateway else ""
        print(f"  HTTP    {http_url}\n  gRPC    {grpc_url}{via}", flush=True)
        if openai is not None:
            through = f" (and http://{http_url}/v1)" if gateway else ""
            print(
                f"  OpenAI  {openai.url}{through}; playground http://{openai.host}:{openai.port}/", flush=True
            )
        print(f"  metrics {loopback_for(args.host)}:{server.metrics_port}/metrics", flush=True)
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
