#!/usr/bin/env python3
"""Hold N idle keep-alive client connections to an LB (the idle10k scenario of bench/run.py).

Each connection sends one `GET PATH` (HTTP/1.1, keep-alive), reads the whole answer, and then
stays open and silent. At most --concurrency connections are being set up at once, so the LB's
upstream pool does not balloon while they open. Once all are set up the script prints one line,
`READY ok=N failed=M`, and holds them until its stdin closes, SIGTERM/SIGINT arrives, or --hold
seconds pass, whichever comes first. It then prints `DONE held=N closed_by_peer=M` (connections
the LB closed while they were held), closes everything and exits. Stdlib only; every step is
bounded in time. RLIMIT_NOFILE must allow N descriptors (run.py raises it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time


async def open_one(
    host: str,
    port: int,
    path: str,
    timeout: float,  # noqa: ASYNC109 - one bound for each of several awaits
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
            elif name.strip().lower() == b"connection" and b"close" in value.lower():
                raise ValueError("the LB asked to close")
        if length:
            await asyncio.wait_for(reader.readexactly(length), timeout)
        if not 200 <= status < 300:
            raise ValueError(f"status {status}")
    except (TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        writer.close()
        return None
    return reader, writer


async def main_async(args: argparse.Namespace) -> int:
    sem = asyncio.Semaphore(args.concurrency)
    deadline = time.monotonic() + args.setup_timeout

    async def guarded() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async with sem:
            if time.monotonic() > deadline:
                return None
            return await open_one(args.host, args.port, args.path, args.timeout)

    results = await asyncio.gather(*(guarded() for _ in range(args.conns)))
    conns = [c for c in results if c is not None]
    print(f"READY ok={len(conns)} failed={args.conns - len(conns)}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_stdin() -> None:
        if not sys.stdin.buffer.read1(4096):  # EOF: the harness is done with us
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    with contextlib.suppress(OSError, ValueError):
        loop.add_reader(sys.stdin.fileno(), on_stdin)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), args.hold)

    closed = sum(1 for reader, _ in conns if reader.at_eof())
    print(f"DONE held={len(conns) - closed} closed_by_peer={closed}", flush=True)
    for _, writer in conns:
        writer.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--conns", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=100, help="connections being set up at once")
    p.add_argument("--timeout", type=float, default=10.0, help="per connection: connect, request, answer")
    p.add_argument("--setup-timeout", type=float, default=120.0, help="for setting all of them up")
    p.add_argument("--hold", type=float, default=120.0, help="the most seconds to hold them")
    args = p.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
