#!/usr/bin/env python3
"""lbapp soak test (`make soak`; not in CI): does anything grow over time under faults?

Starts three echo backends and `uvicorn lbapp:app` (one worker, the production flags) on
127.0.0.1, then for `--duration` seconds (default 600):
  * `--clients` threads send a steady mix of GET `/random/N/SEED` and POST/PUT `/mirror` with random
    bodies up to 1 MiB, and check every 200 byte for byte;
  * every `--fault-every` seconds one backend (in turn) is SIGKILLed and restarted `--down-for`
    seconds later on the same port;
  * an aborter opens uploads and downloads and breaks them off half-way (FIN or RST);
  * every `--interval` seconds a sample goes to the CSV: lbapp's RSS and open fds (/proc), its
    asyncio tasks (`/lb-status?format=json` "process"), requests in flight (Prometheus gauge), and the
    client-side counts (ok, lbapp's 502/503/504, aborted exchanges, corrupt answers).
At the end it writes `bench/results/soak-<time>.csv` and `.png` (the plot needs matplotlib:
`pip install -r bench/requirements.txt`) and exits non-zero if RSS or fds grew more than
`--max-growth` (5%) between the first and the last fifth of the samples after `--warmup`, or if any
answer was corrupt. Every process it starts is stopped by its PID; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from lbapp.echo import random_bytes  # noqa: E402

SOURCE = random.Random(16).randbytes(2 << 20)
FIELDS = ["t", "rss_mib", "fds", "tasks", "in_flight", "ok", "explicit_5xx", "aborted", "corrupt",
          "aborts_sent", "backends_up"]  # fmt: skip


def listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


class Backend:
    """An echo backend on a port of its own that survives SIGKILL and restart."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = listening_socket()
        self.port = self.sock.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.sock.fileno() == -1:
            self.sock = listening_socket(self.port)
        fd = self.sock.fileno()
        cmd = [sys.executable, "-m", "lbapp.echo", "--fd", str(fd), "--name", self.name]
        self.proc = subprocess.Popen(cmd, pass_fds=[fd], cwd=ROOT, stdout=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.sock.close()  # connects are refused while it is down

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = {"ok": 0, "explicit_5xx": 0, "aborted": 0, "corrupt": 0, "aborts_sent": 0}

    def add(self, key: str) -> None:
        with self.lock:
            self.values[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.values)


def client(url: str, seed: int, stop: threading.Event, counts: Counts) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            size = rng.choice([0, rng.randint(1, 65536), rng.randint(65536, 1 << 20)])
            try:
                if rng.random() < 0.5:
                    key = uuid.uuid4().hex
                    response = http.get(f"/random/{size}/{key}")
                    good = response.content == random_bytes(size, key)
                else:
                    start = rng.randint(0, len(SOURCE) - size)
                    body = SOURCE[start : start + size]
                    response = http.request(rng.choice(["POST", "PUT"]), "/mirror", content=body)
                    sha = hashlib.sha256(body).hexdigest()
                    good = response.content == body and response.headers.get("x-body-sha256") == sha
            except httpx.TransportError:
                counts.add("aborted")
                continue
            if response.status_code in (502, 503, 504):
                counts.add("explicit_5xx")
            elif response.status_code == 200 and good:
                counts.add("ok")
            else:
                counts.add("corrupt")
                print(f"soak: CORRUPT answer {response.status_code} {response.request.url}", file=sys.stderr)


def aborter(port: int, stop: threading.Event, counts: Counts) -> None:
    """Clients that go away mid-upload or mid-download, a few per second."""
    n = 0
    while not stop.wait(0.2):
        n += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                if n % 2:
                    sock.sendall(b"GET /bytes/1073741824 HTTP/1.1\r\nHost: soak\r\n\r\n")
                    sock.recv(65536)
                else:
                    sock.sendall(b"POST /mirror HTTP/1.1\r\nHost: soak\r\nContent-Length: 1048576\r\n\r\n")
                    sock.sendall(b"a" * (16384 if n % 4 else 200_000))
                if n % 3 == 0:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            counts.add("aborts_sent")
        except OSError:
            pass


def faults(backends: list[Backend], every: float, down_for: float, stop: threading.Event) -> None:
    n = 0
    while not stop.wait(every):
        victim = backends[n % len(backends)]
        n += 1
        victim.kill()
        print(f"soak: killed {victim.name}", file=sys.stderr)
        if stop.wait(down_for):
            return
        victim.start()
        print(f"soak: restarted {victim.name}", file=sys.stderr)


def proc_value(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def lb_sample(url: str) -> tuple[int, int]:
    with urllib.request.urlopen(url + "/lb-status?format=json", timeout=5) as response:
        tasks = int(json.load(response)["process"]["asyncio_tasks"])
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    line = next(line for line in text.splitlines() if line.startswith("lb_requests_in_flight"))
    return tasks, int(float(line.split()[-1]))


def plot(rows: list[dict[str, Any]], path: Path, warmup: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "soak: matplotlib not installed (pip install -r bench/requirements.txt): no plot", file=sys.stderr
        )
        return False
    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    panels = [
        (["rss_mib"], "RSS (MiB)"),
        (["fds", "tasks", "in_flight"], "open fds / asyncio tasks / in flight"),
        (["ok"], "answers ok (cumulative)"),
        (["explicit_5xx", "aborted", "corrupt"], "502/503/504, aborted, corrupt (cumulative)"),
    ]
    for ax, (keys, title) in zip(axes, panels, strict=True):
        for key in keys:
            ax.plot(t, [r[key] for r in rows], label=key)
        ax.axvline(warmup, color="grey", linestyle=":", label="end of warm-up")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return True


def growth(rows: list[dict[str, Any]], key: str, warmup: float) -> tuple[float, float, float]:
    """Median of the first and of the last fifth of the samples after warm-up, and the growth."""
    after = [r[key] for r in rows if r["t"] >= warmup]
    fifth = max(1, len(after) // 5)
    first, last = statistics.median(after[:fifth]), statistics.median(after[-fifth:])
    return first, last, (last - first) / first if first else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description="lbapp soak test (see the module docstring)")
    parser.add_argument("--duration", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    parser.add_argument(
        "--warmup", type=float, default=None, help="default: a sixth of the duration, max 60 s"
    )
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--fault-every", type=float, default=20.0)
    parser.add_argument("--down-for", type=float, default=8.0)
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--out", default=str(BENCH_DIR / "results"))
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 6)
    if args.duration <= warmup + 5 * args.interval:
        parser.error("--duration must leave at least 5 samples after the warm-up")

    backends = [Backend(f"backend-{i}") for i in (1, 2, 3)]
    for backend in backends:
        backend.start()
    lb_sock = listening_socket()
    url = f"http://127.0.0.1:{lb_sock.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
    env.update(LB_BACKENDS=",".join(f"http://127.0.0.1:{b.port}" for b in backends), LB_HEALTH_INTERVAL="1",
               LB_ACCESS_LOG="false", LB_HEALTH_JITTER="0.2")  # fmt: skip
    cmd = [sys.executable, "-m", "uvicorn", "lbapp:app", "--fd", str(lb_sock.fileno()), "--loop", "uvloop",
           "--http", "httptools", "--no-access-log", "--no-server-header", "--no-date-header",
           "--no-proxy-headers", "--log-level", "warning", "--timeout-graceful-shutdown", "5"]  # fmt: skip
    lb = subprocess.Popen(cmd, pass_fds=[lb_sock.fileno()], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    stop = threading.Event()
    counts = Counts()
    threads: list[threading.Thread] = []
    rows: list[dict[str, Any]] = []
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"soak-{stamp}.csv", out / f"soak-{stamp}.png"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/lb-health", timeout=1).close()
                break
            if lb.poll() is not None or time.monotonic() > deadline:
                print("soak: lbapp did not start", file=sys.stderr)
                return 2
            time.sleep(0.1)
        threads += [threading.Thread(target=client, args=(url, i, stop, counts)) for i in range(args.clients)]
        threads.append(threading.Thread(target=aborter, args=(lb_sock.getsockname()[1], stop, counts)))
        threads.append(
            threading.Thread(target=faults, args=(backends, args.fault_every, args.down_for, stop))
        )
        for thread in threads:
            thread.start()
        started = time.monotonic()
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            while (elapsed := time.monotonic() - started) < args.duration:
                if lb.poll() is not None:
                    print(f"soak: lbapp exited with {lb.returncode}", file=sys.stderr)
                    return 1
                rss, fds = proc_value(lb.pid)
                tasks, in_flight = lb_sample(url)
                row = {"t": round(elapsed, 1), "rss_mib": round(rss, 1), "fds": fds, "tasks": tasks,
                       "in_flight": in_flight, **counts.snapshot(),
                       "backends_up": sum(b.up for b in backends)}  # fmt: skip
                rows.append(row)
                writer.writerow(row)
                handle.flush()
                print("soak: " + " ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr)
                time.sleep(max(0.0, started + len(rows) * args.interval - time.monotonic()))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        lb.send_signal(signal.SIGTERM)
        try:
            lb.wait(timeout=15)
        except subprocess.TimeoutExpired:
            lb.kill()
            lb.wait(timeout=10)
        lb_sock.close()
        for backend in backends:
            backend.kill()

    plotted = plot(rows, png_path, warmup)
    final = rows[-1]
    failed = []
    report = [f"soak: {args.duration:.0f} s, warm-up {warmup:.0f} s, {len(rows)} samples -> {csv_path}"]
    if plotted:
        report.append(f"soak: plot -> {png_path}")
    report.append("soak: answers ok={ok} explicit 502/503/504={explicit_5xx} aborted={aborted} "
                  "corrupt={corrupt}; aborting clients={aborts_sent}".format(**final))  # fmt: skip
    for key in ("rss_mib", "fds"):
        first, last, grew = growth(rows, key, warmup)
        report.append(f"soak: {key} after warm-up {first:g} -> {last:g} ({grew:+.1%})")
        if grew > args.max_growth:
            failed.append(f"{key} grew {grew:.1%} (> {args.max_growth:.0%})")
    first_tasks, last_tasks, _ = growth(rows, "tasks", warmup)
    report.append(f"soak: asyncio tasks after warm-up {first_tasks:g} -> {last_tasks:g}")
    if final["corrupt"]:
        failed.append(f"{final['corrupt']} corrupt answers")
    if final["ok"] == 0:
        failed.append("no request succeeded")
    print("\n".join(report))
    print("soak: FAIL: " + "; ".join(failed) if failed else "soak: PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
