"""Every default of `kandinsky-serve`, its supervisor, its health endpoint and the gateway, in one table.

The command-line options, the generated nginx configuration, the repository generator's queue limits,
the Docker entrypoint (which passes no numbers) and the README's Security section all read these values;
nothing else spells them. Size limits that depend on the served checkpoint (the gateway's body cap) are
computed from the component registry in `gateway_limits.py`; the client-facing limits (image sides,
prompt bytes, images per request) live in the registry (`kandinsky_core.components`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Defaults:
    # -- where the server listens ---------------------------------------------------------------------
    host: str = "127.0.0.1"  # loopback only unless `--host` says otherwise (0.0.0.0 in the container)
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    health_port: int = 8003  # kandinsky-serve's deep health endpoint (GET /health/ready, /health/live)
    health_host: str = "127.0.0.1"
    openai_port: int = 8004  # kandinsky-openai: the OpenAI Images API (/v1/images/...) and the playground (/)

    # -- Triton's restricted APIs: these need the admin key header ------------------------------------
    # (statistics, metadata, model config, health and inference stay open: clients and benchmarks use
    # them)
    restricted_apis: tuple[str, ...] = ("shared-memory", "logging", "trace", "model-repository")
    admin_key_header: str = "kandinsky-admin-key"
    admin_key_env: str = "KANDINSKY_ADMIN_KEY"  # unset: a random key per start, never printed

    # -- supervision -----------------------------------------------------------------------------------
    poll_interval_s: float = 0.5  # how often stub processes and the server are checked
    restart_backoff_s: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # n-th restart in a row
    healthy_reset_s: float = 60.0  # serving this long resets the backoff to its first step
    exit_timeout_s: int = 5  # Triton's --exit-timeout-secs: how long SIGTERM waits for in-flight work
    stop_grace_s: float = 10.0  # SIGKILL after this long (immediately when a stub has died)
    ready_timeout_s: float = 300.0  # first start: models must be ready within this

    # -- repository: bounded queues ----------------------------------------------------------------------
    # Requests waiting per model; more are refused at once (UNAVAILABLE, retryable). Bounds what queued
    # inputs can hold: at the largest request (64 MiB of images) 32 waiting requests hold ~2 GiB.
    max_queue_size: int = 32

    # -- server-side generation (the `kandinsky` model) ------------------------------------------------------
    # Generations running at once (threads sharing the per-step models' batches), generations waiting for
    # one of them (more are refused at once as "server busy"), and the time limit of one generation.
    max_concurrent_generations: int = 8
    max_queued_generations: int = 32
    max_generation_seconds: float = 600.0

    # -- gateway -----------------------------------------------------------------------------------------
    gateway_token_env: str = "KANDINSKY_GATEWAY_TOKEN"  # bearer token required when set
    # Per client address. The client runs the denoising loop itself: one image is ~100 requests (25 prior
    # + 50 decoder steps + encoders), ~20-50 requests/s per generation on a GPU; a few concurrent
    # generations from one address (a backend, a NAT) stay well below this.
    rate_per_s: int = 200
    burst: int = 400
    # Requests in flight at once per client address (a gRPC stream or HTTP request each): a client-loop
    # generation has one step in flight, a server-loop generation one stream. Bounds what one address can
    # queue at the per-step models, which have no Triton queue bound (see generate.limit_queue).
    max_in_flight: int = 64
    rate_zone_mb: int = 10  # ~160k client addresses tracked
    upstream_connect_timeout_s: int = 5
    upstream_timeout_s: int = 600  # a request or stream may take this long between two reads
    worker_connections: int = 1024
    keepalive_connections: int = 32  # idle connections kept open to Triton (per replica)
    # Several Triton replicas behind one gateway (Kubernetes: a headless Service): a request that cannot
    # reach its replica (refused, reset, connect timeout, 502-504) goes to the next one, at most
    # `upstream_tries` replicas in all and only within `upstream_retry_window_s` of its start (a long
    # generation is not run twice: the client retries it whole); a replica that failed is skipped for
    # `upstream_fail_timeout_s`. One replica: no retry (nginx never marks a single server down).
    upstream_tries: int = 3
    upstream_retry_window_s: int = 10
    upstream_fail_timeout_s: int = 10
    # `kandinsky-gateway --resolve-interval`: how often a replica host name (a headless Service) is looked
    # up again; nginx is reloaded (gracefully) when its addresses change. 0: nginx resolves names once.
    resolve_interval_s: float = 5.0


DEFAULTS = Defaults()
