"""Bodies stream both ways: memory stays flat however large the body is."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import httpx

from .conftest import EchoBackend, LBProcess, run_lb

SIZE = int(os.environ.get("LB_TEST_STREAM_MIB", "256")) * 1024 * 1024
MAX_GROWTH = 48 * 1024 * 1024


class PeakRSS:
    """Samples a process's RSS from a thread until stopped; keeps the peak."""

    def __init__(self, lb: LBProcess) -> None:
        self.lb = lb
        self.peak = lb.rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.lb.rss())

    def __enter__(self) -> PeakRSS:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def test_large_download_and_upload_keep_memory_flat(echo_backends: list[EchoBackend]) -> None:
    lb = LBProcess({"LB_BACKENDS": echo_backends[0].url, "LB_HEALTH_INTERVAL": "60"})
    try:
        with httpx.Client(base_url=lb.url, timeout=60) as client:
            assert client.get("/warm").status_code == 200
            baseline = lb.rss()
            with PeakRSS(lb) as download:
                received = 0
                with client.stream("GET", f"/bytes/{SIZE}") as response:
                    for chunk in response.iter_raw():
                        received += len(chunk)
            assert received == SIZE

            def body() -> Iterator[bytes]:
                block = b"u" * (1024 * 1024)
                for _ in range(SIZE // len(block)):
                    yield block

            with PeakRSS(lb) as upload:
                response = client.post("/upload", content=body())
            assert response.json()["body_bytes"] == SIZE
    finally:
        lb.stop()
    assert download.peak - baseline < MAX_GROWTH, (
        f"download grew RSS by {(download.peak - baseline) >> 20} MiB"
    )
    assert upload.peak - baseline < MAX_GROWTH, f"upload grew RSS by {(upload.peak - baseline) >> 20} MiB"


def test_server_sent_events_stream_event_by_event(echo_backends: list[EchoBackend]) -> None:
    """The backend sends one event and waits: the client must get it before the rest exists."""
    accept = {"Accept": "text/event-stream"}
    with (
        run_lb([echo_backends[0].url]) as lb,
        httpx.Client(base_url=lb.url, timeout=20) as client,
        client.stream("GET", "/sse/gate-1", headers=accept) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        lines = response.iter_lines()
        first = [next(lines) for _ in range(3)]
        # The backend holds the second event until released: had lbapp buffered the stream,
        # the first event would not be here yet (and this read would time out).
        assert first == ["id: 1", "data: first", ""]
        assert client.get("/sse-release/gate-1").status_code == 200
        rest = list(lines)
    assert rest == ["id: 2", "data: second", "", "id: 3", "data: third", ""]
