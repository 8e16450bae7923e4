"""Backends added, removed and re-weighted while traffic flows, through /lb-admin/backends."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from typing import Any

import httpx

from lbapp.backend import Backend
from lbapp.balancers import LeastTime, WeightedRoundRobin
from lbapp.hashing import ConsistentHash, Sticky
from lbapp.policy import RequestInfo

from .conftest import EchoBackend, LBProcess, run_lb, wait_until

API = "/lb-admin/backends"
STREAM_SIZE = 64 * 1024 * 1024  # far more than the socket buffers hold: the stream stays in flight


def listing(base: str) -> list[dict[str, Any]]:
    response = httpx.get(base + API)
    assert response.status_code == 200
    backends: list[dict[str, Any]] = response.json()["backends"]
    return backends


def state_of(base: str, url: str) -> str | None:
    return next((b["state"] for b in listing(base) if b["url"] == url), None)


def servers(base: str, count: int) -> Counter[str]:
    with httpx.Client(base_url=base) as client:
        return Counter(client.get("/who").json()["server"] for _ in range(count))


def test_add_patch_delete_with_traffic(echo_factory: Any) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    with run_lb([a.url], algorithm="weighted_round_robin") as server:
        assert listing(server.url) == [
            {"url": a.url, "weight": 1, "state": "healthy", "in_flight": 0, "route": "/"}
        ]
        added = httpx.post(server.url + API, json={"url": b.url + "/", "weight": 3})
        assert added.status_code == 201
        assert added.json()["url"] == b.url and added.json()["weight"] == 3
        # It takes traffic once its first health check passed (the checker is woken for it).
        wait_until(lambda: state_of(server.url, b.url) == "healthy")
        assert servers(server.url, 8) == {"a": 2, "b": 6}

        patched = httpx.patch(server.url + API, params={"url": b.url}, json={"weight": 1})
        assert patched.status_code == 200
        assert patched.json()["backends"][0]["weight"] == 1
        assert servers(server.url, 8) == {"a": 4, "b": 4}

        deleted = httpx.delete(server.url + API, params={"url": a.url})
        assert deleted.status_code == 202
        assert deleted.json()["backends"][0]["state"] == "draining"
        assert servers(server.url, 4) == {"b": 4}
        wait_until(lambda: state_of(server.url, a.url) is None)
        metrics = httpx.get(server.url + "/metrics").text
        assert f'backend="{a.url}"' not in metrics  # its series are gone
        assert f'backend="{b.url}"' in metrics


def test_bad_input_changes_nothing(echo_backends: list[EchoBackend]) -> None:
    a = echo_backends[0]
    with run_lb([a.url]) as server:
        before = listing(server.url)
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("POST", {"json": {"url": "ftp://x"}}, 400),
            ("POST", {"json": {"url": "http://x:99999"}}, 400),
            ("POST", {"json": {"url": "http://x?a=1"}}, 400),
            ("POST", {"json": {"weight": 1}}, 400),
            ("POST", {"json": {"url": "http://x:1", "weight": -1}}, 400),
            ("POST", {"json": {"url": "http://x:1", "weight": "2"}}, 400),
            ("POST", {"json": {"url": "http://x:1", "weight": True}}, 400),
            ("POST", {"json": {"url": "http://x:1", "route": "/nope"}}, 404),
            ("POST", {"json": {"url": "http://x:1", "colour": "red"}}, 400),
            ("POST", {"json": {"url": a.url}}, 409),
            ("POST", {"json": ["http://x:1"]}, 400),
            ("POST", {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400),
            ("POST", {"content": b"x" * 70000, "headers": {"content-type": "application/json"}}, 413),
            ("PATCH", {"params": {"url": "http://x:1"}, "json": {"weight": 2}}, 404),
            ("PATCH", {"params": {"url": a.url}, "json": {"weight": -2}}, 400),
            ("PATCH", {"params": {"url": a.url}, "json": {"weight": 2, "url": "x"}}, 400),
            ("PATCH", {"params": {"url": a.url, "route": "/nope"}, "json": {"weight": 2}}, 404),
            ("DELETE", {"params": {"url": "http://x:1"}}, 404),
            ("DELETE", {"params": {}}, 400),
        ]
        for method, kwargs, status in cases:
            response = httpx.request(method, server.url + API, **kwargs)
            assert response.status_code == status, (method, kwargs, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]
        assert listing(server.url) == before


def test_a_new_backend_failing_its_check_gets_no_traffic(echo_factory: Any) -> None:
    a, bad = echo_factory("a"), echo_factory("bad", "--fail")
    with run_lb([a.url], health_path="/health", health_unhealthy_interval=0.05) as server:
        assert httpx.post(server.url + API, json={"url": bad.url}).status_code == 201
        health = server.app.state.health
        rounds = health.rounds
        wait_until(lambda: health.rounds >= rounds + 3)  # several checks failed meanwhile
        assert state_of(server.url, bad.url) == "unhealthy"
        assert servers(server.url, 6) == {"a": 6}


class SlowReader:
    """A long download through the LB, read in a thread: started, then finished on demand."""

    def __init__(self, base: str) -> None:
        self.client = httpx.Client(base_url=base, timeout=30)
        self.go_on = threading.Event()
        self.started = threading.Event()
        self.received = 0
        self.content_ok = True
        self.status = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        with self.client.stream("GET", f"/bytes/{STREAM_SIZE}") as response:
            self.status = response.status_code
            for chunk in response.iter_raw():
                self.received += len(chunk)
                self.content_ok = self.content_ok and chunk == b"x" * len(chunk)
                if not self.started.is_set():
                    self.started.set()
                    self.go_on.wait(30)
        self.client.close()

    def finish(self) -> None:
        self.go_on.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        assert (self.status, self.received, self.content_ok) == (200, STREAM_SIZE, True)


def test_removal_waits_for_a_stream_in_flight(echo_factory: Any) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    with run_lb([a.url, b.url], algorithm="first") as server:
        reader = SlowReader(server.url)  # `first`: the stream goes to a
        assert reader.started.wait(15)
        assert httpx.delete(server.url + API, params={"url": a.url}).status_code == 202
        entry = next(e for e in listing(server.url) if e["url"] == a.url)
        assert (entry["state"], entry["in_flight"]) == ("draining", 1)
        assert servers(server.url, 3) == {"b": 3}
        assert state_of(server.url, a.url) == "draining"  # still there: its stream is running
        undrain = httpx.post(server.url + API + "/undrain", params={"url": a.url})
        assert undrain.status_code == 409  # a backend on its way out is not undrained by accident
        assert state_of(server.url, a.url) == "draining"
        reader.finish()
        wait_until(lambda: state_of(server.url, a.url) is None)


def test_drain_timeout_removes_but_does_not_cut_the_stream(echo_factory: Any) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    with run_lb([a.url, b.url], algorithm="first", drain_timeout=0.2) as server:
        reader = SlowReader(server.url)
        assert reader.started.wait(15)
        assert httpx.delete(server.url + API, params={"url": a.url}).status_code == 202
        wait_until(lambda: state_of(server.url, a.url) is None)
        reader.finish()  # the stream completes intact after its backend left the pool


def test_policies_forget_a_backend() -> None:
    a, b, c = Backend("http://a:1", 1, 0), Backend("http://b:1", 1, 1), Backend("http://c:1", 1, 2)
    request = RequestInfo({"headers": [], "path": "/"}, "10.0.0.1")
    ring = ConsistentHash("ip")
    owner = ring.pick((a, b, c), request)
    ring.forget(c if owner is not c else b)
    remaining = (a, b) if owner is not c else (a, c)
    assert ring.pick(remaining, request) is owner  # keys of the others do not move
    wrr = WeightedRoundRobin()
    wrr.pick((a, b), request)
    wrr.forget(a)
    assert a not in wrr._current
    sticky = Sticky("s", b"k" * 32, WeightedRoundRobin())
    sticky.pick((a, b), request)
    sticky.forget(a)
    assert a not in sticky._values and len(sticky._by_ident) == 1
    least = LeastTime()
    least.observe(a, 0.1, True)
    least.forget(a)
    assert a not in least._cost


def by_worker(base: str, attempts: int = 40) -> dict[int, list[dict[str, Any]]]:
    """GET the list on fresh connections until two workers answered: {pid: backends}."""
    seen: dict[int, list[dict[str, Any]]] = {}
    for _ in range(attempts):
        document = httpx.get(base + API, headers={"connection": "close"}).json()
        seen[document["worker"]] = document["backends"]
        if len(seen) == 2:
            break
    return seen


def layout(backends: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return sorted((b["url"], b["weight"]) for b in backends)


def test_two_workers_share_every_change(echo_factory: Any, tmp_path: Any) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    env = {"LB_BACKENDS": a.url, "LB_HEALTH_INTERVAL": "60", "LB_ACCESS_LOG": "false"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    lb = LBProcess(env, "--workers", "2")
    try:
        workers = wait_until(lambda: by_worker(lb.url) if len(by_worker(lb.url)) == 2 else None, timeout=30)
        assert all(layout(backends) == [(a.url, 1)] for backends in workers.values())

        assert httpx.post(lb.url + API, json={"url": b.url, "weight": 2}).status_code == 201
        want = sorted([(a.url, 1), (b.url, 2)])
        wait_until(lambda: all(layout(v) == want for v in by_worker(lb.url).values()) and len(workers) == 2)
        # Each worker checks the new backend itself, then sends it traffic.
        wait_until(
            lambda: all(
                {e["url"]: e["state"] for e in v}.get(b.url) == "healthy" for v in by_worker(lb.url).values()
            )
        )
        assert httpx.patch(lb.url + API, params={"url": b.url}, json={"weight": 5}).status_code == 200
        assert httpx.delete(lb.url + API, params={"url": a.url}).status_code == 202
        final = [(b.url, 5)]
        wait_until(lambda: all(layout(v) == final for v in by_worker(lb.url).values()))
        assert servers(lb.url, 4) == {"b": 4}

        # A worker that dies is replaced by one that starts from the current layout.
        victim = next(iter(by_worker(lb.url)))
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            seen = by_worker(lb.url)
            return victim not in seen and len(seen) == 2 and all(layout(v) == final for v in seen.values())

        wait_until(replaced, timeout=30)
    finally:
        lb.stop()
