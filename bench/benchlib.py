"""Shared pieces of bench/run.py and bench/profile.py (stdlib only).

Process control (every process in its own session, stopped by its process-group id), the /proc
accounting (CPU jiffies per process group and for everything else, steal, RSS), wrk's
output parser and small helpers. Adapted from the shared reference harness's lib/benchlib.py.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PF_KTHREAD = 0x00200000


# --------------------------------------------------------------------------- small helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Fatal(Exception):
    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        val = int(raw)
    except ValueError:
        raise Fatal(f"{name}={raw!r} is not an integer", 2) from None
    if val < minimum:
        raise Fatal(f"{name}={raw!r} must be >= {minimum}", 2)
    return val


def env_str(name: str, default: str) -> str:
    val = os.environ.get(name, "").strip()
    return val if val else default


def fill_template(path: Path, values: dict[str, str]) -> str:
    """Replace ${NAME} placeholders (only those; nginx's own $vars stay)."""
    text = path.read_text()

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise Fatal(f"{path.name}: no value for ${{{m.group(1)}}}")
        return values[m.group(1)]

    return re.sub(r"\$\{([A-Z0-9_]+)\}", sub, text)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


# --------------------------------------------------------------------------- process control
class Group:
    """A process started in its own session: pid == pgid."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], logfile: Path | None) -> None:
        self.name, self.proc, self.logfile = name, proc, logfile

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def leader_alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 25) -> str:
        if not self.logfile or not self.logfile.exists():
            return ""
        lines = self.logfile.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


STARTED: list[Group] = []


def start_group(
    name: str,
    cpus: str,
    argv: list[str],
    logfile: Path,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> Group:
    with open(logfile, "wb") as out:
        # start_new_session=True: the child calls setsid() before exec, so its pid is
        # also its process-group id; taskset then execs the command in place.
        proc = subprocess.Popen(
            ["taskset", "-c", cpus, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd),
            start_new_session=True,
        )
    g = Group(name, proc, logfile)
    STARTED.append(g)
    log(f"started {name}: pid/pgid {g.pgid}, cpus {cpus}")
    return g


def stop_group(g: Group, grace: float = 5.0) -> None:
    if g.group_alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(g.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            g.proc.poll()  # reap the leader so the group can disappear
            if not g.group_alive():
                break
            time.sleep(0.05)
        if g.group_alive():
            log(f"{g.name} (pgid {g.pgid}) ignored SIGTERM for {grace:.0f}s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g.pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        g.proc.wait(timeout=5)
    if g in STARTED:
        STARTED.remove(g)


def cleanup() -> None:
    # A second Ctrl-C must not interrupt the clean-up.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    for g in reversed(STARTED[:]):
        stop_group(g)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------- /proc accounting
def core_jiffies() -> dict[str, list[int]]:
    """Per core: [busy, total, steal] jiffies (busy includes steal)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            parts = line.split()
            v = [int(x) for x in parts[1:]] + [0] * 8
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            total = user + nice + system + idle + iowait + irq + softirq + steal
            out[parts[0]] = [total - idle - iowait, total, steal]
    return out


def proc_stats() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, comm, the fields after comm) of every process in /proc/<pid>/stat; a process that
    exits while being read is skipped."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        yield int(name), data[data.find("(") + 1 : data.rfind(")")], data[data.rfind(")") + 2 :].split()


def proc_jiffies(pgids: set[int]) -> tuple[dict[int, int], int, dict[int, tuple[str, int, int]]]:
    """CPU jiffies (utime+stime+cutime+cstime) per process group in `pgids`, summed over
    every other user-space process ("other"), and per other process (to name the noisy
    ones). The children's fields keep the sums consistent when a process exits and is
    reaped between two snapshots."""
    acc = {p: 0 for p in pgids}
    other = 0
    per_pid: dict[int, tuple[str, int, int]] = {}  # pid -> (comm, jiffies, ppid)
    for pid, comm, rest in proc_stats():
        pgrp, flags = int(rest[2]), int(rest[6])
        jiffies = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
        if pgrp in acc:
            acc[pgrp] += jiffies
        elif not flags & PF_KTHREAD:
            other += jiffies
            per_pid[pid] = (comm, jiffies, int(rest[1]))
    return acc, other, per_pid


def snap(pgids: set[int]) -> dict[str, Any]:
    groups, other, per_pid = proc_jiffies(pgids)
    return {
        "t": time.monotonic(),
        "cores": core_jiffies(),
        "groups": groups,
        "other": other,
        "per_pid": per_pid,
    }


def other_pct(b: dict[str, Any], e: dict[str, Any], wall: float) -> float:
    """CPU% (100 = one core) of every process outside the benchmark between two snapshots."""
    return 100.0 * (e["other"] - b["other"]) / CLK_TCK / wall


def steal_pct(b: dict[str, Any], e: dict[str, Any]) -> float:
    """vCPU time taken by the hypervisor between two snapshots, in % summed over the cores."""
    return sum(
        100.0 * (v[2] - b["cores"][c][2]) / max(1, v[1] - b["cores"][c][1])
        for c, v in e["cores"].items()
        if c in b["cores"]
    )


def group_pct(b: dict[str, Any], e: dict[str, Any], pgids: set[int]) -> float | None:
    """CPU% (100 = one core) used by the process groups `pgids` between two snapshots."""
    if not pgids:
        return None
    j = sum(e["groups"].get(p, 0) - b["groups"].get(p, 0) for p in pgids)
    return float(100.0 * j / CLK_TCK / max(1e-6, e["t"] - b["t"]))


def top_others(b: dict[str, Any], e: dict[str, Any], wall: float, n: int = 3) -> str:
    """The processes outside the benchmark that used the most CPU between two snapshots.
    A process's figure includes its children that ran and were reaped in between (a
    parent's cutime grows by a reaped child's whole lifetime, so the time the child had
    already used at the first snapshot is taken off again)."""
    before, after = b["per_pid"], e["per_pid"]
    use: dict[int, int] = {}
    for pid, (_comm, j, _ppid) in after.items():
        use[pid] = j - (before[pid][1] if pid in before else 0)
    for pid, (_comm, j, ppid) in before.items():
        if pid in after:
            continue
        # gone: its time (and that of its reaped children) now sits in the cutime of the
        # nearest ancestor that is still there
        seen = {pid}
        while ppid not in after and ppid in before and ppid not in seen:
            seen.add(ppid)
            ppid = before[ppid][2]
        if ppid in use:
            use[ppid] -= j
    rows = []
    for pid, j in use.items():
        pct = 100.0 * j / CLK_TCK / wall
        if pct >= 1:
            rows.append((pct, f"{after[pid][0]}[{pid}] {pct:.0f}%"))
    return ", ".join(x for _, x in sorted(rows, reverse=True)[:n])


# --------------------------------------------------------------------------- wrk output
_LAT_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_wrk(text: str) -> dict[str, Any]:
    r: dict[str, Any] = {"ok": False}
    m = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    if m:
        r["rps"], r["ok"] = float(m.group(1)), True
    m = re.search(r"Transfer/sec:\s+([0-9.]+)([KMGT]?B)", text)
    if m:
        r["mib_s"] = float(m.group(1)) * _SIZE_UNITS[m.group(2)] / 1024**2
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([0-9.]+)(us|ms|s|m|h)\b", text, re.M)
        if m:
            r[f"p{pct}_ms"] = float(m.group(1)) * _LAT_UNITS[m.group(2)]
    m = re.search(r"(\d+) requests in ([0-9.]+)(\w+), ", text)
    if m:
        r["requests"] = int(m.group(1))
    r["sock_err"] = {k: 0 for k in ("connect", "read", "write", "timeout")}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["sock_err"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    r["non2xx"] = int(m.group(1)) if m else 0
    return r


# --------------------------------------------------------------------------- memory, bytes, limits
def group_pids(pgid: int) -> list[int]:
    """Every process whose process group is `pgid` (the LB and its workers)."""
    return [pid for pid, _, rest in proc_stats() if int(rest[2]) == pgid]


def group_rss(pgid: int) -> int:
    """Resident memory in bytes, summed over the process group (VmRSS of each process)."""
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * PAGE
    return total


def raise_nofile(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it) towards `want`; root may raise
    the hard limit too. Returns the soft limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    if hard != resource.RLIM_INFINITY and hard < want and os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()
