#!/usr/bin/env python3
"""lbapp benchmark: lbapp against nginx and Go's httputil.ReverseProxy in one run (see README.md).

Starts three backends on 127.0.0.1 (one nginx, or lbapp's echo backend), builds the Go reverse
proxy of the shared reference harness (bench/golb) into a cache directory, then runs ROUNDS
interleaved rounds. In each round every target (direct, nginx, golb, lbapp, lbapp-nolog,
lbapp-w2; the order rotated by one each round) is started fresh, validated, and measured in every
scenario: `small` (GET, 3 bytes), `big` (GET, 1 MiB), `upload` (POST, 1 MiB), `close` (small with
`Connection: close`: a new client connection per request) and `idle10k` (10,000 idle keep-alive
clients held while wrk runs on other connections). The report gives one table per scenario with
medians over rounds, the min-max, LB CPU µs per request, latencies, ratios to golb and nginx, and
the issue-15 targets; printed, and written to bench/results/latest.md (+ latest.json).

Every process it starts gets its own session/process group (setsid) and is stopped by that id on
any exit. Knobs are environment variables (README.md).
Exit status: 0 ok, 1 a target failed to start/validate/measure, 2 missing prerequisites or bad knob.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import hashlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    BENCH_DIR,
    CLK_TCK,
    ROOT,
    STARTED,
    Fatal,
    Group,
    _on_signal,
    cleanup,
    env_int,
    env_str,
    fill_template,
    free_ports,
    group_pct,
    group_rss,
    http_get,
    http_request,
    log,
    other_pct,
    parse_wrk,
    port_in_use,
    raise_nofile,
    snap,
    start_group,
    steal_pct,
    stop_group,
    top_others,
)
from report import report

MIB = 1048576
ALL_TARGETS = ("direct", "nginx", "golb", "lbapp", "lbapp-nolog", "lbapp-w2")
ALL_SCENARIOS = ("small", "big", "upload", "close", "idle10k")
LBAPP_TARGETS = ("lbapp", "lbapp-nolog", "lbapp-w2")


def split(raw: str) -> list[str]:
    return [x for x in re.split(r"[\s,]+", raw) if x]


# --------------------------------------------------------------------------- configuration
class Cfg:
    def __init__(self) -> None:
        self.duration = env_int("DURATION", 5, 1)
        self.warmup = env_int("WARMUP", 1, 0)
        self.rounds = env_int("ROUNDS", 3, 1)
        self.conns = env_int("CONNS", 64, 1)
        self.threads = env_int("THREADS", 1, 1)
        self.wrk_timeout = env_str("WRK_TIMEOUT", "5s")
        self.retries = env_int("RETRIES", 1, 0)
        self.other_max = env_int("OTHER_MAX_PCT", 10, 0)
        self.steal_max = env_int("STEAL_MAX_PCT", 10, 0)
        self.quiet_wait = env_int("QUIET_WAIT", 20, 0)
        self.ready_timeout = env_int("LB_READY_TIMEOUT", 30, 1)
        self.install = os.environ.get("BENCH_INSTALL", "1").strip() != "0"
        self.backend_explicit = bool(os.environ.get("BACKEND", "").strip())
        self.backend = env_str("BACKEND", "nginx")
        if self.backend not in ("nginx", "echo"):
            raise Fatal(f"BACKEND={self.backend!r}: use 'nginx' or 'echo'", 2)
        self.backend_workers = env_int("BACKEND_WORKERS", 1, 1)
        self.idle_conns = env_int("IDLE_CONNS", 10000, 1)
        self.idle_concurrency = env_int("IDLE_CONCURRENCY", 100, 1)

        self.targets = split(env_str("TARGETS", " ".join(ALL_TARGETS)))
        for t in self.targets:
            if t not in ALL_TARGETS:
                raise Fatal(f"TARGETS: unknown target {t!r} ({' '.join(ALL_TARGETS)})", 2)
        self.scenarios = split(env_str("SCENARIOS", os.environ.get("BODIES", "") or " ".join(ALL_SCENARIOS)))
        for s in self.scenarios:
            if s not in ALL_SCENARIOS:
                raise Fatal(f"SCENARIOS: unknown scenario {s!r} ({' '.join(ALL_SCENARIOS)})", 2)
        self.idle_targets = split(env_str("IDLE_TARGETS", "lbapp"))
        for t in self.idle_targets:
            if t not in ALL_TARGETS or t == "direct":
                raise Fatal(f"IDLE_TARGETS: {t!r} is not an LB target ({' '.join(ALL_TARGETS[1:])})", 2)

        # The project's venv: PYTHON, else $VENV/bin/python; the launcher `lbapp` sits beside it.
        py = os.environ.get("PYTHON", "").strip() or str(Path(env_str("VENV", ".venv")) / "bin" / "python")
        if "/" not in py:
            self.python = shutil.which(py) or py
        else:
            p = Path(py)
            if not p.is_absolute():
                p = (Path.cwd() / p) if (Path.cwd() / p).exists() else (ROOT / p)
            self.python = str(p)
        self.lbapp_bin = str(Path(self.python).parent / "lbapp")
        self.golb_bin = ""

        # CPU layout (as the shared harness): LB alone on one core, wrk and backends together on
        # another; the 2-worker LB gets both.
        allowed = sorted(os.sched_getaffinity(0))
        a0, a1 = str(allowed[0]), str(allowed[1] if len(allowed) > 1 else allowed[0])
        self.single_cpu = len(allowed) < 2
        self.lb_cpus = env_str("LB_CPUS", a0)
        self.lb2_cpus = env_str("LB2_CPUS", f"{a0},{a1}" if a0 != a1 else a0)
        self.wrk_cpus = env_str("WRK_CPUS", a1)
        self.backend_cpus = env_str("BACKEND_CPUS", a1)

        bp = os.environ.get("BACKEND_PORTS", "").strip()
        self.fixed_backend_ports = [int(x) for x in split(bp)] if bp else []
        if self.fixed_backend_ports and len(self.fixed_backend_ports) != 3:
            raise Fatal("BACKEND_PORTS needs exactly 3 ports, e.g. 19001,19002,19003", 2)
        self.fixed_lb_port = env_int("LB_PORT", 0, 0)
        self.results_dir = Path(env_str("RESULTS_DIR", str(BENCH_DIR / "results")))
        self.run_dir_env = os.environ.get("RUN_DIR", "").strip()
        cache = Path(os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache")
        self.build_dir = Path(env_str("BUILD_DIR", str(cache / "lbapp-bench")))

    def wants_idle(self, t: str) -> bool:
        return "idle10k" in self.scenarios and t in self.idle_targets

    def estimate_s(self) -> float:
        wrk_scen = [s for s in self.scenarios if s != "idle10k"]
        point = self.duration + self.warmup + 0.5
        per_round = len(self.targets) * (len(wrk_scen) * point + 2)
        per_round += sum(2 * point + 15 for t in self.targets if self.wants_idle(t))
        return self.rounds * per_round + 5


# --------------------------------------------------------------------------- prerequisites
def _apt_install(pkgs: list[str]) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs]
    log(f"installing {' '.join(pkgs)}: {' '.join(cmd)}")
    try:
        if subprocess.run(cmd, env=env, stdout=sys.stderr, timeout=900).returncode == 0:
            return True
        log("apt-get install failed; running apt-get update and retrying once")
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=sys.stderr, timeout=600)
        return subprocess.run(cmd, env=env, stdout=sys.stderr, timeout=900).returncode == 0
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
    need = {"wrk": "wrk"}
    if cfg.backend == "nginx" or "nginx" in cfg.targets:
        need["nginx"] = "nginx"
    if "golb" in cfg.targets:
        need["go"] = "golang-go"
    missing = [tool for tool in need if not shutil.which(tool)]
    if missing and can_install:
        _apt_install([need[t] for t in missing])
        missing = [t for t in missing if not shutil.which(t)]
    if "nginx" in missing and not cfg.backend_explicit and "nginx" not in cfg.targets:
        log("nginx not available: using lbapp's echo backend (BACKEND=echo) instead")
        cfg.backend = "echo"
        missing.remove("nginx")
    if missing:
        why = (
            "BENCH_INSTALL=0"
            if os.geteuid() == 0 and not cfg.install
            else "not root"
            if os.geteuid() != 0
            else "apt-get failed or is unavailable"
        )
        pkgs = " ".join(need[t] for t in missing)
        raise Fatal(f"{' and '.join(missing)} not found ({why}); install with: apt-get install -y {pkgs}", 2)
    if not Path(cfg.python).exists():
        raise Fatal(f"python {cfg.python} not found: create the project venv first (or set PYTHON=...)", 2)
    if any(t in LBAPP_TARGETS for t in cfg.targets) and not Path(cfg.lbapp_bin).exists():
        raise Fatal(f"the launcher {cfg.lbapp_bin} is missing: pip install -e . into that venv first", 2)
    if "golb" in cfg.targets:
        cfg.golb_bin = build_golb(cfg)


def build_golb(cfg: Cfg) -> str:
    """go build bench/golb into BUILD_DIR (outside the repository), once per source version."""
    src = BENCH_DIR / "golb"
    digest = hashlib.sha256()
    for name in ("go.mod", "main.go"):
        digest.update((src / name).read_bytes())
    ver = subprocess.run(["go", "version"], capture_output=True, text=True, timeout=60).stdout.strip()
    digest.update(ver.encode())
    out = cfg.build_dir / f"golb-{digest.hexdigest()[:12]}"
    if out.exists():
        return str(out)
    cfg.build_dir.mkdir(parents=True, exist_ok=True)
    log(f"building the Go reverse proxy: go build -o {out} ({ver})")
    env = dict(os.environ, CGO_ENABLED="0", GOTOOLCHAIN="local", GOFLAGS="-mod=mod")
    env.setdefault("GOCACHE", str(cfg.build_dir / "go-build"))
    env.setdefault("GOPATH", str(cfg.build_dir / "gopath"))
    tmp = out.with_suffix(".tmp")
    r = subprocess.run(
        ["go", "build", "-o", str(tmp), "."],
        cwd=str(src),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        raise Fatal(f"go build of bench/golb failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", 2)
    tmp.rename(out)
    return str(out)


# --------------------------------------------------------------------------- the benchmark
class Bench:
    def __init__(self, cfg: Cfg) -> None:
        self.cfg = cfg
        self.records: list[dict[str, Any]] = []
        self.idle: list[dict[str, Any]] = []  # one per idle10k measurement
        self.failures: dict[tuple[str, str], str] = {}  # (target, where) -> reason
        self.notes: list[str] = []
        self.backends: list[Group] = []
        self.target: Group | None = None
        self.harness_pgid = os.getpgrp()
        self.order: list[list[str]] = []
        self.served = 0
        self.access_lines: list[dict[str, Any]] = []

    # ---- setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.run_dir_env:
            self.run_dir = Path(cfg.run_dir_env)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.run_dir = Path(tempfile.mkdtemp(prefix="lbapp-bench-"))
        os.chmod(self.run_dir, 0o755)  # nginx workers run unprivileged when started as root
        for d in ("raw", "targets", "backends", "www"):
            (self.run_dir / d).mkdir(exist_ok=True)
        ports = free_ports(4)
        self.backend_ports = cfg.fixed_backend_ports or ports[:3]
        self.lb_port = cfg.fixed_lb_port or ports[3]
        for p in [*self.backend_ports, self.lb_port]:
            if port_in_use(p):
                raise Fatal(f"port {p} on 127.0.0.1 is already in use", 2)
        self.backends_csv = ",".join(f"http://127.0.0.1:{p}" for p in self.backend_ports)
        big = "/1m" if cfg.backend == "nginx" else f"/bytes/{MIB}"
        self.paths = {"small": "/", "big": big, "upload": "/upload", "close": "/", "idle10k": "/"}
        self.nofile = raise_nofile(cfg.idle_conns * 2 + 4096)
        if "idle10k" in cfg.scenarios and self.nofile < cfg.idle_conns + 1024:
            msg = (
                f"RLIMIT_NOFILE is {self.nofile}, too low for IDLE_CONNS={cfg.idle_conns} "
                "(run as root, or raise `ulimit -n`)"
            )
            log("WARNING: " + msg)
            self.notes.append(msg)
        log(
            f"run dir {self.run_dir}; backends ({cfg.backend}) on {self.backend_ports}, "
            f"LB port {self.lb_port}"
        )

    def lb_env(self, t: str, idle: bool = False) -> dict[str, str]:
        env = dict(os.environ)
        env["LB_BACKENDS"] = self.backends_csv
        env["LB_ACCESS_LOG"] = "false" if t == "lbapp-nolog" else "true"
        if idle:
            env["LB_CLIENT_KEEPALIVE_TIMEOUT"] = "300"
        return env

    def start_backends(self) -> None:
        cfg = self.cfg
        bdir = self.run_dir / "backends"
        if cfg.backend == "nginx":
            with open(self.run_dir / "www" / "1m", "wb") as f:
                f.write(os.urandom(MIB))
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
            argv = ["nginx", "-e", str(bdir / "error.log"), "-c", str(bdir / "nginx.conf"), "-p", str(bdir)]
            t = subprocess.run([argv[0], "-t", "-q", *argv[1:]], capture_output=True, text=True, timeout=30)
            if t.returncode != 0:
                raise Fatal(f"backend nginx config rejected: {t.stderr.strip()}")
            self.backends.append(start_group("backends (nginx)", cfg.backend_cpus, argv, bdir / "stdout.log"))
        else:
            for i, p in enumerate(self.backend_ports, 1):
                argv = [cfg.python, "-m", "lbapp.echo", "--port", str(p), "--name", f"backend-{i}"]
                self.backends.append(
                    start_group(f"backend-{i} (echo)", cfg.backend_cpus, argv, bdir / f"echo-{i}.log")
                )
        deadline = time.monotonic() + 20
        for p in self.backend_ports:
            while True:
                dead = [g for g in self.backends if not g.leader_alive()]
                if dead:
                    raise Fatal(f"{dead[0].name} exited at start-up; log:\n{dead[0].log_tail()}")
                with contextlib.suppress(OSError):
                    if 200 <= http_get(p, "/", 1.0)[0] < 300:
                        break
                if time.monotonic() > deadline:
                    raise Fatal(f"backend on port {p} did not answer GET / within 20 s")
                time.sleep(0.1)

    # ---- targets
    def start_target(self, t: str, rnd: int, idle: bool = False) -> int:
        """Start target t (fresh); return its port. Raises RuntimeError with a reason."""
        cfg = self.cfg
        if t == "direct":
            return self.backend_ports[0]
        tdir = self.run_dir / "targets" / f"r{rnd}-{t}{'-idle' if idle else ''}"
        tdir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 10
        while port_in_use(self.lb_port):  # the previous target may still be closing
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.lb_port} is still in use")
            time.sleep(0.1)
        timeout = 15
        env = None
        cpus = cfg.lb_cpus
        if t == "nginx":
            ups = "".join(f"        server 127.0.0.1:{p};\n" for p in self.backend_ports)
            conf = fill_template(
                BENCH_DIR / "conf" / "nginx-lb.conf.in",
                {"TARGET_DIR": str(tdir), "LB_PORT": str(self.lb_port), "UPSTREAM_SERVERS": ups},
            )
            (tdir / "nginx.conf").write_text(conf)
            argv = ["nginx", "-e", str(tdir / "error.log"), "-c", str(tdir / "nginx.conf"), "-p", str(tdir)]
        elif t == "golb":
            argv = [cfg.golb_bin]
            env = dict(os.environ, LB_PORT=str(self.lb_port), LB_BACKENDS=self.backends_csv)
        else:
            argv = [cfg.lbapp_bin, "--host", "127.0.0.1", "--port", str(self.lb_port)]
            if t == "lbapp-w2":
                argv += ["--workers", "2"]
                cpus = cfg.lb2_cpus
            env = self.lb_env(t, idle)
            timeout = cfg.ready_timeout
        (tdir / "cmd.txt").write_text(" ".join(argv) + "\n")
        g = start_group(t, cpus, argv, tdir / "stdout.log", env=env)
        self.target = g
        self.served = 0  # requests wrk completed through this instance (access-log check)
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if not g.leader_alive():
                raise RuntimeError(f"exited with status {g.proc.returncode} at start-up:\n{g.log_tail()}")
            try:
                st = http_get(self.lb_port, "/", 2.0)[0]
                if 200 <= st < 300:
                    return self.lb_port
                last = f"GET / answered {st}"
            except OSError as exc:
                last = f"GET /: {exc.__class__.__name__}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout} s ({last}; log {g.logfile}):\n{g.log_tail()}")
            time.sleep(0.1)

    def validate(self, t: str, port: int) -> None:
        """Small body 2xx (nginx backends: exactly 'ok\\n'); big body exactly 1 MiB; an upload of
        1 MiB answered 200, with the backends reading at least 1 MiB for it; the round robin."""
        cfg = self.cfg
        st, _, body = http_get(port, self.paths["small"], 10)
        if not 200 <= st < 300:
            raise RuntimeError(f"GET / answered {st}: {body[:200]!r}")
        if cfg.backend == "nginx" and body != b"ok\n":
            raise RuntimeError(f"GET / returned {body[:200]!r}, expected the backend's b'ok\\n'")
        if "big" in cfg.scenarios:
            st, _, body = http_get(port, self.paths["big"], 30)
            if st != 200 or len(body) != MIB:
                raise RuntimeError(
                    f"GET {self.paths['big']} answered {st} with {len(body)} bytes, expected {MIB}"
                )
        if "upload" in cfg.scenarios:
            be_before = self.upload_log()
            st, _, body = http_request(port, "POST", "/upload", os.urandom(MIB), 30)
            be_after = self.upload_log()
            deadline = time.monotonic() + 2  # nginx logs a request just after it has answered it
            while be_before is not None and be_after is not None and be_after[0] == be_before[0]:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
                be_after = self.upload_log()
            if st != 200:
                raise RuntimeError(f"POST /upload (1 MiB) answered {st}: {body[:200]!r}")
            if be_before is not None and be_after is not None:
                got = be_after[1] - be_before[1]
                if be_after[0] - be_before[0] != 1 or got < MIB:
                    raise RuntimeError(
                        f"POST /upload answered 200 but the backends logged {be_after[0] - be_before[0]} "
                        f"complete uploads with {got} bytes (want 1 with >= {MIB})"
                    )
                log(f"{t}: 1 MiB upload answered 200, the backend read {got:,} bytes (head + body)")
            if cfg.backend == "echo":
                seen = json.loads(body).get("body_bytes")
                if seen != MIB:
                    raise RuntimeError(f"POST /upload: the echo backend saw {seen} bytes, not {MIB}")
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

    def upload_log(self) -> tuple[int, int] | None:
        """(uploads, bytes) the backend nginx has read in full so far: its upload.log has one
        `$request_length $status` line per POST /upload (None with the echo backend)."""
        if self.cfg.backend != "nginx":
            return None
        n = total = 0
        with contextlib.suppress(FileNotFoundError), open(self.run_dir / "backends" / "upload.log") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1] == "200":
                    n += 1
                    total += int(parts[0])
        return n, total

    def stop_target(self) -> None:
        if self.target is not None:
            g = self.target
            stop_group(g)
            self.target = None
            if g.name in ("lbapp", "lbapp-w2") and self.served:
                self.check_access_log(g)

    def check_access_log(self, g: Group) -> None:
        """`lbapp` is measured with its access log on: check it really wrote about one line per
        request it served (text format: `... backend=... attempts=...`), once it has exited."""
        if os.environ.get("LB_LOG_FORMAT", "text").strip().lower() == "json":
            marker = '"logger": "lbapp.access"'
        else:
            marker = " attempts="
        lines = 0
        if g.logfile and g.logfile.exists():
            with open(g.logfile, errors="replace") as f:
                lines = sum(1 for line in f if marker in line)
        self.access_lines.append({"target": g.name, "served": self.served, "lines": lines})
        if lines < 0.9 * self.served:
            msg = (
                f"{g.name} ran with LB_ACCESS_LOG=true but its log ({g.logfile}) has {lines:,} access lines "
                f"for the {self.served:,} requests wrk completed: the access log was not (fully) "
                "written, so its cost is not (fully) in these numbers"
            )
            log("WARNING: " + msg)
            self.notes.append(msg)

    # ---- measurement
    def run_wrk(self, port: int, scenario: str, duration: int, out: Path) -> str:
        cfg = self.cfg
        argv = ["taskset", "-c", cfg.wrk_cpus, "timeout", "-k", "5", str(duration + 30), "wrk"]
        argv += [
            f"-t{cfg.threads}",
            f"-c{cfg.conns}",
            f"-d{duration}s",
            "--latency",
            "--timeout",
            cfg.wrk_timeout,
        ]
        if scenario == "close":
            argv += ["-H", "Connection: close"]
        if scenario == "upload":
            argv += ["-s", str(BENCH_DIR / "upload.lua")]
        argv.append(f"http://127.0.0.1:{port}{self.paths[scenario]}")
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
        text = out.read_text(errors="replace")
        self.served += parse_wrk(text).get("requests") or 0
        return text

    def measure(
        self,
        t: str,
        rnd: int,
        scenario: str,
        port: int,
        label: str | None = None,
        extra_pgids: set[int] = frozenset(),
    ) -> dict[str, Any]:
        """One point: warm-up, then wrk with /proc snapshots around it; measured again (up to
        RETRIES) when other processes or steal disturbed it."""
        cfg = self.cfg
        label = label or scenario
        lb_pgid = self.target.pgid if self.target and t != "direct" else 0
        be_pgids = {g.pgid for g in self.backends}
        attempts: list[dict[str, Any]] = []
        for attempt in range(cfg.retries + 1):
            raw = self.run_dir / "raw" / f"r{rnd}-{t}-{label}.a{attempt}.txt"
            if attempt:
                self.wait_quiet({self.harness_pgid, *be_pgids, *extra_pgids, lb_pgid} - {0})
            if cfg.warmup:
                self.run_wrk(port, scenario, cfg.warmup, raw.with_suffix(".warmup.txt"))
            pg = {self.harness_pgid, *be_pgids, *extra_pgids} | ({lb_pgid} if lb_pgid else set())
            up_b = self.upload_log() if scenario == "upload" else None
            b = snap(pg)
            text = self.run_wrk(port, scenario, cfg.duration, raw)
            e = snap(pg)
            up_e = self.upload_log() if scenario == "upload" else None
            wall = max(1e-6, e["t"] - b["t"])
            rec = parse_wrk(text)
            rec.update(target=t, round=rnd, scenario=label, path=self.paths[scenario], attempt=attempt)
            rec["wrk_file"] = str(raw)
            rec["lb_cpu_pct"] = group_pct(b, e, {lb_pgid} if lb_pgid else set())
            rec["be_cpu_pct"] = group_pct(b, e, be_pgids)
            rec["wrk_cpu_pct"] = group_pct(b, e, {self.harness_pgid})  # wrk is reaped by us: our cutime
            rec["other_cpu_pct"] = other_pct(b, e, wall)
            steal = steal_pct(b, e)
            busy = {}
            for c, v1 in e["cores"].items():
                v0 = b["cores"].get(c, v1)
                busy[c] = round(100.0 * (v1[0] - v0[0]) / max(1, v1[1] - v0[1]), 1)
            rec["steal_pct"], rec["core_busy_pct"] = steal, busy
            rec["other_top"] = top_others(b, e, wall)
            n = rec.get("requests") or 0
            if scenario == "upload" and rec.get("rps") is not None:
                rec["mib_s_received"] = rec.get("mib_s")
                rec["mib_s"] = rec["rps"]  # 1 MiB sent per request
            if lb_pgid and n:
                lb_j = e["groups"].get(lb_pgid, 0) - b["groups"].get(lb_pgid, 0)
                rec["lb_us_per_req"] = lb_j / CLK_TCK / n * 1e6
            if n and up_b is not None and up_e is not None:
                # uploads the backends read in full, per request wrk counted (wrk stops with
                # some uploads in flight, so a little under 1.0 is normal)
                rec["be_uploads_per_req"] = (up_e[0] - up_b[0]) / n
                rec["be_read_mib_per_req"] = (up_e[1] - up_b[1]) / max(1, up_e[0] - up_b[0]) / MIB
            rec["disturbed"] = rec["other_cpu_pct"] > cfg.other_max or steal > cfg.steal_max
            if lb_pgid and self.target and not self.target.leader_alive():
                rec["ok"] = False
                rec["error"] = f"LB exited during the measurement (status {self.target.proc.returncode})"
            elif not rec["ok"]:
                rec["error"] = "wrk produced no result: " + " ".join(text.split())[:200]
            summary = (
                f"{rec.get('rps', 0):,.0f} req/s, {rec.get('mib_s', 0):,.1f} MiB/s, "
                f"p50 {rec.get('p50_ms', 0):.2f} ms, p99 {rec.get('p99_ms', 0):.2f} ms, "
                f"LB {rec.get('lb_us_per_req') or 0:.0f} µs/req, "
                f"non-2xx {rec['non2xx']}, sock err {sum(rec['sock_err'].values())}, "
                f"other CPU {rec['other_cpu_pct']:.0f}%, steal {steal:.0f}%"
            )
            log(f"  r{rnd} {t} {label}: {summary if rec['ok'] else rec['error']}")
            rec["discarded"] = False
            self.records.append(rec)
            attempts.append(rec)
            if not rec["ok"] or not rec["disturbed"]:
                break
            if rec["other_top"]:
                log(f"  busiest other processes: {rec['other_top']}")
            if attempt < cfg.retries:
                log(
                    f"  disturbed (limits {cfg.other_max}% other CPU / {cfg.steal_max}% steal): "
                    "measuring again"
                )
        ok = [r for r in attempts if r["ok"]]
        if len(ok) > 1 and all(r["disturbed"] for r in ok):  # keep the least disturbed one
            keep = min(ok, key=lambda r: r["other_cpu_pct"] + r["steal_pct"])
            for r in ok:
                r["discarded"] = r is not keep
            return keep
        for r in attempts[:-1]:
            r["discarded"] = True
        return attempts[-1]

    def measure_idle(self, t: str, rnd: int, port: int) -> None:
        """idle10k: small-body wrk without idle clients (idle-base), then IDLE_CONNS idle
        keep-alive clients opened and held, the LB's RSS read, and the same wrk again."""
        cfg = self.cfg
        assert self.target is not None
        pgid = self.target.pgid
        base = self.measure(t, rnd, "small", port, label="idle-base")
        row: dict[str, Any] = {"target": t, "round": rnd, "conns": cfg.idle_conns}
        row["rss_before"] = group_rss(pgid)
        hold = 2 * (cfg.warmup + cfg.duration) * (cfg.retries + 1) + 90
        argv = [cfg.python if Path(cfg.python).exists() else sys.executable, str(BENCH_DIR / "idle_conns.py")]
        argv += [
            "--port",
            str(port),
            "--conns",
            str(cfg.idle_conns),
            "--concurrency",
            str(cfg.idle_concurrency),
        ]
        argv += ["--hold", str(hold), "--setup-timeout", "120"]
        logf = self.run_dir / "raw" / f"r{rnd}-{t}-idle-holder.txt"
        holder = subprocess.Popen(
            ["taskset", "-c", cfg.wrk_cpus, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(logf, "wb"),  # noqa: SIM115 - closed with the process
            start_new_session=True,
        )
        hg = Group("idle holder", holder, logf)
        STARTED.append(hg)
        try:
            t0 = time.monotonic()
            ready = self._read_line(holder, 150)
            row["setup_s"] = time.monotonic() - t0
            m = re.match(r"READY ok=(\d+) failed=(\d+)", ready or "")
            if not m:
                raise RuntimeError(f"the idle holder did not report READY ({ready!r}; log {logf})")
            row["held"], row["failed"] = int(m.group(1)), int(m.group(2))
            log(
                f"  r{rnd} {t} idle10k: {row['held']:,} idle connections open ({row['failed']} failed) "
                f"in {row['setup_s']:.1f} s"
            )
            time.sleep(1.0)
            row["rss_idle"] = group_rss(pgid)
            rec = self.measure(t, rnd, "small", port, label="idle10k", extra_pgids={holder.pid})
            row["rss_after"] = group_rss(pgid)
            assert holder.stdin is not None
            holder.stdin.close()
            done = self._read_line(holder, 30) or ""
            m = re.match(r"DONE held=(\d+) closed_by_peer=(\d+)", done)
            row["closed_by_peer"] = int(m.group(2)) if m else None
        finally:
            stop_group(hg, grace=10)
        row.update(
            base_rps=base.get("rps"),
            base_p50=base.get("p50_ms"),
            base_p99=base.get("p99_ms"),
            rps=rec.get("rps"),
            p50=rec.get("p50_ms"),
            p99=rec.get("p99_ms"),
            lb_us=rec.get("lb_us_per_req"),
            base_lb_us=base.get("lb_us_per_req"),
            ok=bool(base.get("ok") and rec.get("ok")),
            disturbed=bool(base.get("disturbed") or rec.get("disturbed")),
            other=max(base["other_cpu_pct"], rec["other_cpu_pct"]),
            steal=max(base["steal_pct"], rec["steal_pct"]),
        )
        log(
            f"  r{rnd} {t} idle10k: LB RSS {row['rss_before'] / MIB:.0f} -> {row['rss_idle'] / MIB:.0f} MiB "
            f"holding {row['held']:,}; p99 {row['base_p99'] or 0:.2f} -> {row['p99'] or 0:.2f} ms; "
            f"closed by the LB while held: {row['closed_by_peer']}"
        )
        self.idle.append(row)

    @staticmethod
    def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str | None:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        fd = proc.stdout.fileno()
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                return buf.split(b"\n", 1)[0].decode(errors="replace")
        return None

    # ---- main loop
    def preflight_lbapp(self) -> str | None:
        """`lbapp --check` once with the environment the targets get: a broken lbapp or a bad
        setting is reported in one line instead of 30 s of waiting."""
        try:
            r = subprocess.run(
                [self.cfg.lbapp_bin, "--check"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=str(ROOT),
                env=self.lb_env("lbapp"),
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            return "lbapp --check took more than 60 s"
        if r.returncode != 0:
            lines = [x for x in (r.stderr + r.stdout).strip().splitlines() if x.strip()]
            return f"lbapp --check failed: {lines[-1] if lines else 'exit ' + str(r.returncode)}"
        return None

    def wait_quiet(self, ours: set[int]) -> None:
        """Before measuring a disturbed point again: wait (up to QUIET_WAIT s, in 1 s windows)
        until processes outside the benchmark and the hypervisor are under their limits."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.quiet_wait
        while time.monotonic() < deadline:
            b = snap(ours)
            time.sleep(1.0)
            e = snap(ours)
            wall = max(1e-6, e["t"] - b["t"])
            if other_pct(b, e, wall) <= cfg.other_max and steal_pct(b, e) <= cfg.steal_max:
                return
        log(f"  still busy after QUIET_WAIT={cfg.quiet_wait} s: measuring anyway")

    def warn_if_busy(self) -> None:
        cfg = self.cfg
        b = snap(set())
        time.sleep(0.5)
        e = snap(set())
        wall = max(1e-6, e["t"] - b["t"])
        busy = other_pct(b, e, wall)
        steal = steal_pct(b, e)
        if busy > cfg.other_max or steal > cfg.steal_max:
            top = top_others(b, e, wall)
            msg = (
                f"the machine is busy before the start (other processes {busy:.0f}% CPU"
                f"{': ' + top if top else ''}; steal {steal:.0f}%): expect noisy numbers"
            )
            log("WARNING: " + msg)
            self.notes.append(msg)

    def run_target(self, t: str, rnd: int) -> None:
        cfg = self.cfg
        wrk_scen = [s for s in cfg.scenarios if s != "idle10k"]
        if wrk_scen:
            try:
                port = self.start_target(t, rnd)
                self.validate(t, port)
            except (RuntimeError, OSError, http.client.HTTPException) as exc:
                self._fail(t, str(rnd), exc)
            else:
                for s in wrk_scen:
                    rec = self.measure(t, rnd, s, port)
                    if not rec.get("ok"):
                        self.failures[(t, f"{rnd}/{s}")] = rec.get("error", "failed")
                        break
            self.stop_target()
        if cfg.wants_idle(t):
            try:  # a fresh LB with a client keep-alive timeout long enough to hold the idle clients
                port = self.start_target(t, rnd, idle=True)
                self.measure_idle(t, rnd, port)
            except (RuntimeError, OSError, http.client.HTTPException) as exc:
                self._fail(t, f"{rnd}/idle10k", exc)
            self.stop_target()

    def _fail(self, t: str, where: str, exc: BaseException) -> None:
        reason = str(exc) or repr(exc)
        log(f"ERROR: {t} ({where}): {reason}")
        self.failures[(t, where)] = reason.splitlines()[0]

    def run(self) -> None:
        cfg = self.cfg
        lb_targets = [t for t in cfg.targets if t in LBAPP_TARGETS]
        import_error = self.preflight_lbapp() if lb_targets else None
        if import_error:
            log(f"ERROR: {import_error}: skipping {' '.join(lb_targets)}")
        log(
            f"targets {' '.join(cfg.targets)}; scenarios {' '.join(cfg.scenarios)}; {cfg.rounds} round(s); "
            f"about {cfg.estimate_s() / 60:.1f} min (+ re-measurements of disturbed points)"
        )
        self.warn_if_busy()
        self.start_backends()
        for rnd in range(1, cfg.rounds + 1):
            k = (rnd - 1) % len(cfg.targets)
            order = cfg.targets[k:] + cfg.targets[:k]
            self.order.append(order)
            log(f"=== round {rnd}/{cfg.rounds}: {' '.join(order)}")
            for t in order:
                if t in LBAPP_TARGETS and import_error:
                    self.failures[(t, str(rnd))] = import_error
                    continue
                self.run_target(t, rnd)
        for g in list(self.backends):
            stop_group(g)
        self.backends.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / "www" / "1m").unlink()


# --------------------------------------------------------------------------- main
def main() -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(cleanup)
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.monotonic()
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
    elapsed = time.monotonic() - t0
    text, summary = report(bench, started, elapsed)
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    (cfg.results_dir / "latest.md").write_text(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (cfg.results_dir / f"{stamp}.md").write_text(text)
    doc = {
        "started": started,
        "elapsed_s": round(elapsed, 1),
        "backend": cfg.backend,
        "targets": cfg.targets,
        "scenarios": cfg.scenarios,
        "order": bench.order,
        "summary": summary,
        "idle": bench.idle,
        "access_log_check": bench.access_lines,
        "records": bench.records,
        "failures": [{"target": t, "where": wh, "reason": why} for (t, wh), why in bench.failures.items()],
    }
    for name in ("latest.json", f"{stamp}.json"):
        with open(cfg.results_dir / name, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    sys.stdout.write(text)
    sys.stdout.flush()
    log(f"written {cfg.results_dir / 'latest.md'} (and {stamp}.md, latest.json) in {elapsed / 60:.1f} min")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
