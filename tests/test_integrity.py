"""Integrity under faults: nothing corrupted, truncated or duplicated while a backend dies twice.

A bounded concurrent load of GETs (a pseudo-random body the client can regenerate, `/random/N/SEED`)
and POSTs and PUTs (a random body up to 3 MiB that the echo backend mirrors back, with the sha256 of
what it received) runs through a real lbapp over three echo backends; one is SIGKILLed and restarted
on the same port twice. Every exchange must end as a complete, byte-exact 200, an explicit
502/503/504, or an aborted connection (a body that broke off mid-way is never completed); no POST
reaches two backends; and the backends' request-id logs (appended before answering, so they survive
SIGKILL) reconcile with what the client saw.
"""

from __future__ import annotations

import functools
import hashlib
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lbapp.backend import HEALTHY, UNHEALTHY
from lbapp.echo import random_bytes

from .conftest import ClientLoad, EchoBackend, run_lb, wait_until

MIB = 1 << 20
SOURCE = random.Random(16).randbytes(4 * MIB)  # request bodies are slices of this, at random offsets
EXPLICIT = {502, 503, 504}


@dataclass
class Outcome:
    method: str
    request_id: str
    status: int  # -1: the connection was aborted (or the exchange failed before any answer)
    backend: str | None  # X-Backend of a 200
    intact: bool  # a 200 whose body and checksums are exactly what was sent / generated


def body_size(rng: random.Random) -> int:
    """Mostly small bodies (buffered by lbapp), some streamed ones up to 3 MiB."""
    kind = rng.random()
    if kind < 0.2:
        return 0
    if kind < 0.6:
        return rng.randint(1, 64 * 1024)
    if kind < 0.9:
        return rng.randint(64 * 1024, MIB)
    return rng.randint(MIB, 3 * MIB)


def exchange(client: httpx.Client, rng: random.Random) -> Outcome:
    method = rng.choice(["GET", "GET", "POST", "PUT"])
    request_id = uuid.uuid4().hex
    headers = {"x-request-id": request_id}
    size = body_size(rng)
    try:
        if method == "GET":
            seed = uuid.uuid4().hex
            response = client.get(f"/random/{size}/{seed}", headers=headers)
            expected = random_bytes(size, seed)
            intact = response.content == expected
        else:
            start = rng.randint(0, len(SOURCE) - size)
            body = SOURCE[start : start + size]
            response = client.request(method, "/mirror", content=body, headers=headers)
            sha = hashlib.sha256(body).hexdigest()
            intact = (
                response.content == body
                and response.headers.get("x-body-sha256") == sha
                and response.headers.get("x-body-bytes") == str(size)
            )
    except httpx.TransportError:
        return Outcome(method, request_id, -1, None, False)
    status = response.status_code
    backend = response.headers.get("x-backend") if status == 200 else None
    return Outcome(method, request_id, status, backend, status == 200 and intact)


def load(url: str) -> ClientLoad[Outcome]:
    """4 clients, each with its own seeded mix of exchanges; bounded in count and in time."""
    return ClientLoad(
        url, lambda worker: functools.partial(exchange, rng=random.Random(worker)), max_requests=3000
    )


def logged(log: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in log.read_text().splitlines()]  # type: ignore[misc]


def test_every_exchange_is_intact_or_an_explicit_failure(echo_factory: Any, tmp_path: Path) -> None:
    names = ["b1", "b2", "b3"]
    logs = {name: tmp_path / f"{name}.log" for name in names}
    backends: list[EchoBackend] = [echo_factory(name, "--id-log", str(logs[name])) for name in names]
    victim = backends[1]
    settings: dict[str, Any] = {
        "health_interval": 0.2,
        "health_timeout": 0.5,
        "health_jitter": 0.1,
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
    }
    with run_lb([b.url for b in backends], **settings) as server:
        state = server.app.state.clusters.default.pool.backends[1]
        with load(server.url) as running:
            running.more(60)
            for _ in range(2):  # killed and restarted twice, under load, with exchanges in flight
                wait_until(lambda: state.in_flight > 0, timeout=15, interval=0.001)
                victim.kill()
                wait_until(lambda: state.state == UNHEALTHY, timeout=15)
                running.more(40)
                served = len(logs["b2"].read_text().splitlines())
                victim.start()
                wait_until(lambda: state.state == HEALTHY, timeout=15)
                running.more(60)
                assert len(logs["b2"].read_text().splitlines()) > served  # it takes traffic again
        outcomes = list(running.outcomes)

    assert running.count() >= 260
    methods = Counter(o.method for o in outcomes)
    assert min(methods.values()) >= 40, methods
    # Every exchange: a byte-exact 200, lbapp's explicit 502/503/504, or an aborted connection.
    wrong = [o for o in outcomes if not (o.intact or o.status in EXPLICIT or o.status == -1)]
    assert wrong == []
    intact = sum(o.intact for o in outcomes)
    assert intact >= 0.9 * len(outcomes)  # faults cost a few exchanges, not the load

    # The backends' logs reconcile with the client's record.
    seen: dict[str, list[tuple[str, str]]] = defaultdict(list)  # request id -> [(backend, method)]
    for name, log in logs.items():
        for method, request_id in logged(log):
            seen[request_id].append((name, method))
    sent = {o.request_id: o for o in outcomes}
    assert set(seen) <= set(sent)  # nothing reached a backend that no client sent
    for request_id, deliveries in seen.items():
        assert {method for _, method in deliveries} == {sent[request_id].method}
    for outcome in outcomes:
        deliveries = seen.get(outcome.request_id, [])
        if outcome.method == "POST":
            assert len(deliveries) <= 1, deliveries  # no POST ever reached two backends
        if outcome.intact:
            assert (outcome.backend, outcome.method) in deliveries  # the one that answered logged it
