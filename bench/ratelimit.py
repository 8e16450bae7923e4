#!/usr/bin/env python3
"""Cost per request of the rate limiter: lbapp with it off, local, shared table, Redis (stdlib only).

One backend (nginx `return 200`, or lbapp's echo backend without nginx), one redis-server with
persistence off, then for each scenario one lbapp (uvicorn, 1 worker, pinned to CPU 0 when
`taskset` exists) loaded with `wrk -t1 -c$CONNECTIONS -d$DURATION` from CPU 1. The limit is
so high that every request passes: what is measured is the check, not refusals (`refusing`
measures a 429 answered without a backend). Printed: requests/s, lbapp CPU µs per request,
and both as a ratio against `off`, measured in the same run.

    PYTHON=.venv/bin/python bench/ratelimit.py                  # 10 s per scenario
    DURATION=30 PYTHON=.venv/bin/python bench/ratelimit.py
    SMOKE=300 PYTHON=.venv/bin/python bench/ratelimit.py        # 300 requests, no wrk: a check

Only 127.0.0.1; every process started is in its own session and stopped by its id.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "32"))
SMOKE = int(os.environ.get("SMOKE", "0"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
HIGH = "1000000000/s"  # nobody is refused
SCENARIOS = {  # name: (LB_* settings, uses PROMETHEUS_MULTIPROC_DIR)
    "off": ({}, False),
    "local": ({"LB_RATE_LIMIT": HIGH}, False),
    "shared": ({"LB_RATE_LIMIT": HIGH}, True),
    "redis": ({"LB_RATE_LIMIT": HIGH, "LB_RATE_LIMIT_REDIS_URL": "redis://127.0.0.1:{redis}/0"}, False),
    "refusing": ({"LB_RATE_LIMIT": "1/h"}, False),
}
started: list[subprocess.Popen[bytes]] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
    )
    started.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_http(port: int, path: str = "/", seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"nothing answered on port {port}{path} within {seconds}s")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children that exited (uvicorn's worker is itself here)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def load(port: int, duration: int) -> tuple[float, int]:
    """(seconds, requests) of one load run: wrk, or SMOKE sequential requests."""
    if SMOKE:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        began = time.perf_counter()
        for _ in range(SMOKE):
            conn.request("GET", "/")
            conn.getresponse().read()
        return time.perf_counter() - began, SMOKE
    pin = ["taskset", "-c", "1"] if shutil.which("taskset") else []
    cmd = [*pin, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    match = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if match is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    seconds = float(match.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(3)]
    return seconds, int(match.group(1))


def main() -> int:
    if not SMOKE and not shutil.which("wrk"):
        print("bench/ratelimit.py: needs wrk (or SMOKE=<requests>)", file=sys.stderr)
        return 2
    if not shutil.which("redis-server"):
        print("bench/ratelimit.py: needs redis-server", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lbapp-bench-ratelimit-"))
    backend, redis = free_port(), free_port()
    if shutil.which("nginx"):
        conf = work / "nginx.conf"
        conf.write_text(
            f"daemon off; worker_processes 1; pid {work}/nginx.pid; error_log stderr;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; client_body_temp_path {work}; proxy_temp_path {work};\n"
            f"  server {{ listen 127.0.0.1:{backend}; keepalive_requests 100000;\n"
            '    location / { return 200 "ok\\n"; } } }\n'
        )
        start(["nginx", "-c", str(conf), "-p", str(work)], work / "nginx.log")
    else:
        start([PYTHON, "-m", "lbapp.echo", "--port", str(backend)], work / "echo.log")
    start(
        ["redis-server", "--port", str(redis), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        work / "redis.log",
    )
    wait_http(backend, "/health")
    results: dict[str, tuple[float, float]] = {}
    for name, (settings, shared) in SCENARIOS.items():
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
        env.update({k: v.format(redis=redis) for k, v in settings.items()})
        env.update({"LB_BACKENDS": f"http://127.0.0.1:{backend}", "LB_HEALTH_INTERVAL": "5"})
        env.setdefault("LB_ACCESS_LOG", os.environ.get("LB_ACCESS_LOG", "false"))
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if shared:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(work / f"metrics-{name}")
        pin = ["taskset", "-c", "0"] if shutil.which("taskset") and not SMOKE else []
        cmd = [*pin, PYTHON, "-m", "uvicorn", "lbapp:app", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--no-server-header"]
        cmd += ["--no-date-header", "--no-proxy-headers", "--log-level", "warning"]
        lb = start(cmd, work / f"lbapp-{name}.log", env)
        wait_http(port, "/lb-health")
        status = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        status.request("GET", "/")
        answer = status.getresponse()
        if (answer.getheader("RateLimit-Policy") is None) != (name == "off"):
            raise SystemExit(f"{name}: RateLimit-Policy header {answer.getheader('RateLimit-Policy')!r}")
        if not SMOKE:
            load(port, 2)  # warm-up: connections, caches
        before = cpu_seconds(lb.pid)
        seconds, requests = load(port, DURATION)
        cpu = cpu_seconds(lb.pid) - before
        stop(lb)
        results[name] = (requests / seconds, cpu / requests * 1e6)
        print(f"  {name}: {requests / seconds:,.0f} req/s, {cpu / requests * 1e6:.1f} µs CPU per request",
              file=sys.stderr)  # fmt: skip
    off_rps, off_cpu = results["off"]
    print(f"| limiter | req/s | lbapp CPU µs/req | req/s vs off | CPU/req vs off |  ({work})")
    print("|---|---|---|---|---|")
    for name, (rps, cpu) in results.items():
        print(f"| {name} | {rps:,.0f} | {cpu:.1f} | {rps / off_rps:.3f} | {cpu / off_cpu:.3f} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        for proc in reversed(started):
            stop(proc)
