"""The hardened protocol (lbapp/server.py), end to end: `python -m lbapp` in front of an echo
backend, probed with raw sockets.

Timing: every elapsed time is checked against a generous upper bound derived from the configured
timeout (the issue's "timeout + 1 s"), and against the timeout itself as a lower bound (a slow
machine only makes answers later); everything else is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbapp.server import HeadLimits
from lbapp.settings import Settings

from .conftest import EchoBackend, LauncherProcess, wait_until

HEADER_TIMEOUT = 2.0
MAX_HEADER_SIZE = 8 * 1024
MAX_HEADER_COUNT = 20


@pytest.fixture(scope="module")
def id_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ids") / "ids.log"


@pytest.fixture(scope="module")
def backend(id_log: Path) -> Iterator[EchoBackend]:
    echo = EchoBackend("backend-1", "--id-log", str(id_log))
    try:
        yield echo.start()
    finally:
        echo.stop()


@pytest.fixture(scope="module")
def lb(backend: EchoBackend) -> Iterator[LauncherProcess]:
    env = {
        "LB_BACKENDS": backend.url,
        "LB_HEALTH_INTERVAL": "60",
        "LB_ACCESS_LOG": "false",
        "LB_CLIENT_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "LB_MAX_HEADER_SIZE": str(MAX_HEADER_SIZE),
        "LB_MAX_HEADER_COUNT": str(MAX_HEADER_COUNT),
    }
    server = LauncherProcess(env)
    try:
        yield server
    finally:
        server.stop()


_pending: dict[int, bytes] = {}  # bytes read past a response, per socket (pipelined answers)


def connect(lb: LauncherProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    _pending.pop(sock.fileno(), None)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes; fails if it keeps the connection open."""
    deadline = time.monotonic() + timeout
    chunks = [_pending.pop(sock.fileno(), b"")]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {timeout}s; got {b''.join(chunks)!r}")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_response(
    sock: socket.socket, timeout: float = 10.0
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """One response with a Content-Length body, leaving the connection open: (status line, headers,
    body). Bytes after it (the next pipelined answer) are kept for the next call on this socket."""
    sock.settimeout(timeout)
    data = _pending.pop(sock.fileno(), b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(b":") for line in lines)]
    length = int(dict(headers)[b"content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        rest += chunk
    if len(rest) > length:
        _pending[sock.fileno()] = rest[length:]
    return status, headers, rest[:length]


def get(path: str, request_id: str = "", extra: bytes = b"") -> bytes:
    rid = f"X-Request-ID: {request_id}\r\n".encode() if request_id else b""
    return f"GET {path} HTTP/1.1\r\nHost: lb.test\r\n".encode() + rid + extra + b"\r\n"


def trickle_until_answered(sock: socket.socket, data: bytes, limit: float) -> tuple[bytes, float]:
    """Send `data` one byte a second until the server answers; (first bytes, seconds since start)."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > limit:
            break
        sock.sendall(bytes([byte]))
        readable, _, _ = select.select([sock], [], [], 1.0)
        if readable:
            return sock.recv(65536), time.monotonic() - start
    raise AssertionError(f"no answer within {limit}s of trickling")


def ids_seen(id_log: Path) -> str:
    return id_log.read_text() if id_log.exists() else ""


def assert_closed_with(answer: bytes, status: bytes) -> None:
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nconnection: close" in head.lower(), head
    assert head.lower().count(b"\r\ndate: ") == 1, head  # RFC 9110 §6.6.1: exactly one Date
    assert json.loads(body)["error"], body  # lbapp's short JSON error, never a traceback
    assert len(body) < 100 and len(answer.split(b"HTTP/1.1 ")) == 2, answer  # one answer only


def test_defaults_match_the_settings() -> None:
    settings = Settings()
    assert HeadLimits.from_settings(settings) == HeadLimits() == HeadLimits(10.0, 32 * 1024, 100)


def test_trickled_head_gets_408_within_the_timeout_and_the_connection_closes(lb: LauncherProcess) -> None:
    with connect(lb) as sock:
        first, elapsed = trickle_until_answered(
            sock, b"GET /slow HTTP/1.1\r\nHost: lb.test\r\nX-Slow: " + b"a" * 60, HEADER_TIMEOUT + 5
        )
        rest = read_until_closed(sock)
    assert HEADER_TIMEOUT - 0.1 <= elapsed <= HEADER_TIMEOUT + 1, elapsed
    assert_closed_with(first + rest, b"408")


def test_fresh_connection_that_sends_nothing_gets_408_and_closes(lb: LauncherProcess) -> None:
    with connect(lb) as sock:
        start = time.monotonic()
        answer = read_until_closed(sock, timeout=HEADER_TIMEOUT + 5)
        elapsed = time.monotonic() - start
    assert HEADER_TIMEOUT - 0.1 <= elapsed <= HEADER_TIMEOUT + 1, elapsed
    assert_closed_with(answer, b"408")


def test_keep_alive_next_head_trickled_gets_408(lb: LauncherProcess) -> None:
    with connect(lb) as sock:
        sock.sendall(get("/first"))
        status, _, _ = read_response(sock)
        assert status.startswith(b"HTTP/1.1 200"), status
        first, elapsed = trickle_until_answered(sock, get("/second", extra=b"X-Slow: yes\r\n"), 10)
        rest = read_until_closed(sock)
    assert HEADER_TIMEOUT - 0.1 <= elapsed <= HEADER_TIMEOUT + 1, elapsed
    assert_closed_with(first + rest, b"408")


def test_blank_lines_do_not_keep_an_idle_connection_open(lb: LauncherProcess) -> None:
    """CRLFs between requests (which parsers skip) reset uvicorn's keep-alive timer each time;
    the head timer counts them as the start of a head that never completes."""
    with connect(lb) as sock:
        sock.sendall(get("/first"))
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200")
        first, elapsed = trickle_until_answered(sock, b"\r\n" * 20, 15)
        rest = read_until_closed(sock)
    assert elapsed <= HEADER_TIMEOUT + 1, elapsed
    assert_closed_with(first + rest, b"408")


def test_idle_keep_alive_connection_is_closed_silently_by_uvicorn(lb: LauncherProcess) -> None:
    """Between two requests the idle timeout is uvicorn's keep-alive (5 s): a close, no 408."""
    with connect(lb) as sock:
        sock.sendall(get("/first"))
        status, _, _ = read_response(sock)
        assert status.startswith(b"HTTP/1.1 200"), status
        assert read_until_closed(sock, timeout=5 + 5) == b""


def test_normal_requests_reuse_the_connection_and_pipelining_works(lb: LauncherProcess) -> None:
    with connect(lb) as sock:
        for path in ("/one", "/two"):
            sock.sendall(get(path))
            status, _, body = read_response(sock)
            assert status.startswith(b"HTTP/1.1 200"), status
            assert f'"path": "{path}"'.encode() in body
        sock.sendall(get("/three") + get("/four"))  # pipelined, in one write
        for path in ("/three", "/four"):
            status, _, body = read_response(sock)
            assert status.startswith(b"HTTP/1.1 200") and f'"path": "{path}"'.encode() in body


def test_no_server_header_and_at_most_one_date(lb: LauncherProcess) -> None:
    with connect(lb) as sock:
        for path in ("/proxied", "/lb-health"):
            sock.sendall(get(path))
            status, headers, _ = read_response(sock)
            assert status.startswith(b"HTTP/1.1 200"), status
            names = [name for name, _ in headers]
            assert b"server" not in names, headers
            assert names.count(b"date") <= 1, headers
        # The echo backend sends its own Date: lbapp's server must not add a second one.
        sock.sendall(get("/proxied"))
        _, headers, _ = read_response(sock)
        assert [name for name, _ in headers].count(b"date") == 1, headers


def test_oversized_head_gets_431_and_the_backend_never_sees_it(lb: LauncherProcess, id_log: Path) -> None:
    rejected, control = uuid.uuid4().hex, uuid.uuid4().hex
    big = b"X-Big: " + b"b" * (MAX_HEADER_SIZE + 100) + b"\r\n"
    with connect(lb) as sock:
        sock.sendall(get("/big", rejected, big))
        answer = read_until_closed(sock)
    assert_closed_with(answer, b"431")
    # A request target past the limit too.
    with connect(lb) as sock:
        sock.sendall(get("/" + "t" * (MAX_HEADER_SIZE + 100), rejected))
        assert_closed_with(read_until_closed(sock), b"431")
    # The backend logs the ids it gets; a normal request's arrives, the rejected one's never.
    with connect(lb) as sock:
        sock.sendall(get("/control", control))
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200")
    wait_until(lambda: control in ids_seen(id_log))
    assert rejected not in ids_seen(id_log)


def test_too_many_headers_get_431_and_the_backend_never_sees_them(lb: LauncherProcess, id_log: Path) -> None:
    rejected, control = uuid.uuid4().hex, uuid.uuid4().hex
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADER_COUNT))  # + Host + X-Request-ID
    with connect(lb) as sock:
        sock.sendall(get("/many", rejected, many))
        assert_closed_with(read_until_closed(sock), b"431")
    allowed = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADER_COUNT - 2))  # exactly the limit
    with connect(lb) as sock:
        sock.sendall(get("/control", control, allowed))
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200")
    wait_until(lambda: control in ids_seen(id_log))
    assert rejected not in ids_seen(id_log)


def test_a_header_streamed_in_pieces_is_cut_off_at_the_limit(lb: LauncherProcess) -> None:
    """httptools holds an incomplete header itself: the bytes are counted as they arrive."""
    with connect(lb) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: lb.test\r\nX-Long: ")
        sent = 0
        while sent <= MAX_HEADER_SIZE:
            sock.sendall(b"v" * 1024)
            sent += 1024
            time.sleep(0.01)  # separate reads on the server side (not a timing assumption)
        answer = read_until_closed(sock)  # the head is past the limit and still incomplete
    assert_closed_with(answer, b"431")


def test_pipelined_bad_head_is_answered_after_the_response_before_it(lb: LauncherProcess) -> None:
    big = b"X-Big: " + b"b" * (MAX_HEADER_SIZE + 100) + b"\r\n"
    with connect(lb) as sock:
        sock.sendall(get("/sleep/0.3") + get("/big", extra=big))
        status, _, body = read_response(sock)
        assert status.startswith(b"HTTP/1.1 200"), (status, body)  # complete, not interleaved
        assert_closed_with(read_until_closed(sock), b"431")


def test_malformed_request_gets_400_and_closes(lb: LauncherProcess) -> None:
    with connect(lb) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        assert_closed_with(read_until_closed(sock), b"400")


def test_malformed_chunked_body_gets_400_and_closes(lb: LauncherProcess) -> None:
    """The request is already with the app (streaming to the backend) when its body turns bad."""
    with connect(lb) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: lb.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"5\r\nhello\r\n")
        time.sleep(0.2)  # let the app start the upstream request (the test holds either way)
        sock.sendall(b"zz\r\nnot a chunk\r\n")
        assert_closed_with(read_until_closed(sock), b"400")


def test_launcher_survives_the_abuse(lb: LauncherProcess) -> None:
    """After every test above, the same process still serves (no dead worker)."""
    assert lb.proc.poll() is None
    with connect(lb) as sock:
        sock.sendall(get("/still-here"))
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200")
    assert os.path.exists(f"/proc/{lb.proc.pid}")


def test_uvicorn_does_not_rewrite_the_client_address(lb: LauncherProcess) -> None:
    """uvicorn's proxy-header handling is off: a client on 127.0.0.1 cannot set its address with
    X-Forwarded-For (lbapp, trusting no proxy by default, replaces it with the TCP peer)."""
    with connect(lb) as sock:
        sock.sendall(get("/who", extra=b"X-Forwarded-For: 203.0.113.9\r\n"))
        status, _, body = read_response(sock)
    assert status.startswith(b"HTTP/1.1 200"), status
    received = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert received["x-forwarded-for"] == "127.0.0.1", received


def test_absolute_form_authority_replaces_host(lb: LauncherProcess) -> None:
    """RFC 9112 §3.2.2: a proxy receiving an absolute-form target uses its authority as Host."""
    with connect(lb) as sock:
        sock.sendall(b"GET http://example.test:8081/abs?q=1 HTTP/1.1\r\nHost: other.test\r\n\r\n")
        status, _, body = read_response(sock)
    assert status.startswith(b"HTTP/1.1 200"), status
    seen = json.loads(body)
    assert (seen["raw_path"], seen["query"]) == ("/abs", "q=1")
    assert seen["headers"]["host"] == "example.test:8081"
    assert seen["headers"]["x-forwarded-host"] == "example.test:8081"
