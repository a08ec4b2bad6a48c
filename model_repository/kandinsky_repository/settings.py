"""Every default of `kandinsky-serve`, its supervisor, its health endpoint and the gateway, in one table.

The command-line options, the generated nginx configuration, the repository generator's queue limits,
the Docker entrypoint (which passes no numbers) and the README's Security section all read these values;
nothing else spells them. Size limits that depend on the served checkpoint (the gateway's body cap) are
computed from the component registry in `gateway/limits.py`; the client-facing limits (image sides,
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
    health_client_timeout_s: float = 10.0  # a client of the health endpoint stalled this long is dropped
    health_discarded_body_bytes: int = 64 << 20  # a body sent to it (405) is read and dropped up to this
    openai_port: int = 8004  # kandinsky-openai: the OpenAI Images API (/v1/images/...) and the playground (/)

    # -- Triton's restricted APIs: these need the admin key header ------------------------------------
    # (statistics, metadata, model config and health stay open: clients and benchmarks use them)
    restricted_apis: tuple[str, ...] = ("shared-memory", "logging", "trace", "model-repository")
    # With the gateway in front (kandinsky-serve's default), inference (infer, generate, the gRPC infer
    # methods) too: Triton's parsers crash on some requests (a declared shape it allocates before it counts
    # the data, deep JSON nesting, shapes whose product overflows), so only requests the gateway checked,
    # to which it adds the key, may reach them. Triton checks the header before it reads the body
    # (`RETURN_AND_RESPOND_IF_RESTRICTED` first in HandleInfer/HandleGenerate, `ExecutePrecondition` in
    # the gRPC handlers; src/http_server.cc and src/grpc/*.cc of Triton 2.51).
    gateway_restricted_apis: tuple[str, ...] = ("inference",)
    admin_key_header: str = "kandinsky-admin-key"
    admin_key_env: str = "KANDINSKY_ADMIN_KEY"  # unset: a random key per start, never printed
    # `kandinsky-serve`'s gateway: "nginx" (the default: nginx + njs on the HTTP and gRPC ports, Triton on
    # internal loopback ports) or "none" (Triton itself on those ports: --no-gateway, for a separate
    # kandinsky-gateway in front, as the Docker compose file and the Helm chart run it).
    gateway_env: str = "KANDINSKY_GATEWAY"

    # -- supervision -----------------------------------------------------------------------------------
    poll_interval_s: float = 0.5  # how often stub processes and the server are checked
    # Delay before the n-th restart of a crash loop: the server failed while loading, or within
    # `crash_loop_window_s` of becoming ready (a broken model, a request retried until it kills it again).
    # A crash after it served longer than that is not a loop: it restarts at once (the load time).
    restart_backoff_s: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
    crash_loop_window_s: float = 10.0
    frontend_restart_interval_s: float = 4.0  # nginx or the OpenAI app exited: restarted at most this often
    exit_timeout_s: int = 5  # Triton's --exit-timeout-secs: how long SIGTERM waits for in-flight work
    stop_grace_s: float = 10.0  # SIGKILL after this long (immediately when a stub has died)
    ready_timeout_s: float = 300.0  # first start: models must be ready within this
    # GPU memory kept free beside what a tensorrt repository's engines reserve (its record): the CUDA
    # context and Triton's pinned (256 MiB) and CUDA (64 MiB) memory pools; checked before Triton starts
    device_memory_margin_bytes: int = 1 << 30

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
    # queue at the per-step models, which have no Triton queue bound (see generator/repository.py: limit_queue).
    max_in_flight: int = 64
    rate_zone_mb: int = 10  # ~160k client addresses tracked
    # Slow clients (per connection; nginx's client_header_timeout, client_body_timeout, send_timeout): a
    # request whose headers or body stall this long between two reads, or a response the client stops
    # reading for this long, is closed (408 for a stalled body). A request counts as in flight only once
    # its body has arrived, so stalled uploads take no address's in-flight slots meanwhile. gRPC streams
    # (ModelStreamInfer: the server-side loop) send nothing for a whole generation after their request:
    # their body timeout is `upstream_timeout_s`.
    client_header_timeout_s: int = 10
    client_body_timeout_s: int = 10
    send_timeout_s: int = 10
    # Triton's HTTP server (2.51, and NGC's builds before 25.08) copies the list of its body's 4 KiB
    # buffers onto its thread's stack (alloca): a body of more than ~1021 of them (4,182,000 bytes, measured
    # here: 4,181,000 served, 4,185,000 SIGSEGV, for infer, binary infer and generate alike) kills it. The
    # gateway's HTTP port therefore takes at most this much (413 above it, naming gRPC, which has no such
    # limit); its gRPC port keeps the body cap computed from the repository (limits.py).
    triton_http_max_body_bytes: int = 3_670_016  # 3.5 MiB
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
