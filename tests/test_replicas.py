"""Replica failure without lost images, on the topology the Kubernetes chart runs (deploy/):
three Triton replicas (tiny preset, CPU, loopback ports) behind one gateway rendered from the same
template and settings as `kandinsky-gateway`, a bounded load, one replica killed (SIGKILL of its process
group) in the middle. The load, the kill and the counting are `kandinsky_bench.failover`'s, which
`kandinsky-bench failover` runs at a larger size and prints as a table.
"""

from __future__ import annotations

import threading
import time

import pytest
from kandinsky_bench.failover import LoadPlan, Replicas, failover_runs, run_load, table
from kandinsky_client.retry import RetryPolicy
from kandinsky_core.errors import ServerUnavailable

from .serving import http, wait_for

REPLICAS = 3
# 6 clients x 3 generations, 64x64, 2 prior + 20 decoder steps (LoadPlan): each run takes a few seconds on 2 cores,
# and a generation lasts long enough that the killed replica has some in flight.
CLIENTS, GENERATIONS = 6, 3
# The kill goes to the replica that ran the most UNet steps in the last 50 ms; on a loaded 2-core machine
# its generations may all finish in the moment before the kill (a full-suite run saw it once). That run
# proves nothing about failures, so the scenario is repeated, up to this many times, until a generation
# was on the killed replica; every run must still lose nothing.
ATTEMPTS = 3


@pytest.fixture(scope="module")
def replicas(nginx_with_njs, tiny_repository, tmp_path_factory):
    with Replicas(tiny_repository, REPLICAS, log_dir=tmp_path_factory.mktemp("replicas")) as running:
        yield running


@pytest.mark.parametrize("loop", ["client", "server"])
def test_a_killed_replica_loses_no_generation(replicas, loop):
    plan = LoadPlan(loop, clients=CLIENTS, generations=GENERATIONS)
    rows = []
    for _ in range(ATTEMPTS):
        reference, failed = failover_runs(replicas, plan)
        rows = [reference.counts(), failed.counts(reference)]
        print("\n" + table(rows))  # pytest -s shows it
        assert rows[0]["lost"] == 0, rows[0]["errors"]
        assert failed.killed is not None, "no replica was killed"
        row = rows[1]
        # Every generation completed, each with the very image of the run without a failure (same seed).
        assert row["attempted"] == row["completed"] == plan.total, row["errors"]
        assert row["different_image"] == 0 and row["lost"] == 0
        assert sorted(replicas.alive()) == list(range(REPLICAS)), "the killed replica was started again"
        if loop == "server":
            # The generations on the dead replica failed with a retryable error and were sent again whole.
            hit = row["generation_retries"] >= 1
        else:
            # Steps on the dead replica were sent again: by the gateway (before their response started) or
            # by the client's retry policy.
            hit = row["step_retries"] + row["gateway_retries"] >= 1
        if hit:
            break
    assert hit, f"no generation was on the killed replica in {ATTEMPTS} runs: {rows}"


def test_without_generation_retries_the_failure_is_a_clear_retryable_error(replicas):
    """retry_generations=False: a generation on the killed replica raises ServerUnavailable at once
    (retryable, saying so), not a hang; the others complete; the gateway stays ready."""
    plan = LoadPlan(
        "server",
        clients=4,
        generations=2,
        retry=RetryPolicy(retry_generations=False),
        timeout_s=30.0,
    )
    killed: list[int] = []

    def kill() -> int:
        index = replicas.busiest()
        replicas.kill(index)
        killed.append(index)
        return index

    try:
        for _ in range(ATTEMPTS):
            started = time.monotonic()
            result = run_load(replicas.url("grpc"), plan, kill=kill, kill_after=1)
            elapsed = time.monotonic() - started
            assert killed
            errors = [o.error for o in result.outcomes if o.error is not None]
            if errors:
                break
            replicas.restart(killed.pop())  # nothing was running there: try again with every replica up
        assert errors, f"no generation was running on the killed replica in {ATTEMPTS} runs"
        for error in errors:
            assert isinstance(error, ServerUnavailable) and error.retryable, repr(error)
            assert "was not sent again" in str(error) and "retryable" in str(error), str(error)
        assert all(o.generation_retries == 0 for o in result.outcomes)
        assert len(errors) < plan.total
        assert elapsed < plan.timeout_s, f"{elapsed:.1f}s: a failure must surface, not wait for the deadline"
        # Deep readiness through the gateway: ready while any replica is.
        code, report = http("GET", f"http://{replicas.http_url}/v2/health/ready")
        assert code == 200, report
    finally:
        for index in killed:
            replicas.restart(index)


def test_the_gateway_follows_a_name_whose_replicas_change(replicas, monkeypatch):
    """kandinsky-gateway --resolve-interval: a name (Kubernetes: the headless Service) is looked up again;
    when its addresses change the configuration is rewritten and nginx reloaded without a restart."""
    from kandinsky_repository.gateway import nginx as gateway_module
    from kandinsky_repository.gateway.nginx import Gateway, GatewayOptions, resolve_address
    from kandinsky_repository.serving.triton import free_port

    assert "127.0.0.1:8000" in resolve_address("localhost:8000")  # a name: every address it has now
    assert resolve_address("10.1.2.3:80") == ["10.1.2.3:80"]  # an address: itself
    answers: dict[str, list[str]] = {"replicas.internal": []}
    lock = threading.Lock()

    def resolve(text: str) -> list[str]:
        with lock:
            return list(answers.get(text.rsplit(":", 1)[0], []))

    monkeypatch.setattr(gateway_module, "resolve_address", resolve)
    options = GatewayOptions(
        triton_http="replicas.internal:8000",
        triton_grpc="replicas.internal:8001",
        health="replicas.internal:8003",
        repository=replicas.repository,
        http_port=free_port(),
        grpc_port=free_port(),
        resolve_interval_s=0.05,
    )
    with Gateway(options) as gateway:
        assert gateway.servers["triton_http"] == []
        code, body = http("GET", f"http://{gateway.http_url}/v2/health/live")
        assert code == 503 and "retry" in body["error"], body  # no replica yet: retryable
        pid = gateway.process.pid
        with lock:
            answers["replicas.internal"] = [replicas.servers[i].http_url for i in replicas.alive()]
        time.sleep(0.1)
        assert gateway.refresh() and gateway.reloads == 1
        assert wait_for(lambda: http("GET", f"http://{gateway.http_url}/v2/health/live")[0] == 200, 10)
        assert gateway.process.pid == pid  # reloaded, not restarted
        assert not gateway.refresh()  # same answer: nothing to do


def test_the_benchmark_command_is_reachable():
    """`kandinsky-bench failover` (the table of this test at a larger size) parses its options."""
    from kandinsky_bench.cli import main

    with pytest.raises(SystemExit) as done:
        main(["failover", "--help"])
    assert done.value.code == 0
    with pytest.raises(SystemExit) as refused:
        main(["failover", "--replicas", "1"])
    assert refused.value.code == 2
