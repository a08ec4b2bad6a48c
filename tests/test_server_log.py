"""Triton's log is kept in a file by default, and its end is in the error when the server fails to start
(it went to /dev/null unless --log-file was given)."""

from __future__ import annotations

import pytest
from kandinsky_repository.serving.triton import TritonServer, default_log_file, free_port, log_tail

BROKEN_MODEL = """
raise ImportError("kandinsky-test: this model cannot load")
"""

BROKEN_CONFIG = """
name: "broken"
backend: "python"
max_batch_size: 0
input { name: "x" data_type: TYPE_FP32 dims: [ 1 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ 1 ] }
instance_group { kind: KIND_CPU count: 1 }
"""


def test_a_failed_start_shows_the_end_of_the_default_log(tmp_path):
    repository = tmp_path / "repository"
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "config.pbtxt").write_text(BROKEN_CONFIG)
    (repository / "broken" / "1" / "model.py").write_text(BROKEN_MODEL)
    http_port = free_port()
    server = TritonServer(repository, http_port=http_port, grpc_port=free_port(), metrics_port=free_port())
    assert server.log_file == default_log_file(http_port)
    with pytest.raises((RuntimeError, TimeoutError)) as error:
        server.start()
        try:
            server.wait_ready(timeout=120)
        finally:
            server.stop()
    message = str(error.value)
    assert str(server.log_file) in message
    assert "kandinsky-test: this model cannot load" in message  # Triton's own words, not "see the log"
    assert "kandinsky-test" in log_tail(server.log_file)


def test_log_tail_reads_only_what_this_start_wrote(tmp_path):
    log = tmp_path / "triton.log"
    log.write_text("old start\n")
    offset = log.stat().st_size
    with log.open("a") as handle:
        handle.write("".join(f"line {i}\n" for i in range(100)))
    tail = log_tail(log, offset, lines=3)
    assert tail == "line 97\nline 98\nline 99"
    assert "old start" not in log_tail(log, offset)
    assert log_tail(tmp_path / "missing.log") == ""
