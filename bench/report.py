"""The Markdown report of bench/run.py: one table per scenario, the pairs issue 15 compares, and
its targets with PASS/FAIL. Medians over the kept (not discarded) points of every round."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
from typing import Any

from benchlib import ROOT

MIB = 1048576
THROUGHPUT_MIB = ("big", "upload")  # read as MiB/s; the others as req/s


def _f(x: float | None, nd: int = 0) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _med(vals: list[Any]) -> float | None:
    nums = [float(v) for v in vals if v is not None]
    return statistics.median(nums) if nums else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def versions(bench: Any) -> dict[str, str]:
    cfg = bench.cfg

    def out(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=str(ROOT))
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (r.stdout + r.stderr).strip()
        return text.splitlines()[0] if text else "?"

    v = {"python": out([cfg.python, "-V"]), "wrk": out(["wrk", "-v"]).split(" [")[0]}
    v["uvicorn"] = out([cfg.python, "-c", "import uvicorn; print(uvicorn.__version__)"])
    if shutil.which("nginx"):
        v["nginx"] = out(["nginx", "-v"]).replace("nginx version: ", "")
    if cfg.golb_bin:
        v["go"] = out(["go", "version"]).replace("go version ", "")
    rev = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "lbapp"])
    v["lbapp"] = (
        (rev + (" +uncommitted changes" if dirty not in ("?", "") else ""))
        if re.fullmatch(r"[0-9a-f]{4,40}", rev)
        else "no commit"
    )
    return v


def aggregate(bench: Any) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, dict[str, Any]]]:
    cfg = bench.cfg
    kept = [r for r in bench.records if not r.get("discarded") and r.get("ok")]
    agg: dict[tuple[str, str], dict[str, Any]] = {}
    for t in cfg.targets:
        for s in [*cfg.scenarios, "idle-base"]:
            rs = [r for r in kept if r["target"] == t and r["scenario"] == s]
            if not rs:
                continue
            key = "mib_s" if s in THROUGHPUT_MIB else "rps"
            main = [r[key] for r in rs if r.get(key) is not None]
            agg[(t, s)] = {
                "n": len(rs),
                "rps": _med([r.get("rps") for r in rs]),
                "mib": _med([r.get("mib_s") for r in rs]),
                "main_min": min(main) if main else None,
                "main_max": max(main) if main else None,
                "p50": _med([r.get("p50_ms") for r in rs]),
                "p99": _med([r.get("p99_ms") for r in rs]),
                "lb_cpu": _med([r.get("lb_cpu_pct") for r in rs]),
                "lb_us": _med([r.get("lb_us_per_req") for r in rs]),
                "be_cpu": _med([r.get("be_cpu_pct") for r in rs]),
                "be_read": _med([r.get("be_read_mib_per_req") for r in rs]),
                "non2xx": sum(r.get("non2xx", 0) for r in rs),
                "sock": {
                    k: sum(r["sock_err"][k] for r in rs) for k in ("connect", "read", "write", "timeout")
                },
                "noise": max(r["other_cpu_pct"] for r in rs),
                "steal": max(r["steal_pct"] for r in rs),
                "disturbed": any(r.get("disturbed") for r in rs),
            }
    idle: dict[str, dict[str, Any]] = {}
    for t in cfg.targets:
        rows = [r for r in bench.idle if r["target"] == t and r.get("ok")]
        if not rows:
            continue
        ratios = [_div(r["p99"], r["base_p99"]) for r in rows]
        idle[t] = {
            "n": len(rows),
            "held_min": min(r["held"] for r in rows),
            "failed_max": max(r["failed"] for r in rows),
            "closed_max": max((r["closed_by_peer"] or 0) for r in rows),
            "rss_before": _med([r["rss_before"] / MIB for r in rows]),
            "rss_idle": _med([r["rss_idle"] / MIB for r in rows]),
            "rss_idle_max": max(r["rss_idle"] / MIB for r in rows),
            "setup_s": _med([r["setup_s"] for r in rows]),
            "base_rps": _med([r["base_rps"] for r in rows]),
            "rps": _med([r["rps"] for r in rows]),
            "base_p99": _med([r["base_p99"] for r in rows]),
            "p99": _med([r["p99"] for r in rows]),
            "ratio": _med(ratios),
            "ratio_max": max((x for x in ratios if x is not None), default=None),
            "lb_us": _med([r["lb_us"] for r in rows]),
            "disturbed": any(r["disturbed"] for r in rows),
            "noise": max(r["other"] for r in rows),
            "steal": max(r["steal"] for r in rows),
        }
    return agg, idle


def _errors(a: dict[str, Any]) -> str:
    s = a["sock"]
    n = sum(s.values())
    out = f"{a['non2xx']} / {n}"
    if n:
        out += f" (c{s['connect']}/r{s['read']}/w{s['write']}/t{s['timeout']})"
    return out


def scenario_table(bench: Any, agg: dict[tuple[str, str], dict[str, Any]], s: str) -> list[str]:
    cfg = bench.cfg
    mib = s in THROUGHPUT_MIB
    unit = "MiB/s" if mib else "req/s"
    key = "mib" if mib else "rps"
    golb, nginx, direct = agg.get(("golb", s)), agg.get(("nginx", s)), agg.get(("direct", s))
    head = f"| target | {unit} (min-max) | {'req/s' if mib else 'MiB/s'} | p50 ms | p99 ms | LB CPU % "
    head += "| LB CPU µs/req | x golb | x nginx | x direct | CPU: golb µs ÷ this | non-2xx / socket errors "
    head += (
        "| backends CPU % |"
        + (" backends read MiB/req |" if s == "upload" else "")
        + " other CPU % / steal % |"
    )
    lines = [head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for t in cfg.targets:
        a = agg.get((t, s))
        if a is None:
            why = next((v for (ft, _w), v in sorted(bench.failures.items()) if ft == t), "no data")
            lines.append(
                f"| {t} | **failed**: {why.replace('|', '/')[:160]} |" + " |" * (head.count("|") - 3)
            )
            continue
        main = _f(a[key], 1 if mib else 0)
        if a["n"] > 1:
            main += f" ({_f(a['main_min'], 0)}-{_f(a['main_max'], 0)})"
        other = _f(a["rps"]) if mib else _f(a["mib"], 1)
        ratios = [
            _r(_div(a[key], ref[key])) if ref and t != name else ("1.00" if ref else "-")
            for name, ref in (("golb", golb), ("nginx", nginx), ("direct", direct))
        ]
        cpu_vs = _r(_div(golb["lb_us"], a["lb_us"])) if golb and a["lb_us"] else "-"
        guard = f"{a['noise']:.0f} / {a['steal']:.0f}" + (" ⚠" if a["disturbed"] else "")
        row = (
            f"| {t} | {main} | {other} | {_f(a['p50'], 2)} | {_f(a['p99'], 2)} | {_f(a['lb_cpu'])} "
            f"| {_f(a['lb_us'])} | {' | '.join(ratios)} | {cpu_vs} | {_errors(a)} | {_f(a['be_cpu'])} |"
        )
        if s == "upload":
            row += f" {_f(a['be_read'], 2)} |"
        lines.append(row + f" {guard} |")
    return lines


def idle_table(bench: Any, idle: dict[str, dict[str, Any]]) -> list[str]:
    cfg = bench.cfg
    lines = [
        "| target | idle conns held (min) / failed | closed by the LB while held | LB RSS before MiB "
        "| LB RSS holding MiB (max) | set-up s | req/s without / with | p99 ms without | p99 ms with "
        "| p99 with ÷ without (max) | LB µs/req with | other CPU % / steal % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in cfg.targets:
        if not cfg.wants_idle(t):
            continue
        i = idle.get(t)
        if i is None:
            why = next((v for (ft, w), v in sorted(bench.failures.items()) if ft == t), "no data")
            lines.append(f"| {t} | **failed**: {why.replace('|', '/')[:160]} |" + " |" * 10)
            continue
        guard = f"{i['noise']:.0f} / {i['steal']:.0f}" + (" ⚠" if i["disturbed"] else "")
        lines.append(
            f"| {t} | {i['held_min']:,} / {i['failed_max']} | {i['closed_max']} | {_f(i['rss_before'])} "
            f"| {_f(i['rss_idle'])} ({_f(i['rss_idle_max'])}) | {_f(i['setup_s'], 1)} "
            f"| {_f(i['base_rps'])} / {_f(i['rps'])} | {_f(i['base_p99'], 2)} | {_f(i['p99'], 2)} "
            f"| {_r(i['ratio'])} ({_r(i['ratio_max'])}) | {_f(i['lb_us'])} | {guard} |"
        )
    return lines


def goals(
    agg: dict[tuple[str, str], dict[str, Any]], idle: dict[str, dict[str, Any]], idle_conns: int
) -> list[tuple[str, str, bool | None]]:
    """Issue 15's targets: (what, measured, passed or None when not measured)."""

    def g(t: str, s: str, k: str) -> float | None:
        a = agg.get((t, s))
        return a[k] if a else None

    out: list[tuple[str, str, bool | None]] = []

    def check(what: str, x: float | None, ok: bool | None, shown: str | None = None) -> None:
        out.append((what, shown if shown is not None else _r(x), None if x is None else ok))

    x = _div(g("lbapp", "small", "rps"), g("golb", "small", "rps"))
    check("small, req/s: lbapp ÷ golb >= 1.0 (checkpoint 0.7)", x, x is not None and x >= 1.0)
    x = _div(g("golb", "small", "lb_us"), g("lbapp", "small", "lb_us"))
    check("small, CPU µs/req: golb ÷ lbapp >= 1.0", x, x is not None and x >= 1.0)
    on, off = g("lbapp", "small", "rps"), g("lbapp-nolog", "small", "rps")
    x = None if on is None or not off else 1 - on / off
    check(
        "small: access log cost (1 - lbapp ÷ lbapp-nolog req/s) < 5%",
        x,
        x is not None and x < 0.05,
        None if x is None else f"{100 * x:.1f}%",
    )
    x = _div(g("lbapp", "big", "mib"), g("nginx", "big", "mib"))
    check("big (1 MiB GET), MiB/s: lbapp ÷ nginx >= 1.0", x, x is not None and x >= 1.0)
    x = _div(g("lbapp", "upload", "mib"), g("nginx", "upload", "mib"))
    check("upload (1 MiB POST), MiB/s: lbapp ÷ nginx >= 0.9", x, x is not None and x >= 0.9)
    p, q = g("lbapp", "small", "p99"), g("golb", "small", "p99")
    x = _div(p, q)
    check(
        "small, p99 at -c64: lbapp <= golb",
        x,
        x is not None and x <= 1.0,
        None if x is None else f"{_f(p, 2)} vs {_f(q, 2)} ms ({_r(x)}x)",
    )
    for ref in ("golb", "nginx"):
        x = _div(g("lbapp", "close", "rps"), g(ref, "close", "rps"))
        out.append((f"close (new connection per request), req/s: lbapp ÷ {ref} (reported)", _r(x), None))
    x = _div(g("lbapp-w2", "small", "rps"), g("lbapp", "small", "rps"))
    check(
        "small: lbapp-w2 ÷ lbapp req/s >= 1.8 (wrk and backends share core 1 with worker 2)",
        x,
        x is not None and x >= 1.8,
    )
    i = idle.get("lbapp")
    if i:
        ok = i["held_min"] >= idle_conns and i["rss_idle_max"] < 300 and (i["ratio_max"] or 99) <= 2.0
        shown = (
            f"held {i['held_min']:,}, RSS {_f(i['rss_idle_max'])} MiB, p99 {_f(i['base_p99'], 2)} -> "
            f"{_f(i['p99'], 2)} ms ({_r(i['ratio_max'])}x worst round)"
        )
        out.append((f"idle10k: {idle_conns:,} idle clients held, RSS < 300 MiB, p99 within 2x", shown, ok))
    else:
        out.append((f"idle10k: {idle_conns:,} idle clients held, RSS < 300 MiB, p99 within 2x", "-", None))
    return out


def report(bench: Any, started: str, elapsed: float) -> tuple[str, dict[str, Any]]:
    cfg = bench.cfg
    lines: list[str] = []
    w = lines.append
    cpu_model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    vers = versions(bench)
    agg, idle = aggregate(bench)
    w(f"# lbapp benchmark — {started}")
    w("")
    w(
        f"- machine: {os.cpu_count()} vCPU ({cpu_model}), kernel {platform.release()}; "
        f"run took {elapsed / 60:.1f} min"
    )
    w("- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    w(
        f"- load: `wrk -t{cfg.threads} -c{cfg.conns} -d{cfg.duration}s --latency "
        f"--timeout {cfg.wrk_timeout}`, {cfg.warmup} s warm-up per point, {cfg.rounds} interleaved "
        "round(s), target order rotated each round"
        + (" (median shown, min-max in brackets)" if cfg.rounds > 1 else "")
    )
    w(f"- backends: {cfg.backend} x3 on 127.0.0.1:{','.join(map(str, bench.backend_ports))}")
    w(
        "- targets: `direct` = wrk straight to backend 1; `nginx` = nginx 1 worker, keepalive 64; "
        "`golb` = Go `httputil.ReverseProxy` (bench/golb); `lbapp` = `lbapp --host 127.0.0.1 --port P` "
        "(default settings, access log on, to the target's log file); `lbapp-nolog` = same with "
        "`LB_ACCESS_LOG=false`; `lbapp-w2` = `lbapp --workers 2`"
    )
    lb_vars = sorted(
        k
        for k in os.environ
        if k.startswith("LB_")
        and k not in ("LB_CPUS", "LB2_CPUS", "LB_PORT", "LB_READY_TIMEOUT", "LB_BACKENDS", "LB_ACCESS_LOG")
    )
    if lb_vars:
        w("- LB_* set for lbapp: " + ", ".join(f"{k}={os.environ[k]}" for k in lb_vars))
    if (ROOT / "settings.env").exists():
        w("- note: `settings.env` exists in the project root; lbapp reads it (the environment wins)")
    w(
        f"- CPUs: single-worker LBs on {cfg.lb_cpus}; lbapp-w2 on {cfg.lb2_cpus} (its second worker shares "
        f"a core with wrk and the backends); wrk on {cfg.wrk_cpus}; backends on {cfg.backend_cpus}"
        + (
            " — only one CPU available: everything shares it, numbers are not comparable"
            if cfg.single_cpu
            else ""
        )
    )
    w("")
    titles = {
        "small": "small — `GET /`, 3-byte body",
        "big": f"big — `GET {bench.paths['big']}`, 1 MiB download",
        "upload": "upload — `POST /upload`, 1 MiB body (MiB/s uploaded = req/s x 1 MiB)",
        "close": "close — `GET /` with `Connection: close` (a new client connection per request)",
    }
    for s in cfg.scenarios:
        if s == "idle10k":
            w(
                f"## idle10k — {cfg.idle_conns:,} idle keep-alive clients held, "
                "small-body wrk on other connections"
            )
            w("")
            lines.extend(idle_table(bench, idle))
        else:
            w(f"## {titles[s]}")
            w("")
            lines.extend(scenario_table(bench, agg, s))
        w("")
    w("## Issue 15 targets")
    w("")
    w("| target | measured | status |")
    w("|---|---|---|")
    goal_rows = goals(agg, idle, cfg.idle_conns)
    for what, shown, ok in goal_rows:
        w(f"| {what} | {shown} | {'-' if ok is None else ('PASS' if ok else '**FAIL**')} |")
    w("")
    pairs = []
    for s in cfg.scenarios:
        if s == "idle10k":
            continue
        key = "mib" if s in THROUGHPUT_MIB else "rps"
        a, b = agg.get(("lbapp-w2", s)), agg.get(("lbapp", s))
        c = agg.get(("lbapp-nolog", s))
        pairs.append(
            f"| {s} | {_r(_div(a[key], b[key])) if a and b else '-'} "
            f"| {_r(_div(b[key], c[key])) if b and c else '-'} "
            f"| {_r(_div(b['lb_us'], c['lb_us'])) if b and c and c['lb_us'] else '-'} |"
        )
    if pairs:
        w(
            "| scenario | lbapp-w2 ÷ lbapp (throughput) | lbapp ÷ lbapp-nolog (throughput) "
            "| lbapp ÷ lbapp-nolog (CPU µs/req) |"
        )
        w("|---|---:|---:|---:|")
        lines.extend(pairs)
        w("")
    w(
        "x golb / x nginx / x direct = this row's median ÷ that target's median in the same scenario "
        "(throughput). CPU: golb µs ÷ this > 1 means cheaper per request than the Go proxy. LB CPU µs/req "
        "= CPU time of the LB's process group (all workers) ÷ requests: the load-independent cost. "
        "CPU % = 100 per core. Latencies are wrk's at saturation (closed loop): compare rows, not SLOs. "
        "other CPU % / steal % = CPU taken during the point by processes outside the benchmark / by the "
        f"hypervisor (max over rounds); ⚠ = over {cfg.other_max}% / {cfg.steal_max}% even after "
        f"{cfg.retries} re-measurement(s): unreliable. Upload: `backends read MiB/req` = bytes the "
        "backend nginx read per complete upload (its upload.log): the whole body crossed the LB."
    )
    w("")
    n_dist = sum(1 for a in agg.values() if a["disturbed"]) + sum(1 for i in idle.values() if i["disturbed"])
    if n_dist:
        w(
            f"**⚠ {n_dist} rows were measured while other processes or the hypervisor took CPU: "
            "their req/s and latencies are unreliable (LB CPU µs/req is the least affected column). "
            "Re-run on a quiet machine.**"
        )
        w("")
    for n in bench.notes:
        w(f"- note: {n}")
    if bench.notes:
        w("")
    if bench.failures:
        w("Failures:")
        w("")
        for (t, where), why in sorted(bench.failures.items()):
            w(f"- {t} (round {where}): {why}")
        w("")
    w("<details><summary>all measured points</summary>")
    w("")
    w(
        "| round | target | scenario | attempt | req/s | MiB/s | p50 ms | p99 ms | LB CPU % | LB µs/req "
        "| other CPU % | steal % | note |"
    )
    w("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in bench.records:
        note = (
            "discarded (disturbed)"
            if r.get("discarded")
            else ("kept, disturbed" if r.get("disturbed") else ("" if r.get("ok") else r.get("error", "")))
        )
        if r.get("disturbed") and r.get("other_top"):
            note += f": {r['other_top']}"
        w(
            f"| {r['round']} | {r['target']} | {r['scenario']} | {r['attempt']} | {_f(r.get('rps'))} "
            f"| {_f(r.get('mib_s'), 1)} | {_f(r.get('p50_ms'), 2)} | {_f(r.get('p99_ms'), 2)} "
            f"| {_f(r.get('lb_cpu_pct'))} | {_f(r.get('lb_us_per_req'))} | {_f(r.get('other_cpu_pct'))} "
            f"| {_f(r.get('steal_pct'))} | {note.replace('|', '/')} |"
        )
    w("")
    w("</details>")
    w("")
    w(f"Raw wrk output and every process's log: `{bench.run_dir}`")
    summary = {
        "scenarios": {f"{t}/{s}": a for (t, s), a in agg.items()},
        "idle": idle,
        "goals": [{"target": what, "measured": shown, "pass": ok} for what, shown, ok in goal_rows],
    }
    return "\n".join(lines) + "\n", summary
