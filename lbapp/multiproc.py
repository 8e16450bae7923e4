"""Several workers (`uvicorn --workers N`): each writes its families to prometheus-client's
multiprocess value files, and the worker serving a scrape reads every worker's back.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import (
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.values import MultiProcessValue

from .metrics import Family

logger = logging.getLogger("lbapp.metrics")


class MultiprocessStore:
    """This worker's families, written to prometheus-client's multiprocess value files.

    Values are *set* to the worker's absolute numbers (not incremented), so a flush is idempotent
    and a worker's files always hold its latest flushed state. `MultiProcessCollector` sums the
    counters and histogram buckets of every worker (dead ones included: what they counted stays
    counted) and combines gauges by their mode (`livesum`, `livemax`: only live workers).
    """

    REGISTRY_FILE = "lbapp-workers.json"  # not *.db: MultiProcessCollector reads only those
    STATUS_FILE = "lbapp-status-wanted"

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.value_class = MultiProcessValue(lambda: self.pid)  # type: ignore[no-untyped-call]
        self.values: dict[tuple[str, tuple[str, ...]], Any] = {}
        self.collector = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]
        self.others_running = False  # other live workers when this one registered (`prepare`)

    def prepare(self) -> None:
        """Wipe the directory if no other live lbapp worker uses it (first start), then register;
        `others_running` says which it was."""
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, ".lbapp.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            registry = os.path.join(self.path, self.REGISTRY_FILE)
            try:
                with open(registry) as f:
                    pids = [int(p) for p in json.load(f)]
            except (OSError, ValueError, TypeError):
                pids = []
            alive = [p for p in pids if p != self.pid and _alive(p)]
            self.others_running = bool(alive)
            if not alive:
                removed = 0
                for name in glob.glob(os.path.join(self.path, "*.db")):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(name)
                        removed += 1
                logger.debug("metrics directory %s wiped (%d files)", self.path, removed)
            with open(registry + ".tmp", "w") as f:
                json.dump([*alive, self.pid], f)
            os.replace(registry + ".tmp", registry)

    def write(self, items: Iterable[Family]) -> None:
        for f in items:
            if f.type == "counter":
                for values, value in f.samples.items():
                    self._set(f, f.name + "_total", f.labels, values, value)
            elif f.type == "gauge":
                for values, value in f.samples.items():
                    self._set(f, f.name, f.labels, values, value)
            else:
                bucket_labels = (*f.labels, "le")
                for values, (counts, total) in f.samples.items():
                    for bound, count in zip(f.buckets, counts, strict=True):
                        self._set(f, f.name + "_bucket", bucket_labels, (*values, bound), count)
                    self._set(f, f.name + "_sum", f.labels, values, total)

    def _set(
        self, f: Family, name: str, labels: tuple[str, ...], values: tuple[str, ...], value: float
    ) -> None:
        key = (name, values)
        slot = self.values.get(key)
        if slot is None:
            slot = self.values[key] = self.value_class(
                f.type, f.name, name, labels, values, f.doc, multiprocess_mode=f.mode
            )
        if slot.get() != value:
            slot.set(value)

    def want_status(self) -> None:
        """Someone watches the status page: every worker keeps history from now on (see `tick`)."""
        with open(os.path.join(self.path, self.STATUS_FILE), "a"):
            pass
        os.utime(os.path.join(self.path, self.STATUS_FILE))

    def status_wanted_at(self) -> float:
        try:
            return os.stat(os.path.join(self.path, self.STATUS_FILE)).st_mtime
        except FileNotFoundError:
            return 0.0

    def read(self) -> Iterable[Metric]:
        metrics: Iterable[Metric] = self.collector.collect()  # type: ignore[no-untyped-call]
        return metrics

    def close(self) -> None:
        """The worker is leaving: its live gauges (in-flight, up, state) stop counting."""
        mark_process_dead(self.pid, self.path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
