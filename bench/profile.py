#!/usr/bin/env python3
"""`make profile`: a py-spy flame graph of lbapp under wrk load (see bench/README.md).

Starts the bench's three nginx backends and one lbapp (the launcher, default settings, access log
on, pinned to LB_CPUS like in `make bench`), loads it with wrk (PROFILE_SCENARIO, default `small`)
for PROFILE_DURATION seconds (default 15) after a one-second warm-up, and meanwhile samples it with
py-spy twice at once: `-f flamegraph` into bench/results/flame-<timestamp>.svg and `-f raw`
(collapsed stacks, one `frame;frame;... count` line per stack, for diffs and other tools) into
flame-<timestamp>.txt. py-spy and wrk run on WRK_CPUS, away from lbapp's core. Prints the paths
and the wrk summary. Everything it starts is stopped by process group on any exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import STARTED, Fatal, Group, _on_signal, cleanup, env_int, env_str, log, parse_wrk
from run import Bench, Cfg


def main() -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(cleanup)
    try:
        duration = env_int("PROFILE_DURATION", 15, 2)
        rate = env_int("PROFILE_RATE", 100, 1)
        scenario = env_str("PROFILE_SCENARIO", "small")
        if scenario not in ("small", "big", "upload", "close"):
            raise Fatal(f"PROFILE_SCENARIO={scenario!r}: use small, big, upload or close", 2)
        os.environ.setdefault("TARGETS", "lbapp")
        os.environ["SCENARIOS"] = scenario
        cfg = Cfg()
        cfg.targets, cfg.rounds = ["lbapp"], 1
        pyspy = str(Path(cfg.python).parent / "py-spy")
        if not Path(pyspy).exists():
            pyspy = shutil.which("py-spy") or ""
        if not pyspy:
            raise Fatal("py-spy not found: pip install -r bench/requirements.txt into the venv", 2)
        from run import prerequisites

        prerequisites(cfg)
        bench = Bench(cfg)
        bench.setup()
        bench.start_backends()
        port = bench.start_target("lbapp", 0)
        bench.validate("lbapp", port)
        assert bench.target is not None
        pid = bench.target.pgid  # taskset exec'd the launcher: the group leader is lbapp itself
        cfg.results_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        svg = cfg.results_dir / f"flame-{stamp}.svg"
        raw = cfg.results_dir / f"flame-{stamp}.txt"
        wrk_out = bench.run_dir / "raw" / "profile-wrk.txt"

        wrk_argv = ["taskset", "-c", cfg.wrk_cpus, "timeout", "-k", "5", str(duration + 40), "wrk"]
        wrk_argv += [f"-t{cfg.threads}", f"-c{cfg.conns}", f"-d{duration + 3}s", "--latency"]
        if scenario == "close":
            wrk_argv += ["-H", "Connection: close"]
        if scenario == "upload":
            wrk_argv += ["-s", str(Path(__file__).resolve().parent / "upload.lua")]
        wrk_argv.append(f"http://127.0.0.1:{port}{bench.paths[scenario]}")
        with open(wrk_out, "wb") as f:
            wrk = subprocess.Popen(wrk_argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        wg = Group("wrk", wrk, wrk_out)
        STARTED.append(wg)
        log(f"wrk ({scenario}) on lbapp pid {pid}; sampling for {duration} s after a 1 s warm-up")
        time.sleep(1.0)
        spies = []
        for fmt, out in (("flamegraph", svg), ("raw", raw)):
            argv = ["taskset", "-c", cfg.wrk_cpus, pyspy, "record", "-p", str(pid), "-d", str(duration)]
            argv += ["-r", str(rate), "-f", fmt, "-o", str(out)]
            if os.environ.get("PROFILE_NONBLOCKING", "").strip() not in ("", "0"):
                argv.append("--nonblocking")  # no pause of lbapp per sample; stacks may tear
            logf = bench.run_dir / "raw" / f"py-spy-{fmt}.log"
            with open(logf, "wb") as f:
                p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            g = Group(f"py-spy {fmt}", p, logf)
            STARTED.append(g)
            spies.append(g)
        for g in spies:
            try:
                g.proc.wait(timeout=duration + 30)
            except subprocess.TimeoutExpired:
                log(f"{g.name} did not finish in time")
        wrk.wait(timeout=duration + 45)
        result = parse_wrk(wrk_out.read_text(errors="replace"))
        failed = [g for g in spies if g.proc.returncode != 0]
        for g in failed:
            log(f"ERROR: {g.name} exited with {g.proc.returncode}: {g.log_tail(5)}")
        bench.stop_target()
        cleanup()
        if failed or not svg.exists():
            return 1
        print(f"flame graph: {svg}")
        print(f"collapsed stacks (py-spy -f raw): {raw}")
        print(
            f"load: wrk -c{cfg.conns} {scenario}: {result.get('rps', 0):,.0f} req/s, "
            f"p99 {result.get('p99_ms', 0):.2f} ms (while py-spy sampled it at {rate} Hz, twice: "
            "slower than unprofiled)"
        )
        return 0
    except Fatal as exc:
        log(f"ERROR: {exc}")
        cleanup()
        return exc.code
    except KeyboardInterrupt:
        cleanup()
        return 130


if __name__ == "__main__":
    sys.exit(main())
