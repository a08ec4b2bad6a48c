"""Python-backend stub processes of a tritonserver, read from /proc, and their /dev/shm regions.

Each instance of a python-backend model runs in a stub process that tritonserver starts in its own
process group. A stub's argv names the model file (`<repository>/<model>/<version>/model.py`), the
shared-memory region it talks through (`triton_python_backend_shm_region_<uuid>`), and the model instance
(`<model>_<group>_<index>`). A stub that dies (kill -9, OOM, a crash in the stub while it deserialises a
request) leaves a zombie or nothing, never a restart, and Triton keeps reporting the model READY.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"
SHM_PREFIX = "triton_python_backend_shm_region_"
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class StubProcess:
    pid: int
    model: str
    instance: str
    shm_region: str
    state: str  # /proc state letter: R, S, D, Z (zombie: dead, not yet reaped by tritonserver), ...

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def _read_stat(pid: str) -> tuple[str, int] | None:
    """(state, process group) of a pid, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[2])


def _stub_from_argv(pid: int, state: str, argv: list[str]) -> StubProcess | None:
    if not argv or not argv[0].endswith(STUB_NAME) or len(argv) < 3:
        return None
    model_file = Path(argv[1])
    model = model_file.parent.parent.name  # <repository>/<model>/<version>/model.py
    instance = argv[8] if len(argv) > 8 else f"{model}_?"
    return StubProcess(pid, model, instance, argv[2], state)


def stub_processes(process_group: int) -> list[StubProcess]:
    """The python-backend stubs in `process_group` (tritonserver's pid when started in its own session).

    Zombies are listed too (state Z): their argv is gone, so they are named "unknown".
    """
    stubs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read_stat(entry.name)
        if stat is None or stat[1] != process_group or int(entry.name) == process_group:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        decoded = [a.decode(errors="replace") for a in argv if a]
        stub = _stub_from_argv(int(entry.name), stat[0], decoded)
        if stub is None and stat[0] == "Z":
            stub = StubProcess(int(entry.name), "unknown", "unknown", "", "Z")
        if stub is not None:
            stubs.append(stub)
    return stubs


def group_alive(process_group: int) -> list[int]:
    """Pids of live (non-zombie) processes in `process_group`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read_stat(entry.name)
            if stat is not None and stat[1] == process_group and stat[0] not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


def wait_group_gone(process_group: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_alive(process_group):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _mapped_shm_regions() -> set[str]:
    """Names of the python-backend regions some live process still maps."""
    mapped = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (entry / "maps").read_text().splitlines():
                if SHM_PREFIX in line:
                    mapped.add(line.rsplit("/", 1)[-1].split()[0])
    return mapped


def remove_shm_regions(known: Iterable[str], created_after: float | None = None) -> list[str]:
    """Unlink python-backend regions left by a dead server: `known` ones (read from its stubs' argv), and,
    when `created_after` (a time.time()) is given, regions made since then that no live process maps
    (stubs that died before they were seen). Call only once the server's process group is gone.
    """
    candidates = {name for name in known if name.startswith(SHM_PREFIX)}
    if created_after is not None and SHM_DIR.is_dir():
        for path in SHM_DIR.glob(f"{SHM_PREFIX}*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime >= created_after - 1:
                    candidates.add(path.name)
    if not candidates:
        return []
    in_use = _mapped_shm_regions()
    removed = []
    for name in sorted(candidates - in_use):
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / name).unlink()
            removed.append(name)
    if removed:
        logger.info(
            "removed %d shared-memory region(s) of a dead server: %s", len(removed), ", ".join(removed)
        )
    return removed


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
