"""The deployment: docker-compose.yml, Dockerfile, deploy/ and the Grafana dashboard.

No Docker engine runs here, so the stack is proved piece by piece: Debian's `docker-compose config`
validates the compose file; the stack itself is reproduced without Docker (three echo backends,
the launcher `python -m lbapp` configured from deploy/lbapp.env, and a real Prometheus on the project's
deploy/prometheus/prometheus.yml with the target rewritten); every PromQL expression of the
dashboard is evaluated by that Prometheus; every metric the dashboard names is checked against
lbapp's real /metrics output.

Tests that need `docker-compose` or `prometheus` skip when the binary is missing, except under CI
(the `CI` variable set), where .ci/run installs both and a missing binary fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lbapp.settings import Settings, load_settings

from .conftest import ROOT, EchoBackend, LauncherProcess

ROOT_DIR = Path(ROOT)
COMPOSE_FILE = ROOT_DIR / "docker-compose.yml"
LB_ENV_FILE = ROOT_DIR / "deploy" / "lbapp.env"
SETTINGS_EXAMPLE = ROOT_DIR / "settings.env.example"
PROMETHEUS_CONFIG = ROOT_DIR / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = ROOT_DIR / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "lbapp.json"
DOCKERFILE = ROOT_DIR / "Dockerfile"

ECHO_SERVICES = ("echo",)  # one service, scaled: lbapp finds its replicas through DNS
# Series Prometheus makes itself for every target: not lbapp's to export.
PROMETHEUS_SERIES = frozenset({"up"})
# Grafana's interval variables, as the dashboard's expressions are sent to Prometheus here.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s"}


def require_binary(name: str, package: str) -> str:
    """The binary's path; skip without it, except under CI, which installs it (.ci/run)."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing under CI: .ci/run should have installed Debian's {package}")
    pytest.skip(f"{name} is not installed (Debian package {package}; CI installs it)")


def poll(check: Callable[[], tuple[bool, Any]], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Call `check` until it reports success, or fail after `timeout` s with the last thing it saw."""
    deadline = time.monotonic() + timeout
    while True:
        ok, seen = check()
        if ok:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s; last seen: {seen!r}")
        time.sleep(interval)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of an env file (comments and blank lines skipped), as docker-compose reads it."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


# --- PromQL: the dashboard's expressions and the metric names in them ---------------------------

_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left"}
    | {"group_right", "inf", "nan", "start", "end"}
)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, labels or keywords."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if text[match.end() :].lstrip().startswith("(") or name.lower() in _KEYWORDS:
            continue  # a function or aggregation, or an operator keyword
        names.add(name)
    return names


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as file:
        document: dict[str, Any] = json.load(file)
    return document


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # collapsed rows hold their panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(load_dashboard()["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def for_prometheus(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def exported_names(exposition: str) -> set[str]:
    """Series names lbapp's /metrics exports, including those of families with no sample yet."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["", "_sum", "_count"],
            "info": ["_info"],
        }.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


# --- the compose file -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """`docker-compose config`: validates the file and returns it resolved (env_file merged in)."""
    binary = require_binary("docker-compose", "docker-compose")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "config"],
        cwd=ROOT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_compose_config_validates_and_names_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"lb", *ECHO_SERVICES, "prometheus", "grafana"} <= set(services)
    assert services["lb"]["ports"][0]["published"] in (8080, "8080")
    assert services["prometheus"]["ports"][0]["published"] in (9090, "9090")
    assert services["grafana"]["ports"][0]["published"] in (3000, "3000")
    for name in ECHO_SERVICES:
        assert "ports" not in services[name], f"{name}'s port should stay inside the compose network"
    # Start order by health: echo backends -> lb -> prometheus -> grafana.
    depends = {name: services[name].get("depends_on", {}) for name in services}
    assert {name: depends["lb"][name]["condition"] for name in ECHO_SERVICES} == dict.fromkeys(
        ECHO_SERVICES, "service_healthy"
    )
    assert depends["prometheus"]["lb"]["condition"] == "service_healthy"
    assert depends["grafana"]["prometheus"]["condition"] == "service_healthy"
    for name in ("lb", *ECHO_SERVICES, "prometheus", "grafana"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    # lbapp's graceful shutdown (LB_GRACEFUL_TIMEOUT, 30 s) must end before Docker's SIGKILL.
    assert services["lb"]["stop_grace_period"] == "35s"
    assert float(services["lb"]["environment"]["LB_GRACEFUL_TIMEOUT"]) < 35
    # The echo backends serve /health, and the stack checks it explicitly (not the default check).
    assert services["lb"]["environment"]["LB_HEALTH_PATH"] == "/health"


def test_compose_lb_settings_are_lbapp_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    environment = services["lb"]["environment"]
    fields = set(Settings.model_fields)
    for key in environment:
        assert key.startswith("LB_") and key[3:].lower() in fields, f"{key} is not a setting of lbapp"
    # The values are valid too: lbapp reads them from the environment as the container would.
    for key, value in environment.items():
        monkeypatch.setenv(key, "" if value is None else str(value))
    settings = load_settings()
    # LB_BACKENDS discovers the echo service's replicas by DNS, on the port its command listens on.
    backends = {(urlsplit(b.url).hostname, urlsplit(b.url).port, b.discovery) for b in settings.backends}
    echo = services["echo"]
    command = echo["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command[:2] == ["sh", "-c"], command
    words = shlex.split(command[2])
    assert words[:4] == ["exec", "python", "-m", "lbapp.echo"], words
    options = dict(zip(words[4::2], words[5::2], strict=True))
    assert options["--host"] == "0.0.0.0", "echo must listen beyond its loopback"
    port = int(options["--port"])
    assert [str(port)] == [str(p) for p in echo["expose"]]
    assert f":{port}/health" in " ".join(echo["healthcheck"]["test"])
    assert int(echo["scale"]) >= 2
    assert backends == {("echo", port, "dns")}


def test_lb_env_file_mirrors_settings_example() -> None:
    """deploy/lbapp.env has exactly the settings of settings.env.example, all of them lbapp's; only
    the backends and the health path (the echo backends have /health) are the stack's own."""
    example, deployed = read_env_file(SETTINGS_EXAMPLE), read_env_file(LB_ENV_FILE)
    assert set(deployed) == set(example)
    own = {"LB_BACKENDS", "LB_HEALTH_PATH"}
    assert deployed["LB_HEALTH_PATH"] == "/health"
    assert {key: value for key, value in deployed.items() if key not in own} == {
        key: value for key, value in example.items() if key not in own
    }
    assert {f"LB_{name.upper()}" for name in Settings.model_fields} >= set(deployed)


def test_prometheus_and_grafana_files_fit_the_compose_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))["scrape_configs"]
    (job,) = [job for job in scrape if job["job_name"] == "lbapp"]
    assert job["static_configs"][0]["targets"] == ["lb:8080"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "5s"
    assert services["lb"]["ports"][0]["target"] in (8080, "8080")

    def mounts(service: str) -> dict[str, str]:
        """Container path -> host path of a service's bind mounts."""
        result = {}
        for volume in services[service]["volumes"]:
            source, target = volume.split(":")[:2]
            result[target] = source
        return result

    assert Path(mounts("prometheus")["/etc/prometheus/prometheus.yml"]) == PROMETHEUS_CONFIG
    grafana = mounts("grafana")
    assert Path(grafana["/etc/grafana/provisioning"]) == GRAFANA_DIR / "provisioning"
    dashboards_dir = next(target for target, source in grafana.items() if Path(source) == DASHBOARD.parent)
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/lbapp.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == dashboards_dir
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    env = services["grafana"]["environment"]
    assert (env["GF_AUTH_ANONYMOUS_ENABLED"], env["GF_AUTH_ANONYMOUS_ORG_ROLE"]) == ("true", "Viewer")
    # The dashboard's datasource is the provisioned one, which is the compose stack's Prometheus.
    (source,) = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    uids = {
        target.get("datasource", panel.get("datasource", {})).get("uid")
        for panel in all_panels(load_dashboard()["panels"])
        for target in panel.get("targets", [])
    }
    assert uids == {source["uid"]}


# --- the image ------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in joined.splitlines()
        if line.strip()
    ]


def test_dockerfile_runs_the_launcher() -> None:
    instructions = dockerfile_instructions()
    first = dict(reversed(instructions))  # first occurrence of each instruction
    last = dict(instructions)
    assert first["FROM"] == "python:3.11-slim"
    assert last["USER"] not in ("root", "0")
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert any(kind == "RUN" and "pip install ." in args for kind, args in instructions)
    # The launcher (uvicorn's production flags, the hardened protocol), on the port it EXPOSEs,
    # beyond its loopback; exec form, so it is PID 1 and gets SIGTERM itself.
    assert json.loads(last["CMD"]) == ["lbapp", "--host", "0.0.0.0", "--port", last["EXPOSE"]]
    assert last["EXPOSE"] == "8080"
    # The HEALTHCHECK is the liveness endpoint, which does not flap when the backends are down.
    assert "http://127.0.0.1:8080/lb-ready" in last["HEALTHCHECK"]


# --- the stack without Docker ---------------------------------------------------------------------


@dataclass
class Stack:
    backends: list[EchoBackend]
    lb: LauncherProcess
    exposition: str = ""
    prometheus_url: str = ""
    rates: dict[str, float] | None = None  # per backend, once Prometheus has seen traffic

    def traffic(self) -> None:
        """A few requests through lbapp: every backend answers, one answer is a 5xx."""
        with httpx.Client(base_url=self.lb.url, timeout=5) as client:
            for i in range(3 * len(self.backends)):
                assert client.get(f"/deploy/{i}").status_code == 200
            assert client.post("/deploy/post", content=b"x" * 100).status_code == 200
            assert client.get("/status/500").status_code == 500


@pytest.fixture(scope="module")
def lbapp_stack() -> Iterator[Stack]:
    """Three echo backends and `python -m lbapp` configured from deploy/lbapp.env, after traffic
    and a health-check round; `exposition` is lbapp's /metrics then."""
    backends = [EchoBackend(f"backend-{i}") for i in (1, 2, 3)]
    lb: LauncherProcess | None = None
    try:
        for backend in backends:
            backend.start()
        env = read_env_file(LB_ENV_FILE)
        env["LB_BACKENDS"] = ",".join(b.url for b in backends)  # the stack's echo replicas, here
        env["LB_HEALTH_INTERVAL"] = "0.2"  # health rounds within the test's time
        env["LB_ACCESS_LOG"] = "false"
        env["LB_HEALTH_PATH"] = "/health"  # as docker-compose.yml's environment sets it
        env["LB_GRACEFUL_TIMEOUT"] = "5"
        lb = LauncherProcess(env)  # what the image runs
        stack = Stack(backends, lb)
        stack.traffic()

        def health_round_done() -> tuple[bool, Any]:
            document = httpx.get(lb.url + "/lb-metrics", timeout=5).json()
            checked = [b["last_checked"] for b in document["backends"]]
            return all(checked), checked

        poll(health_round_done, 15, "a health-check round over every backend")
        assert httpx.get(lb.url + "/lb-ready", timeout=5).status_code == 200
        stack.exposition = httpx.get(lb.url + "/metrics", timeout=5).text
        yield stack
    finally:
        if lb is not None:
            lb.stop()
        for backend in backends:
            backend.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def stack(lbapp_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real Prometheus on deploy/prometheus/prometheus.yml, target rewritten to the local lbapp,
    scraping every second, until it has seen traffic on every backend."""
    binary = require_binary("prometheus", "prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "lbapp"]
    assert job["static_configs"][0]["targets"] == ["lb:8080"], "the file no longer targets lb:8080"
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{lbapp_stack.lb.port}"]
    job["scrape_interval"] = "1s"
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as output:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> tuple[bool, Any]:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text()}")
            try:
                return httpx.get(url + "/-/ready", timeout=1).status_code == 200, "not ready"
            except httpx.HTTPError as exc:
                return False, repr(exc)

        poll(ready, 60, "prometheus ready")
        lbapp_stack.prometheus_url = url
        yield lbapp_stack
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def query(stack: Stack, expr: str) -> dict[str, Any]:
    answer = httpx.get(stack.prometheus_url + "/api/v1/query", params={"query": expr}, timeout=10)
    result: dict[str, Any] = answer.json()
    return result


def per_backend_rates(stack: Stack) -> dict[str, float]:
    """Non-zero request rates per backend label, as Prometheus sees them after some traffic."""
    expr = "sum by (backend) (rate(lb_requests_total[30s])) > 0"

    def check() -> tuple[bool, Any]:
        stack.traffic()  # keep the counters moving between scrapes
        up = query(stack, 'up{job="lbapp"}')["data"]["result"]
        rates = {
            r["metric"].get("backend", ""): float(r["value"][1]) for r in query(stack, expr)["data"]["result"]
        }
        seen = {"up": [r["value"][1] for r in up], "rates": rates}
        return [r["value"][1] for r in up] == ["1"] and len(rates) >= len(stack.backends), seen

    if stack.rates is None:
        stack.rates = poll(check, 60, "up == 1 and traffic on every backend")["rates"]
    return stack.rates


def test_prometheus_scrapes_lbapp_with_traffic_on_every_backend(stack: Stack) -> None:
    rates = per_backend_rates(stack)
    assert len(rates) == len(stack.backends) and all(rate > 0 for rate in rates.values()), rates


def test_every_dashboard_query_parses(stack: Stack) -> None:
    """Prometheus parses every expression of the dashboard (whether or not its metrics exist yet)."""
    for title, expr in dashboard_queries():
        answer = query(stack, for_prometheus(expr))
        assert answer["status"] == "success", f"{title}: {expr!r} does not parse: {answer.get('error')}"


@pytest.mark.parametrize(
    ("title", "expr"),
    [pytest.param(title, expr, id=f"{title}:{expr[:50]}") for title, expr in dashboard_queries()],
)
def test_dashboard_query_parses_and_returns_data(stack: Stack, title: str, expr: str) -> None:
    per_backend_rates(stack)  # the stack has scraped traffic (quick once it has)
    sent = for_prometheus(expr)
    exported = exported_names(stack.exposition) | PROMETHEUS_SERIES
    answer = query(stack, sent)
    assert answer["status"] == "success", f"{title}: {sent!r} does not parse: {answer.get('error')}"
    if metric_names(expr) <= exported:
        # Every series it reads exists: wait for Prometheus to hold enough samples of them.
        def has_data() -> tuple[bool, Any]:
            latest = query(stack, sent)
            return bool(latest["data"]["result"]), latest

        answer = poll(has_data, 10, f"{title}: data for {sent!r}")
    assert answer["data"]["result"], f"{title}: {sent!r} returned no data"


# --- the dashboard --------------------------------------------------------------------------------


def test_dashboard_json_is_valid() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "lbapp" and dashboard["title"]
    panels = list(all_panels(dashboard["panels"]))
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids must be unique"
    queries = dashboard_queries()
    assert queries and all(metric_names(expr) for _, expr in queries), "a query reads no metric"
    titles = " ".join(title.lower() for title, _ in queries)
    for topic in ("per backend", "5xx", "p50", "p99", "in flight", "up/down", "retries", "ejections"):
        assert topic in titles, f"the dashboard has no panel on {topic}"
    assert "rate-limited" in titles
    # The name extraction the other tests rely on.
    assert metric_names(
        '(sum by (backend) (rate(lb_requests_total{code=~"5.*"}[$__rate_interval])) '
        "or on() vector(0)) / sum(lb_backend_up offset 1m) > 0.5e3"
    ) == {"lb_requests_total", "lb_backend_up"}
    # A status-class label ("5xx") must be matched as such: "5.." would miss it.
    for _, expr in queries:
        assert '"5.."' not in expr, expr


DASHBOARD_METRICS = sorted(set().union(*(metric_names(expr) for _, expr in dashboard_queries())))


@pytest.mark.parametrize("name", sorted(DASHBOARD_METRICS))
def test_dashboard_metric_is_exported_by_lbapp(lbapp_stack: Stack, name: str) -> None:
    """lbapp's real /metrics (after traffic and a health round) has every metric the dashboard reads."""
    exported = exported_names(lbapp_stack.exposition) | PROMETHEUS_SERIES
    assert name in exported, f"the dashboard reads {name}, which lbapp does not export"


def test_make_demo_runs_the_launcher_checking_health() -> None:
    """`make demo` serves through the launcher and checks the echo backends' /health explicitly."""
    makefile = (ROOT_DIR / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe is not None
    launch = r"LB_HEALTH_PATH=/health \$\(BIN\)/lbapp --host 127\.0\.0\.1 --port 8080"
    assert re.search(launch, recipe.group(1)), recipe.group(1)
    assert "uvicorn" not in recipe.group(1)
