"""A backend SIGKILLed and restarted on the same port while a bounded load runs through lbapp.

Three echo backends log every request id they see to a file each (appended before answering, so
a SIGKILL loses nothing; the restarted backend appends to the same file). Four client threads
send GETs and POSTs with unique X-Request-IDs.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from lbapp.backend import HEALTHY, UNHEALTHY

from .conftest import ClientLoad, EchoBackend, run_lb, wait_until

INTERVAL = 0.2
RISE = FALL = 2
JITTER = 0.1


Result = tuple[str, str, int]  # (method, request id, status; -1: no answer)


def alternating(worker: int) -> Callable[[httpx.Client], Result]:
    """A client's step: GET and POST in turn, each with a unique X-Request-ID."""
    sent = itertools.count()

    def step(client: httpx.Client) -> Result:
        method = "POST" if next(sent) % 2 else "GET"
        request_id = uuid.uuid4().hex
        headers = {"x-request-id": request_id}
        try:
            if method == "POST":
                status = client.post("/order", content=b"one order", headers=headers).status_code
            else:
                status = client.get("/item", headers=headers).status_code
        except httpx.HTTPError:
            status = -1
        return method, request_id, status

    return step


def test_killed_backend_costs_no_get_and_no_double_post(echo_factory: Any, tmp_path: Path) -> None:
    logs = [tmp_path / f"ids-{i}.log" for i in (1, 2, 3)]
    backends: list[EchoBackend] = [echo_factory(f"b{i}", "--id-log", str(logs[i - 1])) for i in (1, 2, 3)]
    victim = backends[1]
    with run_lb(
        [b.url for b in backends],
        health_interval=INTERVAL,
        health_timeout=0.5,
        health_jitter=JITTER,
        healthy_threshold=RISE,
        unhealthy_threshold=FALL,
        # The retry budget's floor (3 requests retrying at once, by default) could deny the 4th of
        # the 4 clients when all of them hit the dead backend together; that is the budget working
        # (test_retries.py), not what this test is about.
        retry_budget_min=4,
    ) as server:
        state = server.app.state.clusters.default.pool.backends[1]
        with ClientLoad(server.url, alternating, max_requests=4000, max_seconds=30, timeout=10) as load:
            wait_until(lambda: load.count() >= 100, timeout=15)
            failed_before = state.checks_failed
            victim.kill()
            wait_until(lambda: state.state == UNHEALTHY, timeout=10)
            failed_checks = state.checks_failed - failed_before
            before_restart = load.count()
            wait_until(lambda: load.count() >= before_restart + 100, timeout=15)
            passed_before = state.checks_passed
            victim.start()
            seen_before_restart = len(logs[1].read_text().splitlines())
            wait_until(lambda: state.state == HEALTHY, timeout=10)
            passed_checks = state.checks_passed - passed_before
            back = load.count()
            wait_until(lambda: load.count() >= back + 100, timeout=15)
        results = list(load.outcomes)

    # Down after `fall` failed checks and up after `rise` passed ones (the deadlines above are only
    # there so that a broken health loop fails the test instead of hanging it).
    assert failed_checks >= FALL
    assert passed_checks >= RISE
    gets = [r for r in results if r[0] == "GET"]
    posts = [r for r in results if r[0] == "POST"]
    assert len(gets) >= 150 and len(posts) >= 150
    assert [r for r in gets if r[2] != 200] == []  # retries cover every connect failure
    assert {status for _, _, status in posts} <= {200, 502}
    lines = [line for log in logs for line in log.read_text().splitlines()]
    seen = Counter(line.split()[1] for line in lines if line.startswith("POST "))
    assert max(seen.values()) == 1  # no POST ever reached a backend twice
    for _, request_id, status in posts:
        if status == 200:
            assert seen[request_id] == 1
    # The restarted backend took traffic again.
    assert len(logs[1].read_text().splitlines()) >= seen_before_restart + 20
