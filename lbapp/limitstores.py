"""Where rate-limit buckets live without Redis: one process, or the workers of one instance.

- `LocalStore`: one process; a dict bounded at `max_keys` buckets (full ones swept first, then
  those closest to full). Exact while fewer than `max_keys` clients hold a non-full bucket.
- `SharedStore`: several uvicorn workers of one instance; a fixed-size table in an `mmap`'d
  file (in `PROMETHEUS_MULTIPROC_DIR`, else in the temp dir under the supervisor's pid): sets
  of 16 slots chosen by key hash, each set guarded by an `fcntl` byte-range lock. Exact (the
  lock makes each read-decide-write atomic across workers) unless more than 16 clients with
  non-full buckets hash to one set; then the one closest to full is evicted and gets back at
  most the tokens it was owed (never more than `burst`).

A bucket is one float, the time it is full again (see ratelimit.py); `create_store` picks the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import math
import mmap
import multiprocessing
import os
import stat
import tempfile
import time
from heapq import nsmallest
from typing import Any

from .ratelimit import Clock, Decision, Limit, Store


class LocalStore:
    """Buckets of one process in a dict of at most `max_keys` (the event loop serialises access)."""

    def __init__(self, max_keys: int = 100_000, clock: Clock = time.monotonic) -> None:
        self.max_keys = max_keys
        self.clock = clock
        self.buckets: dict[str, float] = {}
        self.evicted = 0  # non-full buckets dropped to stay within max_keys

    def take_now(self, key: str, limit: Limit) -> Decision:
        buckets = self.buckets
        now = self.clock()
        full_at, decision = limit.decide(buckets.get(key, 0.0), now)
        if full_at is not None:
            if key not in buckets and len(buckets) >= self.max_keys:
                self._shrink(now)
            buckets[key] = full_at
        return decision

    async def take(self, key: str, limit: Limit) -> Decision:
        return self.take_now(key, limit)

    def _shrink(self, now: float) -> None:
        """Drop every full bucket; if that frees under a tenth, drop those closest to full too.

        A full bucket is the same as none, so dropping it changes nothing. Each call frees at
        least a tenth of the table, so its O(n) cost is spread over that many new keys.
        """
        buckets = self.buckets
        for key in [k for k, full_at in buckets.items() if full_at <= now]:
            del buckets[key]
        target = self.max_keys - max(1, self.max_keys // 10)
        excess = len(buckets) - target
        if excess > 0:
            for key, _ in nsmallest(excess, buckets.items(), key=lambda item: item[1]):
                del buckets[key]
            self.evicted += excess

    async def aclose(self) -> None:
        self.buckets.clear()


class SharedStore:
    """Buckets shared by the workers of one instance: a fixed table in an `mmap`'d file.

    Layout: a 64-byte header, then `sets` x `WAYS` slots of (u64 key hash, f64 full_at); hash 0
    is an empty slot. A set is read, decided and written under an `fcntl` lock on its own bytes,
    so workers serialise per set only. The file is sparse: only touched pages take memory.
    `time.monotonic` is one clock for every process of the machine; a value further ahead than
    the limit allows (another boot, another configuration) reads as a full bucket.
    """

    WAYS = 16
    SLOT = 16
    HEADER = 64
    MAGIC = b"lbapp-ratelimit-1"

    def __init__(self, path: str, max_keys: int = 100_000, clock: Clock = time.monotonic) -> None:
        self.sets = 1 << max(0, math.ceil(math.log2(max(1, max_keys) / self.WAYS)))
        self.path = path
        self.clock = clock
        self.evicted = 0
        size = self.HEADER + self.sets * self.WAYS * self.SLOT
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, self.HEADER)  # one initialiser (the header's bytes)
            try:
                header = os.pread(self.fd, len(self.MAGIC) + 8, 0)
                geometry = self.MAGIC + self.sets.to_bytes(8, "little")
                if os.fstat(self.fd).st_size != size or header != geometry:
                    os.ftruncate(self.fd, 0)
                    os.ftruncate(self.fd, size)
                    os.pwrite(self.fd, geometry, 0)
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, self.HEADER)
            self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        table = memoryview(self.map)[self.HEADER :]
        self.hashes = table.cast("Q")  # slot i: hashes[2i] (and the float's bits at 2i + 1)
        self.times = table.cast("d")  # slot i: times[2i + 1]

    @staticmethod
    def key_hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1

    def take_now(self, key: str, limit: Limit) -> Decision:
        code = self.key_hash(key)
        ways = self.WAYS
        first = (code % self.sets) * ways * 2  # index of the set's first u64
        offset = self.HEADER + first * 8
        fcntl.lockf(self.fd, fcntl.LOCK_EX, ways * self.SLOT, offset)
        try:
            return self._take_locked(code, first, limit)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, ways * self.SLOT, offset)

    def _take_locked(self, code: int, first: int, limit: Limit) -> Decision:
        now = self.clock()
        row = self.hashes[first : first + 2 * self.WAYS].tolist()[0::2]
        times = self.times
        try:
            slot = first + 2 * row.index(code)
            stored = times[slot + 1]
        except ValueError:
            slot, stored = -1, 0.0
        full_at, decision = limit.decide(stored, now)
        if full_at is None:
            return decision
        if slot < 0:
            slot = self._free_slot(first, now)
            self.hashes[slot] = code
        times[slot + 1] = full_at
        return decision

    def _free_slot(self, first: int, now: float) -> int:
        """An empty or full slot of the set; else the one closest to full (evicted)."""
        times = self.times
        best, best_at = first, math.inf
        for slot in range(first, first + 2 * self.WAYS, 2):
            at = times[slot + 1]
            if self.hashes[slot] == 0 or at <= now:
                return slot
            if at < best_at:
                best, best_at = slot, at
        self.evicted += 1
        return best

    async def take(self, key: str, limit: Limit) -> Decision:
        return self.take_now(key, limit)

    async def aclose(self) -> None:
        self.hashes.release()
        self.times.release()
        self.map.close()
        os.close(self.fd)


def create_store(settings: Any, multiproc_dir: str | None) -> Store:
    """Redis when configured; else, in a worker of `uvicorn --workers N`, the shared table
    (in `PROMETHEUS_MULTIPROC_DIR`, or the temp dir under the supervisor's pid); else a dict."""
    if settings.rate_limit_redis_url:
        from .redisstore import RedisStore

        return RedisStore(
            settings.rate_limit_redis_url,
            timeout=settings.rate_limit_redis_timeout,
            fail_open=settings.rate_limit_fail_open,
        )
    if multiproc_dir:
        os.makedirs(multiproc_dir, exist_ok=True)
        return SharedStore(os.path.join(multiproc_dir, TABLE_NAME), settings.rate_limit_max_keys)
    if multiprocessing.parent_process() is not None:  # a worker spawned by uvicorn's supervisor
        directory = private_temp_dir()
        remove_stale_tables(directory)
        path = os.path.join(directory, f"lbapp-ratelimit-{os.getppid()}.table")
        return SharedStore(path, settings.rate_limit_max_keys)
    return LocalStore(settings.rate_limit_max_keys)


def private_temp_dir() -> str:
    """`$TMPDIR/lbapp-<uid>`, ours alone (mode 0700): nobody else can plant or read a table."""
    path = os.path.join(tempfile.gettempdir(), f"lbapp-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory of this user's alone (mode 0700)")
    return path


TABLE_NAME = "lbapp-ratelimit.table"


def remove_stale_tables(directory: str) -> None:
    """Tables in the temp dir whose supervisor is gone (one per earlier run)."""
    for path in glob.glob(os.path.join(directory, "lbapp-ratelimit-*.table")):
        pid = os.path.basename(path)[len("lbapp-ratelimit-") : -len(".table")]
        if pid.isdigit() and int(pid) != os.getppid() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                os.remove(path)
