"""Triton's restricted APIs and the admin key that unlocks them.

Shared-memory registration, logging and trace settings and the model-repository API (index, load,
unload) answer only requests that carry the admin key header (Triton's `--http-restricted-api` /
`--grpc-restricted-protocol`; over gRPC the metadata key is `triton-grpc-protocol-<header>`). Health,
metadata, model config, statistics and inference stay open: the client reads model configs and
benchmarks read statistics.

The key comes from $KANDINSKY_ADMIN_KEY, else from a key file (created with a random key, mode 0600, when
missing; Docker shares it between the server and the gateway containers), else it is random for each
start. It is never printed or logged. Note that it is part of tritonserver's command line, which local
users of the machine can read (`ps`): the restriction protects against remote clients, not local ones.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .settings import DEFAULTS

# Characters that pass unquoted through Triton's option parser, HTTP headers and nginx strings.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,512}$")


def check_secret(value: str, what: str) -> str:
    if not _KEY_PATTERN.match(value):
        raise ValueError(f"{what} must be 16-512 characters of A-Z a-z 0-9 . _ ~ + / = -")
    return value


@dataclass(frozen=True)
class AdminKey:
    key: str
    source: str  # where it came from, for the startup message (never the key itself)
    header: str = DEFAULTS.admin_key_header

    @property
    def grpc_header(self) -> str:
        """The gRPC metadata key Triton expects for the same restriction."""
        return f"triton-grpc-protocol-{self.header}"

    def triton_args(self, apis: tuple[str, ...] = DEFAULTS.restricted_apis) -> list[str]:
        restriction = f"{','.join(apis)}:{self.header}={self.key}"
        return [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]


def resolve_admin_key(key_file: Path | None = None) -> AdminKey:
    """$KANDINSKY_ADMIN_KEY, else the key file (created when missing), else a random key."""
    from_env = os.environ.get(DEFAULTS.admin_key_env, "").strip()
    if from_env:
        return AdminKey(check_secret(from_env, DEFAULTS.admin_key_env), f"${DEFAULTS.admin_key_env}")
    if key_file is not None:
        return AdminKey(check_secret(_read_or_create(Path(key_file)), str(key_file)), str(key_file))
    return AdminKey(
        secrets.token_urlsafe(32), f"random for this run (set ${DEFAULTS.admin_key_env} to choose one)"
    )


def _read_or_create(key_file: Path, wait_s: float = 5.0) -> str:
    """The key in `key_file`; a new random one (mode 0600) when the file does not exist yet.

    Two processes may start together (the server and the gateway containers): one creates the file, the
    other waits until the key is written.
    """
    if not key_file.exists():  # (the gateway container mounts it read-only: never create it there)
        key_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_urlsafe(32) + "\n")
    deadline = time.monotonic() + wait_s
    while not (text := key_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return text
