#!/usr/bin/env python3
"""lbapp throughput/latency benchmark (stdlib only; see bench/README.md).

Starts three backends on 127.0.0.1 (nginx, or lbapp's echo backend), then for each
target -- `direct` (wrk straight at one backend), `lbapp` (uvicorn, 1 worker),
`lbapp-w2` (2 workers) and optional references (COMPARE=nginx) -- runs a short
warm-up and `wrk -t1 -c64 -d$DURATION --latency` per body, and prints a Markdown
table (also written to bench/results/latest.md).

Every process it starts gets its own session/process group (setsid) and is
stopped by that id on any exit. Knobs are environment variables (README.md).
Exit status: 0 ok, 1 a target failed to start/validate/measure, 2 missing prerequisites.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BIG_SIZE = 1048576
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


def proc_jiffies(pgids: set[int]) -> tuple[dict[int, int], int, dict[int, tuple[str, int, int]]]:
    """CPU jiffies (utime+stime+cutime+cstime) per process group in `pgids`, summed over
    every other user-space process ("other"), and per other process (to name the noisy
    ones). The children's fields keep the sums consistent when a process exits and is
    reaped between two snapshots."""
    acc = {p: 0 for p in pgids}
    other = 0
    per_pid: dict[int, tuple[str, int, int]] = {}  # pid -> (comm, jiffies, ppid)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(")") + 2 :].split()
        pgrp, flags = int(rest[2]), int(rest[6])
        jiffies = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
        if pgrp in acc:
            acc[pgrp] += jiffies
        elif not flags & PF_KTHREAD:
            other += jiffies
            per_pid[int(name)] = (data[data.find("(") + 1 : data.rfind(")")], jiffies, int(rest[1]))
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


# --------------------------------------------------------------------------- configuration
class Cfg:
    def __init__(self) -> None:
        self.duration = env_int("DURATION", 5, 1)
        self.warmup = env_int("WARMUP", 1, 0)
        self.rounds = env_int("ROUNDS", 1, 1)
        self.conns = env_int("CONNS", 64, 1)
        self.threads = env_int("THREADS", 1, 1)
        self.wrk_timeout = env_str("WRK_TIMEOUT", "5s")
        self.retries = env_int("RETRIES", 1, 0)
        self.other_max = env_int("OTHER_MAX_PCT", 10, 0)
        self.steal_max = env_int("STEAL_MAX_PCT", 10, 0)
        self.ready_timeout = env_int("LB_READY_TIMEOUT", 30, 1)
        self.lb_app = env_str("LB_APP", "lbapp:app")
        self.lb_app_dir = os.environ.get("LB_APP_DIR", "").strip()
        self.lb_extra = os.environ.get("LB_EXTRA_ARGS", "").split()
        self.health_interval = env_str("LB_HEALTH_INTERVAL", "5")
        self.install = os.environ.get("BENCH_INSTALL", "1").strip() != "0"
        self.backend_explicit = bool(os.environ.get("BACKEND", "").strip())
        self.backend = env_str("BACKEND", "nginx")
        if self.backend not in ("nginx", "echo"):
            raise Fatal(f"BACKEND={self.backend!r}: use 'nginx' or 'echo'", 2)
        self.backend_workers = env_int("BACKEND_WORKERS", 1, 1)
        self.compare = [c for c in re.split(r"[\s,]+", os.environ.get("COMPARE", "")) if c]
        for c in self.compare:
            if c != "nginx":
                raise Fatal(f"COMPARE={c!r}: only 'nginx' is supported", 2)
        self.bodies = [b for b in re.split(r"[\s,]+", env_str("BODIES", "small big")) if b]
        for b in self.bodies:
            if b not in ("small", "big"):
                raise Fatal(f"BODIES: unknown body {b!r} (small, big)", 2)

        # Python of the project's venv: PYTHON, else $VENV/bin/python, else .venv/bin/python.
        # A relative path is taken from the current directory, else from the project root.
        py = os.environ.get("PYTHON", "").strip() or str(Path(env_str("VENV", ".venv")) / "bin" / "python")
        if "/" not in py:
            self.python = shutil.which(py) or py
        else:
            p = Path(py)
            if not p.is_absolute():
                p = (Path.cwd() / p) if (Path.cwd() / p).exists() else (ROOT / p)
            self.python = str(p)
        self.uvicorn_version = "?"

        # CPU layout (same as the shared harness): LB alone on one core, wrk and
        # backends together on another; a 2-worker LB gets both.
        allowed = sorted(os.sched_getaffinity(0))
        a0, a1 = str(allowed[0]), str(allowed[1] if len(allowed) > 1 else allowed[0])
        self.single_cpu = len(allowed) < 2
        self.lb_cpus = env_str("LB_CPUS", a0)
        self.lb2_cpus = env_str("LB2_CPUS", f"{a0},{a1}" if a0 != a1 else a0)
        self.wrk_cpus = env_str("WRK_CPUS", a1)
        self.backend_cpus = env_str("BACKEND_CPUS", a1)

        default_targets = ["direct", "lbapp", "lbapp-w2", *self.compare]
        self.targets = [t for t in re.split(r"[\s,]+", env_str("TARGETS", " ".join(default_targets))) if t]
        for t in self.targets:
            if t not in ("direct", "lbapp", "lbapp-w2", "nginx"):
                raise Fatal(f"TARGETS: unknown target {t!r} (direct lbapp lbapp-w2 nginx)", 2)

        bp = os.environ.get("BACKEND_PORTS", "").strip()
        self.fixed_backend_ports = [int(x) for x in re.split(r"[\s,]+", bp) if x] if bp else []
        if self.fixed_backend_ports and len(self.fixed_backend_ports) != 3:
            raise Fatal("BACKEND_PORTS needs exactly 3 ports, e.g. 19001,19002,19003", 2)
        self.fixed_lb_port = env_int("LB_PORT", 0, 0)

        self.results_dir = Path(env_str("RESULTS_DIR", str(BENCH_DIR / "results")))
        self.run_dir_env = os.environ.get("RUN_DIR", "").strip()


# --------------------------------------------------------------------------- prerequisites
def _apt_install(pkgs: list[str]) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *pkgs]
    log(f"installing {' '.join(pkgs)}: {' '.join(cmd)}")
    try:
        if subprocess.run(cmd, env=env, stdout=sys.stderr, timeout=600).returncode == 0:
            return True
        log("apt-get install failed; running apt-get update and retrying once")
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=sys.stderr, timeout=600)
        return subprocess.run(cmd, env=env, stdout=sys.stderr, timeout=600).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"apt-get: {exc}")
        return False


def prerequisites(cfg: Cfg) -> None:
    if not Path("/proc/stat").exists():
        raise Fatal("this benchmark needs Linux (/proc)", 2)
    for tool in ("taskset", "timeout"):
        if not shutil.which(tool):
            raise Fatal(f"{tool} not found (util-linux / coreutils)", 2)
    can_install = os.geteuid() == 0 and cfg.install and shutil.which("apt-get") is not None
    wants_nginx = cfg.backend == "nginx" or "nginx" in cfg.targets
    missing = [t for t in ("wrk",) if not shutil.which(t)]
    if wants_nginx and not shutil.which("nginx"):
        missing.append("nginx")
    if missing and can_install:
        _apt_install(missing)
        missing = [t for t in missing if not shutil.which(t)]
    if (
        "nginx" in missing
        and cfg.backend == "nginx"
        and not cfg.backend_explicit
        and "nginx" not in cfg.targets
    ):
        log("nginx not available: using lbapp's echo backend (BACKEND=echo) instead")
        cfg.backend = "echo"
        missing.remove("nginx")
    if missing:
        how = "apt-get install -y " + " ".join(missing)
        why = (
            "BENCH_INSTALL=0"
            if os.geteuid() == 0 and not cfg.install
            else "not root"
            if os.geteuid() != 0
            else "apt-get failed or is unavailable"
        )
        raise Fatal(f"{' and '.join(missing)} not found ({why}); install with: sudo {how}", 2)
    if not Path(cfg.python).exists():
        raise Fatal(
            f"python {cfg.python} not found: create the project venv first (or set PYTHON=/path/to/python)", 2
        )
    r = subprocess.run(
        [cfg.python, "-c", "import uvicorn, uvloop, httptools; print(uvicorn.__version__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
    )
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise Fatal(
            f"{cfg.python} cannot import uvicorn/uvloop/httptools ({last}): "
            "install the project into its venv first",
            2,
        )
    cfg.uvicorn_version = r.stdout.strip()


def check_app_import(cfg: Cfg, env: dict[str, str]) -> str | None:
    """Import LB_APP the way uvicorn will; return an error line or None."""
    mod, _, attr = cfg.lb_app.partition(":")
    code = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {cfg.lb_app_dir or '.'!r})\n"
        f"m = importlib.import_module({mod!r})\n"
        f"obj = m\n"
        f"for a in {attr or 'app'!r}.split('.'): obj = getattr(obj, a)\n"
    )
    try:
        r = subprocess.run(
            [cfg.python, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(ROOT),
            env=env,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return f"importing {cfg.lb_app} took more than 60 s"
    if r.returncode != 0:
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        return f"cannot import {cfg.lb_app}: {lines[-1] if lines else 'exit ' + str(r.returncode)}"
    return None


# --------------------------------------------------------------------------- the benchmark
class Bench:
    def __init__(self, cfg: Cfg) -> None:
        self.cfg = cfg
        self.records: list[dict[str, Any]] = []
        self.failures: dict[tuple[str, str], str] = {}  # (target, round) -> reason
        self.notes: list[str] = []
        self.backends: list[Group] = []
        self.target: Group | None = None
        self.harness_pgid = os.getpgrp()

    # ---- setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.run_dir_env:
            self.run_dir = Path(cfg.run_dir_env)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.run_dir = Path(tempfile.mkdtemp(prefix="lbapp-bench-"))
        # nginx workers run as an unprivileged user when started as root: let them read www/.
        os.chmod(self.run_dir, 0o755)
        for d in ("raw", "targets", "backends", "www"):
            (self.run_dir / d).mkdir(exist_ok=True)
        ports = free_ports(4)
        self.backend_ports = cfg.fixed_backend_ports or ports[:3]
        self.lb_port = cfg.fixed_lb_port or ports[3]
        for p in [*self.backend_ports, self.lb_port]:
            if port_in_use(p):
                raise Fatal(f"port {p} on 127.0.0.1 is already in use", 2)
        self.backends_csv = ",".join(f"http://127.0.0.1:{p}" for p in self.backend_ports)
        self.paths = {"small": "/", "big": "/1m" if cfg.backend == "nginx" else f"/bytes/{BIG_SIZE}"}
        log(
            f"run dir {self.run_dir}; backends ({cfg.backend}) on {self.backend_ports}, "
            f"LB port {self.lb_port}"
        )

    def lb_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LB_BACKENDS"] = self.backends_csv
        env["LB_HEALTH_INTERVAL"] = self.cfg.health_interval
        return env

    def start_backends(self) -> None:
        cfg = self.cfg
        bdir = self.run_dir / "backends"
        if cfg.backend == "nginx":
            with open(self.run_dir / "www" / "1m", "wb") as f:
                f.write(os.urandom(BIG_SIZE))
            os.chmod(self.run_dir / "www", 0o755)
            os.chmod(self.run_dir / "www" / "1m", 0o644)
            conf = fill_template(
                BENCH_DIR / "conf" / "backends.nginx.conf.in",
                {
                    "RUN_DIR": str(self.run_dir),
                    "BACKEND_WORKERS": str(cfg.backend_workers),
                    **{f"BACKEND_PORT_{i + 1}": str(p) for i, p in enumerate(self.backend_ports)},
                },
            )
            (bdir / "nginx.conf").write_text(conf)
            t = subprocess.run(
                [
                    "nginx",
                    "-t",
                    "-q",
                    "-e",
                    str(bdir / "error.log"),
                    "-c",
                    str(bdir / "nginx.conf"),
                    "-p",
                    str(bdir),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if t.returncode != 0:
                raise Fatal(f"backend nginx config rejected: {t.stderr.strip()}")
            self.backends.append(
                start_group(
                    "backends (nginx)",
                    cfg.backend_cpus,
                    ["nginx", "-e", str(bdir / "error.log"), "-c", str(bdir / "nginx.conf"), "-p", str(bdir)],
                    bdir / "stdout.log",
                )
            )
        else:
            if not (ROOT / "lbapp" / "echo.py").exists() and not (ROOT / "lbapp" / "echo").exists():
                raise Fatal("BACKEND=echo needs lbapp/echo.py (python -m lbapp.echo)", 2)
            for i, p in enumerate(self.backend_ports, 1):
                self.backends.append(
                    start_group(
                        f"backend-{i} (echo)",
                        cfg.backend_cpus,
                        [cfg.python, "-m", "lbapp.echo", "--port", str(p), "--name", f"backend-{i}"],
                        bdir / f"echo-{i}.log",
                    )
                )
        deadline = time.monotonic() + 20
        for p in self.backend_ports:
            while True:
                dead = [g for g in self.backends if not g.leader_alive()]
                if dead:
                    raise Fatal(f"{dead[0].name} exited at start-up; log:\n{dead[0].log_tail()}")
                try:
                    if 200 <= http_get(p, "/", 1.0)[0] < 300:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise Fatal(f"backend on port {p} did not answer GET / within 20 s")
                time.sleep(0.1)

    # ---- targets
    def start_target(self, t: str, rnd: int) -> tuple[int, Group | None]:
        """Start target t; return (port, group). Raises RuntimeError with a reason."""
        cfg = self.cfg
        if t == "direct":
            return self.backend_ports[0], None
        tdir = self.run_dir / "targets" / f"r{rnd}-{t}"
        tdir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 10
        while port_in_use(self.lb_port):  # the previous target may still be closing
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.lb_port} is still in use")
            time.sleep(0.1)
        if t == "nginx":
            ups = "".join(f"        server 127.0.0.1:{p};\n" for p in self.backend_ports)
            conf = fill_template(
                BENCH_DIR / "conf" / "nginx-lb.conf.in",
                {"TARGET_DIR": str(tdir), "LB_PORT": str(self.lb_port), "UPSTREAM_SERVERS": ups},
            )
            (tdir / "nginx.conf").write_text(conf)
            g = start_group(
                t,
                cfg.lb_cpus,
                ["nginx", "-e", str(tdir / "error.log"), "-c", str(tdir / "nginx.conf"), "-p", str(tdir)],
                tdir / "stdout.log",
            )
            timeout = 15
        else:
            workers = 2 if t == "lbapp-w2" else 1
            argv = [
                cfg.python,
                "-m",
                "uvicorn",
                cfg.lb_app,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.lb_port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--no-server-header",
                "--no-date-header",
                "--workers",
                str(workers),
            ]
            if cfg.lb_app_dir:
                argv += ["--app-dir", cfg.lb_app_dir]
            argv += cfg.lb_extra
            (tdir / "cmd.txt").write_text(" ".join(argv) + "\n")
            g = start_group(
                t, cfg.lb2_cpus if workers == 2 else cfg.lb_cpus, argv, tdir / "stdout.log", env=self.lb_env()
            )
            timeout = cfg.ready_timeout
        self.target = g
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if not g.leader_alive():
                raise RuntimeError(
                    f"exited with status {g.proc.returncode} at start-up (log {g.logfile}):\n{g.log_tail()}"
                )
            try:
                st = http_get(self.lb_port, "/", 2.0)[0]
                if 200 <= st < 300:
                    break
                last = f"GET / answered {st}"
            except OSError as exc:
                last = f"GET /: {exc.__class__.__name__}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout} s ({last}; log {g.logfile}):\n{g.log_tail()}")
            time.sleep(0.1)
        return self.lb_port, g

    def validate(self, t: str, port: int) -> None:
        """Small body 2xx (nginx backends: exactly 'ok\\n'), big body exactly 1 MiB,
        and a warning if the round robin does not reach the backends."""
        st, _, body = http_get(port, self.paths["small"], 10)
        if not 200 <= st < 300:
            raise RuntimeError(f"GET {self.paths['small']} answered {st}: {body[:200]!r}")
        if self.cfg.backend == "nginx" and body != b"ok\n":
            raise RuntimeError(f"GET / returned {body[:200]!r}, expected the backend's b'ok\\n'")
        if "big" in self.cfg.bodies:
            st, _, body = http_get(port, self.paths["big"], 30)
            if st != 200 or len(body) != BIG_SIZE:
                raise RuntimeError(
                    f"GET {self.paths['big']} answered {st} with {len(body)} bytes, "
                    f"expected 200 with {BIG_SIZE}"
                )
        if t == "direct":
            return
        seen = set()
        for _ in range(6):
            _, hdrs, body = http_get(port, "/", 10)
            ident = hdrs.get("x-backend-port")
            if not ident:
                m = re.search(rb"backend-\d+", body)
                ident = m.group(0).decode() if m else None
            if ident:
                seen.add(ident)
        expect = 2 if t == "lbapp-w2" else 3
        if seen and len(seen) < expect:
            msg = f"{t}: 6 requests reached only backends {sorted(seen)} (round robin expected)"
            log("WARNING: " + msg)
            self.notes.append(msg)
        elif seen:
            log(f"{t}: requests spread over backends {sorted(seen)}")

    def stop_target(self) -> None:
        if self.target is not None:
            stop_group(self.target)
            self.target = None

    # ---- measurement
    def run_wrk(self, port: int, path: str, duration: int, out: Path) -> str:
        cfg = self.cfg
        argv = [
            "taskset",
            "-c",
            cfg.wrk_cpus,
            "timeout",
            "-k",
            "5",
            str(duration + 30),
            "wrk",
            f"-t{cfg.threads}",
            f"-c{cfg.conns}",
            f"-d{duration}s",
            "--latency",
            "--timeout",
            cfg.wrk_timeout,
            f"http://127.0.0.1:{port}{path}",
        ]
        with open(out, "wb") as f:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
            g = Group("wrk", proc, out)
            STARTED.append(g)
            try:
                proc.wait(timeout=duration + 45)
            except subprocess.TimeoutExpired:
                log("wrk did not finish in time; stopping it")
            finally:
                stop_group(g, grace=2)
        return out.read_text(errors="replace")

    def measure(self, t: str, rnd: int, body: str, port: int) -> dict[str, Any]:
        cfg = self.cfg
        path = self.paths[body]
        lb_pgid = self.target.pgid if self.target else 0
        be_pgids = {g.pgid for g in self.backends}
        attempts: list[dict[str, Any]] = []
        for attempt in range(cfg.retries + 1):
            raw = self.run_dir / "raw" / f"r{rnd}-{t}-{body}.a{attempt}.txt"
            if cfg.warmup:
                self.run_wrk(port, path, cfg.warmup, raw.with_suffix(".warmup.txt"))
            pg = {self.harness_pgid, *be_pgids} | ({lb_pgid} if lb_pgid else set())
            b = snap(pg)
            text = self.run_wrk(port, path, cfg.duration, raw)
            e = snap(pg)
            wall = max(1e-6, e["t"] - b["t"])
            rec = parse_wrk(text)
            rec.update(target=t, round=rnd, body=body, path=path, attempt=attempt, wrk_file=str(raw))

            rec["lb_cpu_pct"] = group_pct(b, e, {lb_pgid} if lb_pgid else set())
            rec["be_cpu_pct"] = group_pct(b, e, be_pgids)
            rec["wrk_cpu_pct"] = group_pct(b, e, {self.harness_pgid})  # wrk is reaped by us: our cutime
            rec["other_cpu_pct"] = 100.0 * (e["other"] - b["other"]) / CLK_TCK / wall
            steal, busy = 0.0, {}
            for c, v1 in e["cores"].items():
                v0 = b["cores"].get(c, v1)
                dt = max(1, v1[1] - v0[1])
                steal += 100.0 * (v1[2] - v0[2]) / dt
                busy[c] = round(100.0 * (v1[0] - v0[0]) / dt, 1)
            rec["steal_pct"], rec["core_busy_pct"] = steal, busy
            rec["other_top"] = top_others(b, e, wall)
            n = rec.get("requests") or 0
            if lb_pgid and n:
                lb_j = e["groups"].get(lb_pgid, 0) - b["groups"].get(lb_pgid, 0)
                rec["lb_us_per_req"] = lb_j / CLK_TCK / n * 1e6
            rec["disturbed"] = rec["other_cpu_pct"] > cfg.other_max or steal > cfg.steal_max
            if lb_pgid and self.target and not self.target.leader_alive():
                rec["ok"] = False
                rec["error"] = f"LB exited during the measurement (status {self.target.proc.returncode})"
            elif not rec["ok"]:
                rec["error"] = "wrk produced no result: " + " ".join(text.split())[:200]
            summary = (
                f"{rec.get('rps', 0):,.0f} req/s, {rec.get('mib_s', 0):,.1f} MiB/s, "
                f"p50 {rec.get('p50_ms', 0):.2f} ms, p99 {rec.get('p99_ms', 0):.2f} ms, "
                f"non-2xx {rec['non2xx']}, sock err {sum(rec['sock_err'].values())}, "
                f"other CPU {rec['other_cpu_pct']:.0f}%, steal {steal:.0f}%"
            )
            log(f"  r{rnd} {t} {body}: {summary if rec['ok'] else rec['error']}")
            rec["discarded"] = False
            self.records.append(rec)
            attempts.append(rec)
            if not rec["ok"] or not rec["disturbed"]:
                break
            if rec["other_top"]:
                log(f"  busiest other processes: {rec['other_top']}")
            if attempt < cfg.retries:
                log(
                    f"  disturbed by other processes/steal (limits {cfg.other_max}%/{cfg.steal_max}%): "
                    "measuring again"
                )
        # All attempts disturbed: keep the least disturbed one, flag it, discard the others.
        ok = [r for r in attempts if r["ok"]]
        if len(ok) > 1 and all(r["disturbed"] for r in ok):
            keep = min(ok, key=lambda r: r["other_cpu_pct"] + r["steal_pct"])
            for r in ok:
                r["discarded"] = r is not keep
            return keep
        for r in attempts[:-1]:
            r["discarded"] = True
        return attempts[-1]

    # ---- main loop
    def run(self) -> None:
        cfg = self.cfg
        lb_targets = [t for t in cfg.targets if t.startswith("lbapp")]
        self.import_error = None
        if lb_targets:
            self.import_error = check_app_import(cfg, self.lb_env())
            if self.import_error:
                log(f"ERROR: {self.import_error}: skipping {' '.join(lb_targets)}")
        n_points = len(cfg.targets) * len(cfg.bodies) * cfg.rounds
        est = n_points * (cfg.duration + cfg.warmup + 0.5) + len(cfg.targets) * cfg.rounds * 2 + 3
        log(
            f"targets {' '.join(cfg.targets)}; bodies {' '.join(cfg.bodies)}; {cfg.rounds} round(s); "
            f"about {est:.0f} s (+ re-measurements of disturbed points)"
        )
        # One look at the machine before starting: warn early if it is busy.
        b = snap(set())
        time.sleep(0.5)
        e = snap(set())
        wall = max(1e-6, e["t"] - b["t"])
        busy = 100.0 * (e["other"] - b["other"]) / CLK_TCK / wall
        steal = sum(
            100.0 * (v[2] - b["cores"][c][2]) / max(1, v[1] - b["cores"][c][1])
            for c, v in e["cores"].items()
            if c in b["cores"]
        )
        if busy > cfg.other_max or steal > cfg.steal_max:
            top = top_others(b, e, wall)
            msg = (
                f"the machine is busy before the start (other processes {busy:.0f}% CPU"
                f"{': ' + top if top else ''}; steal {steal:.0f}%): expect noisy numbers"
            )
            log("WARNING: " + msg)
            self.notes.append(msg)
        self.start_backends()
        self.order: list[list[str]] = []
        for rnd in range(1, cfg.rounds + 1):
            k = (rnd - 1) % len(cfg.targets)
            order = cfg.targets[k:] + cfg.targets[:k]
            self.order.append(order)
            if cfg.rounds > 1:
                log(f"=== round {rnd}/{cfg.rounds}: {' '.join(order)}")
            for t in order:
                if t.startswith("lbapp") and self.import_error:
                    self.failures[(t, str(rnd))] = self.import_error
                    continue
                try:
                    port, _ = self.start_target(t, rnd)
                    self.validate(t, port)
                except (RuntimeError, OSError, http.client.HTTPException) as exc:
                    reason = str(exc)
                    log(f"ERROR: {t} (round {rnd}): {reason}")
                    self.failures[(t, str(rnd))] = reason.splitlines()[0] if reason else repr(exc)
                    self.stop_target()
                    continue
                for body in cfg.bodies:
                    rec = self.measure(t, rnd, body, port)
                    if not rec.get("ok"):
                        self.failures[(t, f"{rnd}/{body}")] = rec.get("error", "failed")
                        break
                self.stop_target()
        for g in list(self.backends):
            stop_group(g)
        self.backends.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / "www" / "1m").unlink()


# --------------------------------------------------------------------------- report
def _f(x: float | None, nd: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{nd}f}"


def _ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _med(vals: list[Any]) -> float | None:
    nums = [float(v) for v in vals if v is not None]
    return statistics.median(nums) if nums else None


def versions(cfg: Cfg) -> dict[str, str]:
    def out(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=str(ROOT))
            return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    v = {
        "python": out([cfg.python, "-V"]),
        "uvicorn": getattr(cfg, "uvicorn_version", "?"),
        "wrk": out(["wrk", "-v"]).split(" [")[0],
    }
    if shutil.which("nginx"):
        v["nginx"] = out(["nginx", "-v"]).replace("nginx version: ", "")
    rev = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    v["lbapp"] = rev if re.fullmatch(r"[0-9a-f]{4,40}", rev) else "no commit"
    return v


def report(bench: Bench, started: str) -> str:
    cfg = bench.cfg
    kept = [r for r in bench.records if not r.get("discarded")]
    lines: list[str] = []
    w = lines.append
    cpu_model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    vers = versions(cfg)
    lb_vars = sorted(
        k
        for k in os.environ
        if k.startswith("LB_")
        and k
        not in (
            "LB_APP",
            "LB_APP_DIR",
            "LB_CPUS",
            "LB2_CPUS",
            "LB_PORT",
            "LB_READY_TIMEOUT",
            "LB_EXTRA_ARGS",
            "LB_HEALTH_INTERVAL",
            "LB_BACKENDS",
        )
    )
    w(f"# lbapp benchmark — {started}")
    w("")
    w(f"- machine: {os.cpu_count()} vCPU ({cpu_model}), kernel {platform.release()}")
    w("- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    w(
        f"- load: `wrk -t{cfg.threads} -c{cfg.conns} -d{cfg.duration}s --latency "
        f"--timeout {cfg.wrk_timeout}`, "
        f"{cfg.warmup} s warm-up per point, {cfg.rounds} round(s)"
        + (" (median shown, min-max in brackets)" if cfg.rounds > 1 else "")
    )
    w(
        f"- backends: {cfg.backend} x3 on 127.0.0.1:{','.join(map(str, bench.backend_ports))}; "
        f"small = `GET {bench.paths['small']}`, big = `GET {bench.paths['big']}` (1 MiB)"
    )
    w(
        f"- LB: `uvicorn {cfg.lb_app}{' --app-dir ' + cfg.lb_app_dir if cfg.lb_app_dir else ''} "
        "--loop uvloop "
        f"--http httptools --no-access-log --no-server-header --no-date-header --workers N"
        f"{' ' + ' '.join(cfg.lb_extra) if cfg.lb_extra else ''}`, LB_HEALTH_INTERVAL={cfg.health_interval}"
        + (", " + ", ".join(f"{k}={os.environ[k]}" for k in lb_vars) if lb_vars else "")
    )
    if (ROOT / "settings.env").exists():
        w("- note: `settings.env` exists in the project root; lbapp reads it (the environment wins)")
    w(
        f"- CPUs: LB {cfg.lb_cpus} (lbapp-w2: {cfg.lb2_cpus}); wrk {cfg.wrk_cpus}; "
        f"backends {cfg.backend_cpus}"
        + (
            " — only one CPU available: everything shares it, numbers are not comparable"
            if cfg.single_cpu
            else ""
        )
    )
    w("")

    agg: dict[tuple[str, str], dict[str, Any]] = {}
    for t in cfg.targets:
        for body in cfg.bodies:
            rs = [r for r in kept if r["target"] == t and r["body"] == body and r.get("ok")]
            if not rs:
                continue
            rps_list = [r["rps"] for r in rs]
            agg[(t, body)] = {
                "n": len(rs),
                "rps": _med(rps_list),
                "rps_min": min(rps_list),
                "rps_max": max(rps_list),
                "mib": _med([r.get("mib_s") for r in rs]),
                "p50": _med([r.get("p50_ms") for r in rs]),
                "p99": _med([r.get("p99_ms") for r in rs]),
                "lb_cpu": _med([r.get("lb_cpu_pct") for r in rs]),
                "lb_us": _med([r.get("lb_us_per_req") for r in rs]),
                "be_cpu": _med([r.get("be_cpu_pct") for r in rs]),
                "non2xx": sum(r.get("non2xx", 0) for r in rs),
                "sock": sum(sum(r["sock_err"].values()) for r in rs),
                "sock_d": {
                    k: sum(r["sock_err"][k] for r in rs) for k in ("connect", "read", "write", "timeout")
                },
                "noise": max(r["other_cpu_pct"] for r in rs),
                "steal": max(r["steal_pct"] for r in rs),
                "disturbed": any(r.get("disturbed") for r in rs),
            }
    w(
        "| target | body | req/s | MiB/s | p50 ms | p99 ms | x direct | LB CPU % | LB CPU µs/req "
        "| backends CPU % | non-2xx | socket errors | other CPU % / steal % |"
    )
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for body in cfg.bodies:
        d = agg.get(("direct", body))
        for t in cfg.targets:
            a = agg.get((t, body))
            if a is None:
                why = next((v for (ft, fr), v in bench.failures.items() if ft == t), "no data")
                w(f"| {t} | {body} | **failed**: {why.replace('|', '/')[:160]} |" + " |" * 10)
                continue
            rps = _f(a["rps"])
            if a["n"] > 1:
                rps += f" ({_f(a['rps_min'])}-{_f(a['rps_max'])})"
            ratio = "1.00" if t == "direct" else (_ratio(a["rps"] / d["rps"]) if d and d["rps"] else "-")
            sock = str(a["sock"])
            if a["sock"]:
                sd = a["sock_d"]
                sock += f" (c{sd['connect']}/r{sd['read']}/w{sd['write']}/t{sd['timeout']})"
            noise = f"{a['noise']:.0f} / {a['steal']:.0f}" + (" ⚠" if a["disturbed"] else "")
            w(
                f"| {t} | {body} | {rps} | {_f(a['mib'], 1)} | {_f(a['p50'], 2)} | {_f(a['p99'], 2)} "
                f"| {ratio} | {_f(a['lb_cpu'])} | {_f(a['lb_us'])} | {_f(a['be_cpu'])} | {a['non2xx']} "
                f"| {sock} | {noise} |"
            )
    w("")
    w(
        "x direct = req/s ÷ the same run's `direct` req/s for that body (wrk straight at one backend, "
        "same CPU layout: the ceiling). LB CPU µs/req = CPU time of the LB's process group (all "
        "workers) ÷ requests: the load-independent cost of the LB. CPU % = 100 per core. "
        "Latencies are wrk's at saturation (64 connections, closed loop): compare them between "
        "rows, not with an SLO. other CPU % = CPU used during the point by processes that are not "
        "part of the benchmark, steal % = taken by the hypervisor (both: the maximum over rounds); "
        f"⚠ = over {cfg.other_max}% / "
        f"{cfg.steal_max}% even after {cfg.retries} re-measurement(s): that row is unreliable."
    )
    w("")
    n_dist = sum(1 for a in agg.values() if a["disturbed"])
    if n_dist:
        w(
            f"**⚠ {n_dist} of {len(agg)} rows were measured while other processes or the hypervisor took "
            f"CPU (over {cfg.other_max}% / {cfg.steal_max}%): their req/s and latencies are unreliable; "
            "LB CPU µs/req is the least affected column. Re-run on a quiet machine.**"
        )
        w("")
    if bench.notes:
        for n in bench.notes:
            w(f"- note: {n}")
        w("")
    failed = sorted(set(bench.failures.items()))
    if failed:
        w("Failures:")
        w("")
        for (t, where), why in failed:
            w(f"- {t} (round {where}): {why}")
        w("")
    if cfg.rounds > 1 or any(r.get("discarded") for r in bench.records):
        w("<details><summary>all measured points</summary>")
        w("")
        w(
            "| round | target | body | attempt | req/s | MiB/s | p50 ms | p99 ms | LB CPU % | LB µs/req | "
            "other CPU % | steal % | note |"
        )
        w("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in bench.records:
            note = (
                "discarded (disturbed)"
                if r.get("discarded")
                else (
                    "kept, disturbed" if r.get("disturbed") else ("" if r.get("ok") else r.get("error", ""))
                )
            )
            if r.get("disturbed") and r.get("other_top"):
                note += f": {r['other_top']}"
            w(
                f"| {r['round']} | {r['target']} | {r['body']} | {r['attempt']} | {_f(r.get('rps'))} "
                f"| {_f(r.get('mib_s'), 1)} | {_f(r.get('p50_ms'), 2)} | {_f(r.get('p99_ms'), 2)} "
                f"| {_f(r.get('lb_cpu_pct'))} | {_f(r.get('lb_us_per_req'))} | {_f(r.get('other_cpu_pct'))} "
                f"| {_f(r.get('steal_pct'))} | {note} |"
            )
        w("")
        w("</details>")
        w("")
    w(f"Raw wrk output and logs: `{bench.run_dir}`")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def main() -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(cleanup)
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    try:
        cfg = Cfg()
        prerequisites(cfg)
        bench = Bench(cfg)
        bench.setup()
        bench.run()
    except Fatal as exc:
        log(f"ERROR: {exc}")
        cleanup()
        return exc.code
    except KeyboardInterrupt:
        log("interrupted")
        cleanup()
        return 130
    cleanup()
    text = report(bench, started)
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    (cfg.results_dir / "latest.md").write_text(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (cfg.results_dir / f"{stamp}.md").write_text(text)
    with open(cfg.results_dir / "latest.json", "w") as f:
        json.dump(
            {
                "started": started,
                "backend": cfg.backend,
                "targets": cfg.targets,
                "records": bench.records,
                "failures": [
                    {"target": t, "where": wh, "reason": why} for (t, wh), why in bench.failures.items()
                ],
            },
            f,
            indent=1,
        )
    sys.stdout.write(text)
    sys.stdout.flush()
    log(f"written {cfg.results_dir / 'latest.md'} (and {stamp}.md, latest.json)")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
