"""Shared fixtures: real uvicorn servers on 127.0.0.1 ephemeral ports.

Echo backends run as subprocesses (so a test can SIGKILL one); the load balancer runs either in
a thread of the test process (so a test can look at its state) or as a subprocess (to measure its
memory). Every wait is a poll with a deadline; every process is stopped by the PID we started.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import httpx
import pytest
import uvicorn

from lbapp import Settings, create_app
from lbapp.backend import Backend
from lbapp.pool import Pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def listening_socket(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 10) -> None:
    """SIGTERM a process we started, then SIGKILL it if it is still there after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code < 500
    except httpx.HTTPError:
        return False


class EchoBackend:
    """`python -m lbapp.echo` in a subprocess, on a port of its own that survives restarts
    (on 127.0.0.1, or another loopback address and a given port: DNS discovery's tests)."""

    def __init__(self, name: str, *args: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.args = args
        self.host = host
        self.sock = listening_socket(port, host)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, wait: bool = True) -> EchoBackend:
        if self.sock.fileno() == -1:
            self.sock = listening_socket(self.port, self.host)
        fd = self.sock.fileno()
        cmd = [sys.executable, "-m", "lbapp.echo", "--fd", str(fd), "--name", self.name, *self.args, *extra]
        self.proc = subprocess.Popen(cmd, pass_fds=[fd], cwd=ROOT, stdout=subprocess.PIPE)
        if wait:
            # The socket already listens (connections wait in its backlog): the process only has
            # to come up. Its first line says it has; a poll with a deadline covers a crash.
            assert self.proc.stdout is not None
            line = wait_until(lambda: self._first_line(), timeout=15)
            assert b"listening" in line, line
        return self

    def _first_line(self) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"echo backend {self.name} exited with {self.proc.returncode}")
        ready, _, _ = select.select([self.proc.stdout], [], [], 0.05)
        return self.proc.stdout.readline() if ready else None

    def kill(self) -> None:
        """SIGKILL, and close our copy of the listening socket so connects are refused."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.sock.close()

    def stop(self) -> None:
        stop_process(self.proc)
        self.sock.close()


class ThreadedServer:
    """A uvicorn server running an app in a thread of the test process, with its own loop."""

    def __init__(self, app: Any, **config: Any) -> None:
        self.app = app
        self.sock = listening_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        options: dict[str, Any] = {
            "log_level": "warning",
            "access_log": False,
            "server_header": False,
            "date_header": False,
            "proxy_headers": False,
            "timeout_graceful_shutdown": 5,
        }
        options.update(config)
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=15)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


def mark_down(pool: Pool, backend: Backend) -> None:
    """Fail `backend`'s active checks until the pool's rules mark it unhealthy."""
    for _ in range(pool.unhealthy_threshold):
        pool.record_check(backend, False, "marked down by the test")


def mark_up(pool: Pool, backend: Backend) -> None:
    """Pass `backend`'s active checks until the pool's rules mark it healthy again."""
    for _ in range(pool.healthy_threshold):
        pool.record_check(backend, True, "marked up by the test")


def make_settings(backends: list[str] | list[dict[str, Any]], **overrides: Any) -> Settings:
    """Settings for tests: explicit backends, a slow health loop unless a test wants one."""
    values: dict[str, Any] = {
        "backends": backends,
        "health_interval": 60,
        "retry_delay": 0,
        "access_log": False,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.contextmanager
def run_lb(backends: list[str] | list[dict[str, Any]], **overrides: Any) -> Iterator[ThreadedServer]:
    app = create_app(make_settings(backends, **overrides))
    with ThreadedServer(app) as server:
        yield server


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No LB_* variable or settings.env of the developer's leaks into a test."""
    for key in list(os.environ):
        if key.startswith("LB_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def echo_backends() -> Iterator[list[EchoBackend]]:
    """Three echo backends shared by a module's tests (tests must not kill these)."""
    backends = [EchoBackend(f"backend-{i}") for i in (1, 2, 3)]
    try:
        for backend in backends:
            backend.start()
        yield backends
    finally:
        for backend in backends:
            backend.stop()


@pytest.fixture
def echo_factory() -> Iterator[Callable[..., EchoBackend]]:
    """Start private echo backends (which a test may kill or restart); all stopped afterwards."""
    started: list[EchoBackend] = []

    def start(name: str, *args: str) -> EchoBackend:
        backend = EchoBackend(name, *args)
        started.append(backend)  # before start(): a failed start is still cleaned up
        return backend.start()

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture(scope="module")
def lb(echo_backends: list[EchoBackend]) -> Iterator[ThreadedServer]:
    """A load balancer in front of the three shared echo backends."""
    with run_lb([b.url for b in echo_backends]) as server:
        yield server


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send exact bytes and read until the server closes: for what an HTTP client would hide."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


class LBProcess:
    """`uvicorn lbapp:app` in a subprocess, configured through LB_* variables like a user would."""

    def __init__(self, env: dict[str, str], *uvicorn_args: str, stderr: Any = None) -> None:
        self.sock = listening_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        fd = self.sock.fileno()
        cmd = [sys.executable, "-m", "uvicorn", "lbapp:app", "--fd", str(fd), "--no-access-log"]
        cmd += ["--no-proxy-headers", "--no-server-header", "--no-date-header", "--log-level", "warning"]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [*cmd, *uvicorn_args], pass_fds=[fd], cwd=ROOT, env=full_env, stderr=stderr
        )
        wait_until(lambda: self._up(), timeout=20)

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"lbapp exited with {self.proc.returncode}")
        return _answers(self.url + "/lb-health")

    def rss(self) -> int:
        """Resident memory of the load balancer process, in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        stop_process(self.proc, grace=15)
        self.sock.close()


class LauncherProcess(LBProcess):
    """`python -m lbapp` (the launcher, with its hardened protocol) in a subprocess, on an inherited
    socket, configured through LB_* variables; `args` are the launcher's flags."""

    def __init__(self, env: dict[str, str], *args: str, stderr: Any = None) -> None:
        self.sock = listening_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        fd = self.sock.fileno()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lbapp", "--fd", str(fd), *args],
            pass_fds=[fd],
            cwd=ROOT,
            env=full_env,
            stderr=stderr,
        )
        wait_until(lambda: self._up(), timeout=30)


class RedisServer:
    """A real `redis-server` on 127.0.0.1, persistence off; restartable on the same port."""

    def __init__(self) -> None:
        with contextlib.closing(listening_socket()) as sock:
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        cmd += ["--enable-debug-command", "local"]  # DEBUG SLEEP: a slow Redis on demand
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self._pong, timeout=15)
        return self

    def _pong(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            error = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"redis-server exited with {self.proc.returncode}: {error}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for one test (which may kill and restart it on the same port)."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.stop()


T = TypeVar("T")


class ClientLoad(Generic[T]):
    """`workers` client threads against `url`, each sending with the step `worker_step(i)` made
    for it (one `httpx.Client` each) until stopped; every step's outcome is kept, in `outcomes`.
    Bounded in count (`max_requests`) and in time (`max_seconds`)."""

    def __init__(
        self,
        url: str,
        worker_step: Callable[[int], Callable[[httpx.Client], T]],
        workers: int = 4,
        max_requests: int = 3000,
        max_seconds: float = 50,
        timeout: float = 30,
    ) -> None:
        self.url = url
        self.worker_step = worker_step
        self.timeout = timeout
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: list[T] = []
        self.max_requests = max_requests
        self.deadline = time.monotonic() + max_seconds
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(workers)]

    def run(self, worker: int) -> None:
        step = self.worker_step(worker)
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                if self.count() >= self.max_requests:
                    return
                outcome = step(client)
                with self.lock:
                    self.outcomes.append(outcome)

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def more(self, n: int, timeout: float = 30) -> None:
        """Wait until `n` more exchanges are over."""
        target = self.count() + n
        wait_until(lambda: self.count() >= target, timeout=timeout)

    def __enter__(self) -> ClientLoad[T]:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
