"""A TCP proxy on loopback that adds a network round trip: every chunk waits `rtt / 2` in each direction.

This machine's kernel has no netem qdisc, so the benchmark puts this between the client and Triton to
measure what a real network's latency does to each loop. It works for any TCP protocol (gRPC's HTTP/2
and plain HTTP/1.1 alike): bytes are forwarded unchanged, each chunk `rtt / 2` after it arrived, so a
request and its response together pay `rtt` and pipelined data is delayed, not throttled.

Per connection and direction one thread reads and one thread writes: the reader stamps each chunk with
its due time, the writer sleeps until then (`time.sleep`, which overshoots by tens of microseconds, not
the millisecond granularity of an event loop's epoll timeout). Nagle's algorithm is off on both sides.

    python -m kandinsky_bench.proxy --target 127.0.0.1:8001 --rtt-ms 10   # prints "listening HOST:PORT"

`proxy_process()` runs that command as a child process, so the proxy's threads do not compete with the
benchmark's client threads for the Python interpreter lock.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

CHUNK = 256 * 1024


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' (an optional http:// prefix is ignored) -> (host, port)."""
    host, sep, port = address.removeprefix("http://").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"'{address}' is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def _no_delay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Direction:
    """One direction of one connection: chunks read from `source` are written to `sink` `delay_s` later."""

    def __init__(self, name: str, source: socket.socket, sink: socket.socket, delay_s: float, done) -> None:
        self.source, self.sink, self.delay_s, self.done = source, sink, delay_s, done
        self.chunks: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._read, name=f"{name}-read", daemon=True),
            threading.Thread(target=self._write, name=f"{name}-write", daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.source.recv(CHUNK)
                if not data:
                    break
                self.chunks.put((time.monotonic() + self.delay_s, data))
        except OSError:
            pass
        self.chunks.put(None)  # end of stream (or the connection broke): the writer closes its side

    def _write(self) -> None:
        try:
            while True:
                item = self.chunks.get()
                if item is None:
                    with contextlib.suppress(OSError):
                        self.sink.shutdown(socket.SHUT_WR)  # pass the half-close on, delayed like data
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.sink.sendall(data)
        except OSError:
            # The other end went away: stop reading too, so the connection winds down.
            with contextlib.suppress(OSError):
                self.source.shutdown(socket.SHUT_RD)
        self.done()


class DelayProxy:
    """Listens on `host:port` (port 0: a free one) and forwards every connection to `target` with `rtt_s`
    of added round trip (half of it each way). Use as a context manager, or `start()` / `close()`."""

    def __init__(
        self, target: tuple[str, int], rtt_s: float, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if rtt_s < 0:
            raise ValueError(f"the round trip must be >= 0 seconds, got {rtt_s}")
        self.target, self.rtt_s = target, rtt_s
        self.listener = socket.create_server((host, port))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._connections: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)

    @property
    def url(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def start(self) -> DelayProxy:
        self._acceptor.start()
        logger.info("proxy %s -> %s:%d, +%.3g ms round trip", self.url, *self.target, 1e3 * self.rtt_s)
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                break
            try:
                upstream = socket.create_connection(self.target)
            except OSError as error:
                logger.warning("proxy: cannot reach %s:%d: %s", *self.target, error)
                client.close()
                continue
            for sock in (client, upstream):
                _no_delay(sock)
            self._serve(client, upstream)

    def _serve(self, client: socket.socket, upstream: socket.socket) -> None:
        pair = (client, upstream)
        remaining = [2]
        with self._lock:
            self._connections.add(pair)

        def one_done() -> None:
            with self._lock:
                remaining[0] -= 1
                finished = remaining[0] == 0
                if finished:
                    self._connections.discard(pair)
            if finished:
                for sock in pair:
                    sock.close()

        half = self.rtt_s / 2
        _Direction("proxy-up", client, upstream, half, one_done).start()
        _Direction("proxy-down", upstream, client, half, one_done).start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            pairs = list(self._connections)
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def proxy_process(target: str, rtt_ms: float, *, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """A `DelayProxy` in a child process (`python -m kandinsky_bench.proxy`); yields its 'host:port'."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kandinsky_bench.proxy", "--target", target, "--rtt-ms", repr(rtt_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        line = ""
        while time.monotonic() < deadline and not line.startswith("listening "):
            line = process.stdout.readline() if process.stdout else ""
            if not line and process.poll() is not None:
                break
        if not line.startswith("listening "):
            raise RuntimeError(f"the delaying proxy did not start (exit code {process.poll()})")
        yield line.split()[1]
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kandinsky_bench.proxy", description=__doc__)
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, required=True, help="added round trip, milliseconds")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: free)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    host, port = parse_address(args.listen)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with DelayProxy(parse_address(args.target), args.rtt_ms / 1e3, host=host, port=port) as proxy:
        sys.stdout.write(f"listening {proxy.url}\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
