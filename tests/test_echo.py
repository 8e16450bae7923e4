"""The echo backend: what it reports, and its --fail and --latency switches."""

from __future__ import annotations

import time
from typing import Any

import httpx


def test_echo_describes_the_request(echo_factory: Any) -> None:
    backend = echo_factory("backend-x")
    document = httpx.post(backend.url + "/p/a?q=1", content=b"abc", headers={"X-Test": "1"}).json()
    assert document["server"] == "backend-x"
    assert (document["method"], document["path"], document["query"]) == ("POST", "/p/a", "q=1")
    assert document["headers"]["x-test"] == "1" and document["body_bytes"] == 3
    assert httpx.get(backend.url + "/health").status_code == 200
    assert len(httpx.get(backend.url + "/bytes/100000").content) == 100000


def test_fail_and_latency_switches(echo_factory: Any) -> None:
    failing = echo_factory("f", "--fail")
    assert httpx.get(failing.url + "/health").status_code == 500
    assert httpx.get(failing.url + "/").status_code == 500
    slow = echo_factory("s", "--latency", "0.3")
    started = time.monotonic()
    assert httpx.get(slow.url + "/").status_code == 200
    assert time.monotonic() - started >= 0.3
