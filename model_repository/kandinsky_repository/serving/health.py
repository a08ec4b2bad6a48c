"""Deep readiness: ready only when every model of the repository can really answer.

Triton's own `/v2/health/ready` keeps answering 200 after a python-backend stub died: the model stays
READY in Triton's eyes while every request to it fails with "Stub process ... is not healthy"
(upstream issues triton-inference-server/server #7347, #8604). The deep check is ready only when
1. tritonserver answers its readiness endpoint with 200,
2. every model of the repository is READY in Triton's repository index,
3. every instance of every python-backend model has a live stub process, and
4. no recovery is in progress.

It is exposed three ways: `deep_readiness()` (the supervisor waits on it after every start), the HTTP
endpoint kandinsky-serve runs (`GET /health/ready` -> 200 or 503 with a JSON body listing what is not
ready; `GET /health/live`), and the `kandinsky-health` command for Docker and Kubernetes exec probes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..settings import DEFAULTS
from .stubs import stub_processes

logger = logging.getLogger(__name__)


@dataclass
class Readiness:
    ready: bool
    problems: list[str] = field(default_factory=list)
    models: int = 0
    details: dict = field(default_factory=dict)  # supervisor state, recoveries, ...

    def as_json(self) -> dict:
        return {"ready": self.ready, "models": self.models, "not_ready": self.problems, **self.details}


def python_instances(repository: Path) -> dict[str, int]:
    """Python-backend models of the repository and how many instances (stubs) each runs."""
    from ..generator.repository import read_config

    counts = {}
    for config_file in sorted(Path(repository).glob("*/config.pbtxt")):
        config = read_config(config_file.parent)
        if config.backend == "python":
            counts[config.name or config_file.parent.name] = (
                sum(g.count or 1 for g in config.instance_group) or 1
            )
    return counts


def _request(
    url: str, *, method: str = "GET", headers: dict | None = None, timeout: float
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, method=method, headers=headers or {}, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def deep_readiness(
    triton_http: str,
    repository: Path,
    *,
    process_group: int | None,
    admin_header: str | None = None,
    admin_key: str | None = None,
    expected_stubs: dict[str, int] | None = None,
    timeout: float = 3.0,
) -> Readiness:
    """Check 1-3 above against the Triton at `triton_http` (host:port) serving `repository`.

    `process_group`: tritonserver's process group (its pid), to find the stub processes; None skips the
    stub check. `admin_header`/`admin_key` unlock the repository index when the API is restricted.
    """
    from .triton import repository_models

    models = repository_models(repository)
    base = f"http://{triton_http}"
    problems: list[str] = []
    try:
        status, _ = _request(f"{base}/v2/health/ready", timeout=timeout)
        if status != 200:
            problems.append(f"tritonserver is not ready (HTTP {status} from /v2/health/ready)")
        headers = {admin_header: admin_key} if admin_header and admin_key else {}
        status, body = _request(
            f"{base}/v2/repository/index", method="POST", headers=headers, timeout=timeout
        )
        if status != 200:
            problems.append(
                f"cannot read the repository index (HTTP {status}: {body[:200].decode(errors='replace')})"
            )
        else:
            states = {m["name"]: m for m in json.loads(body)}
            for name in models:
                entry = states.get(name, {})
                if entry.get("state") != "READY":
                    reason = entry.get("reason") or "not loaded"
                    problems.append(f"model '{name}' is {entry.get('state', 'UNAVAILABLE')}: {reason}")
    except (OSError, ValueError) as error:
        problems.append(f"tritonserver does not answer at {triton_http}: {error}")
        return Readiness(False, problems, len(models))

    if process_group is not None:
        expected = expected_stubs if expected_stubs is not None else python_instances(repository)
        alive = Counter(s.model for s in stub_processes(process_group) if s.alive)
        for model, count in sorted(expected.items()):
            if alive[model] < count:
                problems.append(
                    f"model '{model}': {count - alive[model]} of its {count} python-backend stub process(es) "
                    "not running (requests to it fail until it is recovered)"
                )
    return Readiness(not problems, problems, len(models))


class HealthServer:
    """`GET /health/ready` and `GET /health/live` on a small threaded HTTP server (daemon thread)."""

    def __init__(
        self, host: str, port: int, readiness: Callable[[], Readiness], liveness: Callable[[], dict]
    ) -> None:
        self.readiness, self.liveness = readiness, liveness
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0].rstrip("/")
                if path == "/health/ready":
                    try:
                        report = outer.readiness()
                    except Exception as error:  # noqa: BLE001 - a probe must get an answer
                        logger.exception("deep readiness check failed")
                        report = Readiness(False, [f"the readiness check failed: {error}"])
                    self._reply(200 if report.ready else 503, report.as_json())
                elif path == "/health/live":
                    state = outer.liveness()
                    self._reply(200 if state.get("live") else 503, state)
                else:
                    self._reply(404, {"error": "GET /health/ready or /health/live"})

            timeout = DEFAULTS.health_client_timeout_s

            def _refuse_method(self) -> None:
                """Any other method: 405 + JSON, and the connection closed. The body is read and dropped
                first, up to a bound (closing with unread data would reset the connection before the
                client reads the answer)."""
                self.close_connection = True
                length = self.headers.get("Content-Length", "0")
                left = int(length) if length.isdigit() else 0
                if left <= DEFAULTS.health_discarded_body_bytes:
                    while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                        left -= len(chunk)
                self._reply(405, {"error": "method not allowed: GET /health/ready or /health/live"})

            do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

            def _reply(self, status: int, body: dict) -> None:
                data = (json.dumps(body) + "\n").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - probes are frequent
                logger.debug("health: " + format, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    """`kandinsky-health`: exit 0 when kandinsky-serve's deep readiness says ready, 1 otherwise."""
    parser = argparse.ArgumentParser(description="Probe kandinsky-serve's deep health (exit 0: ready).")
    parser.add_argument(
        "--url",
        default=f"http://{DEFAULTS.health_host}:{DEFAULTS.health_port}/health/ready",
        help="the health endpoint (host:port or URL; default path /health/ready)",
    )
    parser.add_argument("--live", action="store_true", help="probe /health/live instead")
    parser.add_argument(
        "--gateway",
        action="store_true",
        help=f"probe through the local gateway instead (GET /v2/health/ready on port {DEFAULTS.http_port})",
    )
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    url = args.url if "//" in args.url else f"http://{args.url}"
    if args.gateway:
        url = f"http://127.0.0.1:{DEFAULTS.http_port}/v2/health/ready"
    elif url.count("/") < 3:
        url += "/health/live" if args.live else "/health/ready"
    try:
        status, body = _request(url, timeout=args.timeout)
    except (OSError, ValueError) as error:
        if not args.quiet:
            print(f"not ready: no answer from {url}: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(body.decode(errors="replace").strip())
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
