"""The gateway: nginx with its njs module in front of Triton, for anything beyond localhost.

Why nginx and not HAProxy (both are in the distributions' packages): nginx proxies gRPC natively
(`grpc_pass`, with per-method routing on the HTTP/2 path and trailers-only gRPC error responses),
rate-limits per client address (`limit_req`), and its njs module can read a JSON request body and
decide on it before proxying (`js_content` + `r.internalRedirect`), which is what stops the JSON
declared-shape crashes; HAProxy would need Lua for the JSON inspection.

`kandinsky-serve` runs it by default (Triton then listens on internal loopback ports whose inference APIs
need the admin key, which only the gateway adds: no unchecked request reaches Triton's request readers).

What it allows (everything else: 403/404 over HTTP, PERMISSION_DENIED over gRPC, each with a message):
- HTTP/1.1 on `--host`:`--http-port`: with kandinsky-openai behind it (`openai`), the OpenAI Images API
  (`/v1/...`, the token refused as an OpenAI error object) and the playground (`/`, `/playground/`: no
  token, the page sends it with its calls); `POST /v2/models/<m>[/versions/<v>]/infer`, `POST .../generate`
  and `.../generate_stream`, `GET /v2/health/live`, `GET /v2/health/ready` (kandinsky-serve's deep
  readiness, not Triton's), `GET /v2/models/<m>[/versions/<v>][/ready|/config]`, `GET /v2`,
  `POST /v2/repository/index` (read-only; of Triton's admin APIs, the gateway adds the admin key to
  this route only, and to the inference requests it checked: behind kandinsky-serve, Triton's inference
  APIs need it);
- gRPC (HTTP/2 without TLS) on `--host`:`--grpc-port`: ServerLive, ServerReady, ModelReady,
  ServerMetadata, ModelMetadata, ModelConfig, ModelInfer, ModelStreamInfer, RepositoryIndex.
Bodies are capped (`limits.py` says how the cap is computed); every request body is read and checked
before Triton sees it: HTTP bodies and gRPC `ModelInfer` messages by `files/kandinsky_gateway.js` (njs),
`ModelStreamInfer` messages by the stream relay (`relay.py`, a thread of this process on a unix socket).
An optional bearer token is required on both protocols, each client address is rate-limited and has a
bound of requests in flight (429 / RESOURCE_EXHAUSTED), slow clients are cut off (settings.py), and a
Triton that does not answer (restarting) gives 503 + JSON (UNAVAILABLE over gRPC): retryable.

Several Triton replicas (`deploy/`, Kubernetes): `--triton-http`, `--triton-grpc` and `--health-url`
each take one address per replica, or a host name with several addresses (a headless Service), which
the gateway looks up again every `--resolve-interval` seconds, reloading nginx gracefully when the set
changes. nginx balances per request (round robin): every step of a client-side loop may go to any
replica; a server-side generation is one streamed request, so it stays on one replica. A request whose
replica refuses, resets or does not answer before its response starts goes to the next replica, within a
short window (settings.py: `upstream_*`); later failures reach the client, whose retry policy sends the
step or the whole generation again (same seed, same image).

The configuration is rendered from `files/nginx.conf.template` and the defaults of
`settings.py` into a runtime folder at start; nginx runs in the foreground with that folder as its
prefix (pid, temp paths, error log), so it needs no root and touches nothing else. Standalone:
`kandinsky-gateway --triton-http H:P --triton-grpc H:P --health-url URL --repository R` (Docker compose
and the Kubernetes chart run it as its own service; `--write-config DIR` only renders, for other
deployments; they must run the stream relay too, or ModelStreamInfer answers UNAVAILABLE).

nginx runs in its own process group: when its master dies (kill -9), its orphaned workers still hold the
listening sockets, so the group is killed before nginx is started again and when it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
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
from urllib.parse import urlsplit

from ..admin import AdminKey, check_secret, resolve_admin_key
from ..settings import DEFAULTS
from .limits import TRITON_ITEM_BYTES, generate_fields, json_text_limit, read_configs, request_limits
from .relay import StreamRelay

logger = logging.getLogger(__name__)

FILES = Path(__file__).parent / "files"
TEMPLATE = FILES / "nginx.conf.template"
OPENAI_TEMPLATE = FILES / "openai.conf.template"  # the OpenAI API's routes, when `openai` is set
SCRIPT = FILES / "kandinsky_gateway.js"
NJS_MODULE = "ngx_http_js_module.so"
# Where distributions put nginx's dynamic modules (the `--modules-path` of `nginx -V` comes first).
MODULE_DIRS = (
    "/usr/lib/nginx/modules",
    "/usr/lib64/nginx/modules",
    "/usr/share/nginx/modules",
    "/etc/nginx/modules",
    "/usr/local/nginx/modules",
    "/usr/local/lib/nginx/modules",
)
INSTALL_HINT = "install nginx and its njs module (Debian/Ubuntu: apt-get install nginx libnginx-mod-http-js)"
RELAY_SOCKET = "stream-relay.sock"  # the stream relay listens here (in the runtime folder)
CHECKED_SOCKET = "stream-checked.sock"  # nginx takes the relay's checked messages to Triton here
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


class GatewayUnavailable(RuntimeError):
    """nginx or its njs module is missing, or the rendered configuration does not load."""


def host_port(text: str, default_port: int | None = None, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'host:port', 'host' (with `default_port`), ':port' or a URL -> (host, port)."""
    parts = urlsplit(text if "//" in text else f"//{text}")
    port = parts.port or default_port
    if port is None:
        raise ValueError(f"'{text}' has no port")
    return parts.hostname or default_host, port


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def loopback_for(host: str) -> str:
    """Where a local client reaches a server bound to `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


@dataclass(frozen=True)
class GatewayOptions:
    # host:port of each replica's endpoint (one string: one replica, or a name with several addresses)
    triton_http: str | Sequence[str]  # Triton's HTTP endpoint
    triton_grpc: str | Sequence[str]  # Triton's gRPC endpoint
    health: str | Sequence[str]  # kandinsky-serve's health endpoint
    repository: Path  # the served repository: type table and size limits
    # kandinsky-openai's endpoint (kandinsky-serve runs it): /, /playground/ and /v1/ go there; None: 404
    openai: str | Sequence[str] | None = None
    admin_key: AdminKey | None = None  # added to the repository index route only
    host: str = DEFAULTS.host
    http_port: int = DEFAULTS.http_port
    grpc_port: int = DEFAULTS.grpc_port
    token: str | None = None
    rate_per_s: int = DEFAULTS.rate_per_s
    burst: int = DEFAULTS.burst
    max_in_flight: int = DEFAULTS.max_in_flight
    header_timeout_s: int = DEFAULTS.client_header_timeout_s
    body_timeout_s: int = DEFAULTS.client_body_timeout_s
    send_timeout_s: int = DEFAULTS.send_timeout_s
    max_body_bytes: int | None = None  # None: computed from the repository (limits.py)
    json_max_elements: int | None = None  # None: computed from the repository
    worker_processes: str = "auto"
    resolve_interval_s: float = 0.0  # > 0: host names are looked up by the gateway, again this often
    extra: dict[str, str] = field(default_factory=dict)  # more placeholders (tests)


# -- replicas -----------------------------------------------------------------------------------------

UPSTREAMS = ("triton_http", "triton_grpc", "health", "openai")
# Written when a name resolves to nothing (no replica ready): nginx needs a server, this one is never
# tried, so requests get the gateway's 503 "restarting or overloaded; retry" at once.
NO_REPLICA = "127.0.0.1:9 down"


def _addresses(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def resolve_address(text: str) -> list[str]:
    """'name:port' -> every 'ip:port' the name resolves to now (sorted); an IP address stays as it is."""
    host, port = host_port(text)
    if _is_ip(host):
        return [address(host, port)]
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        logger.warning("gateway: %s does not resolve (%s); no replica there for now", host, error)
        return []
    return sorted({address(info[4][0], port) for info in found})


def upstream_servers(options: GatewayOptions) -> dict[str, list[str]]:
    """The replicas' addresses per upstream, as the configuration will list them."""
    servers = {}
    for name in UPSTREAMS:
        if getattr(options, name) is None:  # (openai: not served through this gateway)
            continue
        wanted = _addresses(getattr(options, name))
        if options.resolve_interval_s > 0:
            found = sorted({a for text in wanted for a in resolve_address(text)})
        else:
            found = list(dict.fromkeys(wanted))  # nginx resolves names once, at start
        servers[name] = found
    return servers


def _server_lines(addresses: list[str]) -> str:
    if not addresses:
        return f"        server {NO_REPLICA};"
    # (nginx never marks a single server down: the parameters would be ignored)
    failure = f" max_fails=1 fail_timeout={DEFAULTS.upstream_fail_timeout_s}s" if len(addresses) > 1 else ""
    return "\n".join(f"        server {a}{failure};" for a in addresses)


def find_nginx() -> Path:
    found = shutil.which("nginx") or next(
        (
            p
            for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
            if Path(p).exists()
        ),
        None,
    )
    if not found:
        raise GatewayUnavailable(f"nginx not found; {INSTALL_HINT}")
    return Path(found)


def njs_load_module(nginx: Path) -> str:
    """The `load_module` line for the njs module ("" when it is built into nginx)."""
    built = subprocess.run([str(nginx), "-V"], capture_output=True, text=True, check=False).stderr
    if re.search(r"--add-module=\S*njs\S*/nginx(\s|$)", built):
        return ""
    configured = re.search(r"--modules-path=(\S+)", built)
    directories = ([configured.group(1)] if configured else []) + list(MODULE_DIRS)
    if os.environ.get("KANDINSKY_NJS_MODULE"):
        directories.insert(0, str(Path(os.environ["KANDINSKY_NJS_MODULE"]).parent))
    for directory in directories:
        module = Path(directory) / NJS_MODULE
        if module.is_file():
            return f"load_module {module};"
    raise GatewayUnavailable(f"nginx's njs module ({NJS_MODULE}) not found in {directories}; {INSTALL_HINT}")


def _token_map(token: str | None) -> tuple[str, str]:
    """(default value, map entries) of the $kandinsky_authorized map."""
    if not token:
        return "1", ""
    check_secret(token, "the gateway token")
    escaped = re.sub(r"([.+])", r"\\\1", token)
    return "0", f'        "~^Bearer {escaped}$" 1;'


# gRPC errors the gateway answers itself (trailers-only: HTTP/2 headers carry grpc-status), by location.
_GRPC_ERRORS = {
    "grpc_bad_request": (3, "bad request: the gateway could not read it"),
    "grpc_internal": (13, "the gateway failed on this request; see its error log"),
    "grpc_unauthenticated": (
        16,
        "unauthenticated: this gateway requires authorization: Bearer <token> metadata",
    ),
    "grpc_permission_denied": (7, "permission denied: this method is not available through the gateway"),
    "grpc_timeout": (4, "the request was not sent in time"),
    "grpc_too_large": (8, "request larger than the gateway limit of {max_body} bytes"),
    "grpc_rate_limited": (
        8,
        "too many requests from this address (limits: {rate}/s, burst {burst}, {in_flight} in flight); retry later",
    ),
    "grpc_unavailable": (14, "the server is restarting or overloaded; retry"),
}


def _fill(template: Path, values: dict[str, str]) -> str:
    """A template's text with each {{NAME}} replaced by values[NAME]."""
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], template.read_text())


# Routes exempt from the server-wide token check (the template's $kandinsky_own_auth): the page, and /v1/,
# whose location checks the token itself to refuse in OpenAI's error object.
_OPENAI_OWN_AUTH = '        "/" 1;\n        "~^/playground/" 1;\n        "~^/v1/" 1;'


def _openai_parts(addresses: list[str] | None, values: dict[str, str]) -> dict[str, str]:
    """The OpenAI API's upstream, routes and token exemption (empty when it is not served here)."""
    if addresses is None:
        return {"OPENAI_UPSTREAM": "", "OPENAI_LOCATIONS": "", "OWN_AUTH_ROUTES": ""}
    from ..openai_api.app import MAX_JSON_BODY_BYTES, MAX_MULTIPART_BODY_BYTES

    values = {
        **values,
        "OPENAI_JSON_MAX_BODY_BYTES": str(MAX_JSON_BODY_BYTES),
        "OPENAI_MULTIPART_MAX_BODY_BYTES": str(MAX_MULTIPART_BODY_BYTES),
    }
    locations = _fill(OPENAI_TEMPLATE, values)
    upstream = (
        f"    upstream kandinsky_openai {{\n{_server_lines(addresses)}\n"
        f"        keepalive {DEFAULTS.keepalive_connections};\n    }}\n"
    )
    return {"OPENAI_UPSTREAM": upstream, "OPENAI_LOCATIONS": locations, "OWN_AUTH_ROUTES": _OPENAI_OWN_AUTH}


def _grpc_error_locations(**values: object) -> str:
    blocks = []
    for name, (status, message) in _GRPC_ERRORS.items():
        blocks.append(
            f"        location @{name} {{\n"
            "            default_type application/grpc;\n"
            f"            add_header grpc-status {status} always;\n"
            f'            add_header grpc-message "{message.format(**values)}" always;\n'
            "            add_header content-length 0 always;\n"
            "            return 204;\n"
            "        }"
        )
    return "\n".join(blocks)


def runtime_sockets(runtime_dir: Path, relay_dir: Path | None = None) -> tuple[Path, Path]:
    """(the stream relay's socket, in `relay_dir` or else `runtime_dir`; nginx's checked socket, in
    `runtime_dir`)."""
    root = Path(runtime_dir).resolve()
    sockets = Path(relay_dir or root).resolve() / RELAY_SOCKET, root / CHECKED_SOCKET
    if any(len(str(p).encode()) > _UNIX_PATH_MAX for p in sockets):
        raise GatewayUnavailable(
            f"the runtime folder {root} is too long a path for unix sockets; choose a shorter one "
            "(--gateway-runtime-dir)"
        )
    return sockets


def _reachable_by_others(folder: Path) -> bool:
    """Whether every existing folder on the way to `folder` lets other users through (search bit)."""
    for path in (folder, *folder.parents):
        with contextlib.suppress(FileNotFoundError):
            if not path.stat().st_mode & 0o001:
                return False
    return True


def render(
    options: GatewayOptions,
    load_module: str,
    servers: dict[str, list[str]] | None = None,
    runtime_dir: Path = Path("."),
    relay_dir: Path | None = None,
) -> tuple[str, dict]:
    """The nginx configuration and the njs config module's contents for `options` (and the replicas'
    addresses `servers`, by default looked up now), run from `runtime_dir` (the relay's socket in
    `relay_dir`, by default there too)."""
    servers = upstream_servers(options) if servers is None else servers
    relay_socket, checked_socket = runtime_sockets(runtime_dir, relay_dir)
    configs = read_configs(options.repository)
    limits = request_limits(options.repository, configs)
    max_body = options.max_body_bytes or limits.max_body_bytes
    json_elements = options.json_max_elements or limits.json_max_elements
    key = options.admin_key
    auth_default, auth_map = _token_map(options.token)
    values = {
        "LOAD_MODULE": load_module,
        "WORKER_PROCESSES": options.worker_processes,
        "WORKER_CONNECTIONS": str(DEFAULTS.worker_connections),
        "MAX_BODY_BYTES": str(max_body),
        "HTTP_MAX_BODY_BYTES": str(min(max_body, DEFAULTS.triton_http_max_body_bytes)),
        "AUTH_DEFAULT": auth_default,
        "AUTH_MAP": auth_map,
        "RATE_ZONE_MB": str(DEFAULTS.rate_zone_mb),
        "RATE_PER_S": str(options.rate_per_s),
        "BURST": str(options.burst),
        "MAX_IN_FLIGHT": str(options.max_in_flight),
        "TRITON_HTTP_SERVERS": _server_lines(servers["triton_http"]),
        "TRITON_GRPC_SERVERS": _server_lines(servers["triton_grpc"]),
        "HEALTH_SERVERS": _server_lines(servers["health"]),
        "KEEPALIVE": str(DEFAULTS.keepalive_connections),
        "UPSTREAM_TRIES": str(DEFAULTS.upstream_tries),
        "UPSTREAM_RETRY_WINDOW_S": str(DEFAULTS.upstream_retry_window_s),
        "ADMIN_HEADER": key.header if key else DEFAULTS.admin_key_header,
        "ADMIN_GRPC_HEADER": key.grpc_header if key else f"triton-grpc-protocol-{DEFAULTS.admin_key_header}",
        "ADMIN_KEY": key.key if key else "",
        "CONNECT_TIMEOUT_S": str(DEFAULTS.upstream_connect_timeout_s),
        "HEADER_TIMEOUT_S": str(options.header_timeout_s),
        "BODY_TIMEOUT_S": str(options.body_timeout_s),
        "SEND_TIMEOUT_S": str(options.send_timeout_s),
        "RELAY_SOCKET": str(relay_socket),
        "CHECKED_SOCKET": str(checked_socket),
        "GRPC_ERRORS": _grpc_error_locations(
            max_body=max_body, rate=options.rate_per_s, burst=options.burst, in_flight=options.max_in_flight
        ),
        "UPSTREAM_TIMEOUT_S": str(DEFAULTS.upstream_timeout_s),
        "LISTEN_HTTP": address(options.host, options.http_port),
        "LISTEN_GRPC": address(options.host, options.grpc_port),
        **options.extra,
    }
    values.update(_openai_parts(servers.get("openai"), values))
    text = _fill(TEMPLATE, values)
    script_config = {
        "datatype_bytes": TRITON_ITEM_BYTES,
        "json_max_elements": json_elements,
        "json_max_text_bytes": json_text_limit(json_elements),
        "generate": generate_fields(configs),
    }
    logger.info(
        "gateway limits: body %d bytes over gRPC (largest request: %s), %d over HTTP (Triton's HTTP "
        "server), JSON tensors %d elements, %d requests/s per address (burst %d), %d in flight per address%s",
        max_body,
        limits.reason,
        min(max_body, DEFAULTS.triton_http_max_body_bytes),
        json_elements,
        options.rate_per_s,
        options.burst,
        options.max_in_flight,
        ", bearer token required" if options.token else "",
    )
    return text, script_config


def write_runtime(
    options: GatewayOptions,
    runtime_dir: Path,
    nginx: Path | None = None,
    servers: dict[str, list[str]] | None = None,
    relay_dir: Path | None = None,
) -> Path:
    """Render everything nginx needs into `runtime_dir`; returns the configuration file."""
    nginx = nginx or find_nginx()
    text, script_config = render(options, njs_load_module(nginx), servers, runtime_dir, relay_dir)
    runtime_dir.mkdir(parents=True, exist_ok=True)
    runtime_dir.chmod(0o711)  # nginx workers (nobody when started as root) need to traverse it
    for sub in ("js", "temp"):
        (runtime_dir / sub).mkdir(exist_ok=True)
        (runtime_dir / sub).chmod(0o755 if sub == "js" else 0o711)
    shutil.copy2(SCRIPT, runtime_dir / "js" / SCRIPT.name)
    (runtime_dir / "js" / "kandinsky_gateway_config.js").write_text(
        "// Written at gateway start from the served repository; see limits.py.\n"
        f"export default {json.dumps(script_config, indent=1)};\n"
    )
    conf = runtime_dir / "nginx.conf"
    partial = runtime_dir / "nginx.conf.new"  # renamed into place: a reload never reads half a file
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the token and key
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    partial.replace(conf)
    return conf


def _group_gone(group: int, timeout: float) -> bool:
    """Wait until no process of `group` is left (True), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # (the id was reused by another user's group: ours are gone)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


class Gateway:
    """An nginx process in its own session, configured from `options` into `runtime_dir`, and the stream
    relay (a thread of this process) that checks ModelStreamInfer messages for it."""

    def __init__(self, options: GatewayOptions, runtime_dir: Path | None = None) -> None:
        self.options = options
        self._own_dir = runtime_dir is None
        self.runtime_dir = Path(runtime_dir or tempfile.mkdtemp(prefix="kandinsky-gateway-")).resolve()
        self.nginx = find_nginx()
        # nginx's workers connect to the relay's socket; under a root master they run as nobody, who may
        # not get through to a runtime folder inside a private one: the socket then goes to a folder of
        # its own in the temporary folder. (The checked socket is for the relay alone: it stays private.)
        self.relay_dir: Path | None = None
        if os.geteuid() == 0 and not _reachable_by_others(self.runtime_dir.parent):
            self.relay_dir = Path(tempfile.mkdtemp(prefix="kandinsky-relay-"))
            self.relay_dir.chmod(0o711)
        relay_socket, self.checked_socket = runtime_sockets(self.runtime_dir, self.relay_dir)
        max_body = options.max_body_bytes or request_limits(options.repository).max_body_bytes
        self.relay = StreamRelay(relay_socket, self.checked_socket, max_body)
        self.process: subprocess.Popen | None = None
        self.conf: Path | None = None
        self.servers: dict[str, list[str]] = {}
        self._resolved_at = 0.0
        self.reloads = 0

    @property
    def http_url(self) -> str:
        return address(loopback_for(self.options.host), self.options.http_port)

    @property
    def grpc_url(self) -> str:
        return address(loopback_for(self.options.host), self.options.grpc_port)

    @property
    def error_log(self) -> Path:
        return self.runtime_dir / "error.log"

    def _command(self, *extra: str) -> list[str]:
        assert self.conf is not None
        prefix = f"{self.runtime_dir}/"
        return [str(self.nginx), "-p", prefix, "-c", str(self.conf), "-e", str(self.error_log), *extra]

    def prepare(self) -> None:
        """Render the configuration and have nginx check it (`nginx -t`)."""
        self.servers = upstream_servers(self.options)
        self._resolved_at = time.monotonic()
        self.conf = write_runtime(self.options, self.runtime_dir, self.nginx, self.servers, self.relay_dir)
        self._check()
        logger.info("gateway replicas: %s", ", ".join(self.servers["triton_http"]) or "none yet")

    def _check(self) -> None:
        check = subprocess.run(self._command("-t", "-q"), capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise GatewayUnavailable(f"nginx refused the rendered {self.conf}: {check.stderr.strip()}")

    def refresh(self) -> bool:
        """Look the replicas up again when `resolve_interval_s` has passed; on a change, rewrite the
        configuration and reload nginx (SIGHUP: new workers take new requests, old ones finish theirs).
        Returns whether it reloaded."""
        interval = self.options.resolve_interval_s
        if interval <= 0 or time.monotonic() - self._resolved_at < interval:
            return False
        self._resolved_at = time.monotonic()
        servers = upstream_servers(self.options)
        if servers == self.servers:
            return False
        logger.info(
            "gateway replicas changed: %s -> %s",
            ", ".join(self.servers.get("triton_http", [])) or "none",
            ", ".join(servers["triton_http"]) or "none",
        )
        self.conf = write_runtime(self.options, self.runtime_dir, self.nginx, servers, self.relay_dir)
        try:
            self._check()
        except GatewayUnavailable as error:  # keep serving the previous configuration; try again later
            logger.error("gateway: not reloading: %s", error)
            return False
        self.servers = servers
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGHUP)
            self.reloads += 1
        return True

    def start(self) -> None:
        """Start the stream relay (if not running) and nginx; after an nginx that died, first kill what is
        left of its process group (orphaned workers keep the listening sockets: the new master could not
        bind them) and its unix socket."""
        if self.conf is None:
            self.prepare()
        self._kill_group()
        with contextlib.suppress(FileNotFoundError):
            self.checked_socket.unlink()  # nginx does not reuse a socket file left by a killed master
        if self.relay_dir is not None:  # (removed by a previous stop)
            self.relay_dir.mkdir(exist_ok=True)
            self.relay_dir.chmod(0o711)
        self.relay.start()
        logger.info("starting the gateway: %s", " ".join(self._command()))
        self.process = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def _kill_group(self) -> None:
        """SIGKILL nginx's process group (the master, when alive, and its workers) and wait for it."""
        if self.process is None:
            return
        group = self.process.pid  # the master leads its own group (start_new_session)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
        self.process.wait()
        if not _group_gone(group, 5.0):
            logger.warning("processes of nginx's group %d outlived SIGKILL", group)

    def wait_listening(self, timeout: float = 15.0) -> None:
        host, port = host_port(self.http_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise GatewayUnavailable(
                    f"nginx exited with code {self.process.returncode}; see {self.error_log}"
                )
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
                return
            time.sleep(0.05)
        raise GatewayUnavailable(f"the gateway does not listen on {self.http_url} after {timeout:.0f}s")

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop nginx (SIGTERM: its fast shutdown; then SIGKILL to what is left of its group, workers
        orphaned by a killed master included) and the stream relay."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("nginx did not stop in %.0fs; killing it", timeout)
        self._kill_group()
        self.relay.stop()
        if self.relay_dir is not None:
            shutil.rmtree(self.relay_dir, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> Gateway:
        self.start()
        try:
            self.wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by kandinsky-serve (its gateway) and kandinsky-gateway."""
    parser.add_argument(
        "--gateway-token",
        default=os.environ.get(DEFAULTS.gateway_token_env) or None,
        help=f"require 'Authorization: Bearer <token>' (default: ${DEFAULTS.gateway_token_env}; unset: none)",
    )
    parser.add_argument(
        "--gateway-rate", type=int, default=DEFAULTS.rate_per_s, help="requests/s per address"
    )
    parser.add_argument("--gateway-burst", type=int, default=DEFAULTS.burst, help="requests above the rate")
    parser.add_argument(
        "--gateway-max-in-flight",
        type=int,
        default=DEFAULTS.max_in_flight,
        help="requests (or gRPC streams) in flight at once per address; more get 429 / RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--gateway-max-body-bytes", type=int, help="body cap (default: computed from the repository)"
    )
    parser.add_argument(
        "--gateway-json-max-elements", type=int, help="JSON tensor element limit (default: computed)"
    )
    parser.add_argument(
        "--gateway-runtime-dir", type=Path, help="where the rendered config goes (default: temp)"
    )


def options_from_arguments(args: argparse.Namespace, **fields: object) -> GatewayOptions:
    return GatewayOptions(
        token=args.gateway_token,
        rate_per_s=args.gateway_rate,
        burst=args.gateway_burst,
        max_in_flight=args.gateway_max_in_flight,
        max_body_bytes=args.gateway_max_body_bytes,
        json_max_elements=args.gateway_json_max_elements,
        **fields,  # type: ignore[arg-type]
    )


def main(argv: list[str] | None = None) -> int:
    """`kandinsky-gateway`: the gateway alone, in front of a Triton served elsewhere."""
    parser = argparse.ArgumentParser(
        description="Run the Kandinsky gateway (nginx + njs) in front of Triton."
    )
    parser.add_argument(
        "--triton-http",
        required=True,
        nargs="+",
        help=f"Triton's HTTP endpoint, host[:port] (port {DEFAULTS.http_port}); one per replica, or a name "
        "with an address per replica",
    )
    parser.add_argument(
        "--triton-grpc",
        required=True,
        nargs="+",
        help=f"Triton's gRPC endpoint, host[:port] (port {DEFAULTS.grpc_port}); as --triton-http",
    )
    parser.add_argument(
        "--health-url",
        required=True,
        nargs="+",
        help=f"kandinsky-serve's health endpoint, host[:port] or URL (port {DEFAULTS.health_port}); as "
        "--triton-http",
    )
    parser.add_argument(
        "--openai-url",
        nargs="+",
        help=f"kandinsky-openai's endpoint, host[:port] (port {DEFAULTS.openai_port}; kandinsky-serve runs "
        "it): the gateway then serves the OpenAI Images API (/v1/) and the playground (/); as --triton-http",
    )
    parser.add_argument(
        "--resolve-interval",
        type=float,
        default=DEFAULTS.resolve_interval_s,
        help="seconds between look-ups of the replicas' host names (nginx reloads when they change); "
        f"0: nginx resolves them once (default {DEFAULTS.resolve_interval_s:g})",
    )
    parser.add_argument("--repository", type=Path, required=True, help="the served repository (read only)")
    parser.add_argument("--host", default=DEFAULTS.host, help="address to listen on")
    parser.add_argument("--http-port", type=int, default=DEFAULTS.http_port)
    parser.add_argument("--grpc-port", type=int, default=DEFAULTS.grpc_port)
    parser.add_argument(
        "--admin-key-file", type=Path, help=f"the server's admin key (or ${DEFAULTS.admin_key_env})"
    )
    parser.add_argument("--write-config", type=Path, help="only render the configuration into this folder")
    add_gateway_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    options = options_from_arguments(
        args,
        triton_http=tuple(address(*host_port(a, DEFAULTS.http_port)) for a in args.triton_http),
        triton_grpc=tuple(address(*host_port(a, DEFAULTS.grpc_port)) for a in args.triton_grpc),
        health=tuple(address(*host_port(a, DEFAULTS.health_port)) for a in args.health_url),
        openai=tuple(address(*host_port(a, DEFAULTS.openai_port)) for a in args.openai_url)
        if args.openai_url
        else None,
        resolve_interval_s=args.resolve_interval,
        repository=args.repository,
        admin_key=resolve_admin_key(args.admin_key_file)
        if args.admin_key_file or os.environ.get(DEFAULTS.admin_key_env)
        else None,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
    )
    if options.admin_key is None:
        logger.warning(
            "no admin key (--admin-key-file or $%s): POST /v2/repository/index will be refused by Triton",
            DEFAULTS.admin_key_env,
        )
    if args.write_config:  # for an nginx run by others: names stay names (nginx resolves them at start)
        conf = write_runtime(dataclasses.replace(options, resolve_interval_s=0.0), args.write_config)
        print(f"wrote {conf}")
        return 0

    gateway = Gateway(options, args.gateway_runtime_dir)

    def request_stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        gateway.prepare()
        gateway.start()
        gateway.wait_listening()
        print(
            f"gateway: HTTP {gateway.http_url}, gRPC {gateway.grpc_url} -> Triton "
            f"{' '.join(args.triton_http)}",
            flush=True,
        )
        while gateway.poll() is None:
            time.sleep(0.2)
            gateway.refresh()
        print(f"nginx exited with code {gateway.poll()}; see {gateway.error_log}", file=sys.stderr)
        return 1
    except GatewayUnavailable as error:
        print(f"kandinsky-gateway: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        gateway.stop()


if __name__ == "__main__":
    sys.exit(main())
