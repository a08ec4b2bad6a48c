"""`kandinsky-openai`: the OpenAI Images API and the playground page on uvicorn, standalone or in a thread.

    kandinsky-openai --triton-grpc 127.0.0.1:8001 [--host 127.0.0.1] [--port 8004]

Loopback by default, like every other port of the project. When the environment variable named by
`settings.DEFAULTS.gateway_token_env` is set, /v1 needs it as `Authorization: Bearer <token>` (the
gateway's token: one token for a deployment); `OpenAIServer` (what kandinsky-serve embeds) takes the
token explicitly, and the headers its Triton calls carry (the admin key: behind kandinsky-serve's gateway,
Triton's inference APIs need it). The gateway passes /v1 on with the Authorization header, so this app
checks the token there too and answers in OpenAI's error object.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import threading
import time

import uvicorn

from ..settings import DEFAULTS
from .app import create_app

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


def _config(
    triton_grpc: str, host: str, port: int, token: str | None, headers: dict[str, str] | None = None
) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(triton_grpc, token=token, headers=headers),
        host=host,
        port=port,
        lifespan="on",
        access_log=False,
        log_config=None,  # the embedding process's logging, not uvicorn's own handlers
        timeout_graceful_shutdown=DEFAULTS.exit_timeout_s,  # then open streams are cancelled (so are their generations)
    )


class OpenAIServer:
    """The app on uvicorn in a background thread: `start()` returns once it listens, `stop()` once it ended.

    In-flight generations get `DEFAULTS.exit_timeout_s` to finish at stop; streams still open then are
    cancelled, and so are their generations on Triton. `start()` after the thread ended (stopped, or died)
    starts a fresh server on the same port: kandinsky-serve's supervisor restarts it so.
    """

    def __init__(
        self,
        triton_grpc: str,
        host: str = DEFAULTS.host,
        port: int = DEFAULTS.openai_port,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._settings = (triton_grpc, host, port, token, headers)
        self._server = uvicorn.Server(_config(*self._settings))
        self._thread = threading.Thread(target=self._server.run, name="kandinsky-openai", daemon=True)

    @property
    def url(self) -> str:
        """The base URL of OpenAI's clients (`base_url`)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> OpenAIServer:
        if self._thread.ident is not None:  # ran before: a uvicorn server runs once, so a new one
            self._server = uvicorn.Server(_config(*self._settings))
            self._thread = threading.Thread(target=self._server.run, name="kandinsky-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(
                    f"kandinsky-openai could not listen on {self.host}:{self.port} (see the log)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"kandinsky-openai did not listen on {self.host}:{self.port} in {timeout_s:g} s"
                )
            time.sleep(0.02)
        logger.info("OpenAI Images API on %s, playground on http://%s:%d/", self.url, self.host, self.port)
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = DEFAULTS.stop_grace_s) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve the OpenAI Images API (/v1/images/...) and the playground page (/) for a Kandinsky "
        "2.2 Triton server."
    )
    parser.add_argument("--triton-grpc", required=True, help="Triton's gRPC endpoint, HOST:PORT")
    parser.add_argument(
        "--host", default=DEFAULTS.host, help="address to listen on; 0.0.0.0: every interface"
    )
    parser.add_argument("--port", type=int, default=DEFAULTS.openai_port)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get(DEFAULTS.gateway_token_env) or None
    if not token and not _is_loopback(args.host):
        logger.warning(
            "listening on %s without a token: anyone who reaches it can generate; set %s, or put the gateway "
            "in front",
            args.host,
            DEFAULTS.gateway_token_env,
        )
    server = uvicorn.Server(_config(args.triton_grpc, args.host, args.port, token))
    server.run()  # until SIGINT/SIGTERM
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
