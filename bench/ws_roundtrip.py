"""WebSocket message round trips per second: direct to an echo backend, and through lbapp.

    .venv/bin/python bench/ws_roundtrip.py [--messages 5000] [--size 32] [--rounds 3]

One connection, one small message in flight at a time (send, wait for the echo), so the figure
is the latency lbapp adds per message rather than a throughput ceiling. The three measurements
take turns for `--rounds` rounds and the best of each is reported (on a shared machine the other
processes' load only ever makes a round slower). Clients run on uvloop, like lbapp. Measured:

- `websockets` client -> echo backend (direct);
- a raw client (hand-written RFC 6455 framing on asyncio streams, no library) -> echo backend:
  what a client library costs per message, the basis of choosing `websockets` upstream;
- `websockets` client -> lbapp -> echo backend.

Bounded: each measurement is `--messages` round trips (all of them within 180 s); every process
this starts is stopped by its PID at the end. Starts its own echo backend and lbapp on free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import httpx
import uvloop
from websockets.asyncio.client import connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


async def with_websockets(url: str, messages: int, payload: str) -> float:
    async with connect(url, compression=None) as ws:
        for _ in range(100):  # warm-up
            await ws.send(payload)
            await ws.recv()
        started = time.perf_counter()
        for _ in range(messages):
            await ws.send(payload)
            await ws.recv()
        return messages / (time.perf_counter() - started)


async def with_raw_frames(host: str, port: int, messages: int, payload: str) -> float:
    """RFC 6455 by hand: the handshake, masked text frames out, unmasked frames back."""
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    data = payload.encode()
    assert len(data) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    frame = struct.pack("!BB", 0x81, 0x80 | len(data)) + mask + masked

    async def round_trip() -> None:
        writer.write(frame)
        first, second = await reader.readexactly(2)
        assert first == 0x81 and second == len(data)
        await reader.readexactly(second)

    for _ in range(100):
        await round_trip()
    started = time.perf_counter()
    for _ in range(messages):
        await round_trip()
    rate = messages / (time.perf_counter() - started)
    writer.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=32, help="message size in bytes (< 126)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    payload = "m" * min(args.size, 125)
    backend_port, lb_port = free_port(), free_port()
    backend_cmd = [sys.executable, "-m", "lbapp.echo", "--port", str(backend_port), "--name", "bench"]
    lb_cmd = [sys.executable, "-m", "uvicorn", "lbapp:app", "--port", str(lb_port), "--loop", "uvloop"]
    lb_cmd += ["--http", "httptools", "--ws", "lbapp.wsserver:GracefulWebSocketProtocol", "--no-access-log"]
    lb_cmd += ["--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
    env.update(LB_BACKENDS=f"http://127.0.0.1:{backend_port}", LB_HEALTH_INTERVAL="60")
    procs = [
        subprocess.Popen(backend_cmd, cwd=ROOT, stdout=subprocess.DEVNULL),
        subprocess.Popen(lb_cmd, cwd=ROOT, env=env),
    ]
    try:
        deadline = time.monotonic() + 20
        wait_up(f"http://127.0.0.1:{backend_port}/health", deadline)
        wait_up(f"http://127.0.0.1:{lb_port}/lb-health", deadline)

        async def measure() -> dict[str, float]:
            runs = {
                "websockets -> backend": lambda: with_websockets(
                    f"ws://127.0.0.1:{backend_port}/ws", args.messages, payload
                ),
                "raw frames -> backend": lambda: with_raw_frames(
                    "127.0.0.1", backend_port, args.messages, payload
                ),
                "websockets -> lbapp -> backend": lambda: with_websockets(
                    f"ws://127.0.0.1:{lb_port}/ws", args.messages, payload
                ),
            }
            best = dict.fromkeys(runs, 0.0)
            async with asyncio.timeout(180):
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        best[name] = max(best[name], await run())
            return best

        rates = uvloop.run(measure())
        for name, rate in rates.items():
            print(f"{name:32} {rate:9.0f} round trips/s")
        direct = rates["websockets -> backend"]
        through = rates["websockets -> lbapp -> backend"]
        print(f"through lbapp: {through / direct:.0%} of direct ({len(payload)}-byte text messages)")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


if __name__ == "__main__":
    main()
