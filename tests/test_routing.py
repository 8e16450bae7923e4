"""Path-based routing: longest prefix, segment boundaries, prefix stripping, pools of their own."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbapp import SettingsError, create_app
from lbapp.balancers import First, RoundRobin
from lbapp.cluster import Cluster, Clusters
from lbapp.pool import Pool
from lbapp.settings import BackendSpec, load_settings

from .conftest import EchoBackend, ThreadedServer, make_settings, run_lb, wait_until


def cluster(name: str, prefix: str = "/", strip_prefix: bool = False) -> Cluster:
    return Cluster(
        Pool([BackendSpec(url=f"http://{name}:80")], route=prefix), RoundRobin(), prefix, strip_prefix
    )


DEFAULT = cluster("default")
API = cluster("api", "/api")
API_V2 = cluster("api-v2", "/api/v2", strip_prefix=True)
STATIC = cluster("static", "/static/", strip_prefix=True)
CLUSTERS = Clusters(DEFAULT, [API, API_V2, STATIC])


@pytest.mark.parametrize(
    ("path", "expected", "target"),
    [
        (b"/api", API, b"/api"),
        (b"/api/", API, b"/api/"),
        (b"/api/users", API, b"/api/users"),
        (b"/apis", DEFAULT, b"/apis"),  # whole segments only
        (b"/api/v2", API_V2, b"/"),  # the longest prefix wins, whatever the table's order
        (b"/api/v2/users/%2F", API_V2, b"/users/%2F"),  # stripping keeps the raw bytes
        (b"/api/v20", API, b"/api/v20"),
        (b"/static/app.js", STATIC, b"/app.js"),
        (b"/static/", STATIC, b"/"),
        (b"/static", DEFAULT, b"/static"),  # a prefix ending in / matches only below it
        (b"/", DEFAULT, b"/"),
        (b"/%61pi", DEFAULT, b"/%61pi"),  # matched on the raw path, as forwarded
    ],
)
def test_longest_prefix_on_segment_boundaries(path: bytes, expected: Cluster, target: bytes) -> None:
    routed = CLUSTERS.route(path)
    assert routed is expected
    assert routed.target(path, path) == target


def test_the_default_pool_is_the_route_slash_and_cannot_be_configured_twice() -> None:
    assert [c.prefix for c in CLUSTERS] == ["/", "/api", "/api/v2", "/static/"]
    routes = [{"prefix": "/", "backends": ["http://a:1"]}]
    with pytest.raises(
        SettingsError, match=r"^invalid setting LB_ROUTES\[0\]\.prefix: '/' is the default pool"
    ):
        load_settings(backends=["http://b:1"], routes=routes)


def test_first_sees_standbys_other_policies_do_not() -> None:
    pool = Pool([BackendSpec(url="http://a:80"), BackendSpec(url="http://standby:80", weight=0)])
    assert [b.url for b in Cluster(pool, First()).candidates()] == ["http://a:80", "http://standby:80"]
    assert [b.url for b in Cluster(pool, RoundRobin()).candidates()] == ["http://a:80"]


def test_route_algorithm_errors_name_the_route() -> None:
    routes = [{"prefix": "/api", "backends": ["http://a:1"], "algorithm": "fastest"}]
    with pytest.raises(SettingsError, match=r"^invalid setting LB_ROUTES\[0\]\.algorithm: unknown algorithm"):
        load_settings(backends=["http://a:1"], routes=routes)


def test_each_sticky_route_has_its_own_cookie() -> None:
    routes = [{"prefix": "/api", "backends": ["http://a:1"], "algorithm": "sticky"}]
    app = create_app(make_settings(["http://b:1"], algorithm="sticky", routes=routes, sticky_secret="x" * 16))
    default_cookie = app.state.clusters.default.balancer.cookie
    route_cookie = app.state.clusters.routes[0].balancer.cookie
    assert default_cookie == "lbapp_sticky"
    assert route_cookie.startswith("lbapp_sticky-") and route_cookie != default_cookie


def test_routes_end_to_end(
    echo_factory: Callable[..., EchoBackend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = echo_factory("default")
    api = [echo_factory("api-1"), echo_factory("api-2")]
    static = echo_factory("static")
    config = {
        "backends": [default.url],
        "health_interval": 0.1,
        "unhealthy_threshold": 1,
        "routes": [
            {"prefix": "/api", "backends": [b.url for b in api], "algorithm": "round_robin"},
            {"prefix": "/static", "backends": [static.url], "strip_prefix": True},
        ],
    }
    path = tmp_path / "lb.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("LB_CONFIG", str(path))
    settings = load_settings(access_log=False, retry_delay=0)
    assert len(settings.routes) == 2
    app = create_app(settings)

    with ThreadedServer(app) as server:

        def get(target: str) -> dict[str, object]:
            response = httpx.get(server.url + target)
            assert response.status_code == 200, response.text
            document: dict[str, object] = response.json()
            return document

        assert [get("/api/users?id=1")["server"] for _ in range(4)] == ["api-1", "api-2"] * 2
        assert get("/api/users?id=1")["raw_path"] == "/api/users"
        seen = get("/static/css/site.css?v=3")
        assert (seen["server"], seen["raw_path"], seen["query"]) == ("static", "/css/site.css", "v=3")
        assert get("/static")["raw_path"] == "/"
        assert get("/apis")["server"] == "default"
        assert get("/")["server"] == "default"

        # A route's pool has health checks of its own: a dead API backend leaves that route only.
        api[0].kill()
        route_pool = app.state.clusters.routes[0].pool
        wait_until(lambda: len(route_pool.eligible) == 1)
        assert {get("/api/x")["server"] for _ in range(4)} == {"api-2"}
        assert get("/x")["server"] == "default"


def test_default_pool_only_without_routes(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url]) as server:
        assert [c.prefix for c in server.app.state.clusters] == ["/"]
        assert httpx.get(server.url + "/api/x").json()["server"] == "backend-1"


def test_route_pools_are_observed_and_administered_like_the_default_pool(
    echo_factory: Callable[..., EchoBackend],
) -> None:
    """Every backend of every route: metrics series, /lb-metrics, the status page, readiness, admin."""
    default = echo_factory("default")
    api = echo_factory("api")
    routes = [{"prefix": "/api", "backends": [api.url]}]
    with run_lb([default.url], routes=routes) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/api/x").json()["server"] == "api"
        samples = [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(client.get("/metrics").text)
            for s in family.samples
        ]

        def value(name: str, **labels: str) -> float | None:
            return next((v for n, got, v in samples if n == name and got == labels), None)

        for route, url in (("/", default.url), ("/api", api.url)):
            assert value("lb_backend_up", route=route, backend=url) == 1
            assert value("lb_backend_state", route=route, backend=url, state="healthy") == 1
            assert value("lb_backend_in_flight", route=route, backend=url) == 0
            assert value("lb_health_checks_total", route=route, backend=url, result="pass") is not None
        assert value("lb_backend_requests_total", route="/api", backend=api.url) == 1
        document = client.get("/lb-metrics").json()
        assert [b["url"] for b in document["backends"]] == [default.url]  # the schema's pool
        assert document["total_backends"] == 1
        (route,) = document["routes"]
        assert route["prefix"] == "/api" and [b["url"] for b in route["backends"]] == [api.url]
        assert route["backends"][0]["total_requests"] == 1
        status = client.get("/lb-status?format=json").json()
        assert [(b["route"], b["url"]) for b in status["backends"]] == [("/", default.url), ("/api", api.url)]
        assert client.get("/lb-ready").json()["healthy_backends"] == 2
        drained = client.post("/lb-admin/backends/drain", params={"url": api.url})
        assert drained.status_code == 200 and drained.json()["state"] == "draining"
        assert server.app.state.clusters.routes[0].pool.backends[0].state == "draining"
        assert client.get("/api/x").status_code == 503  # the route's only backend is draining
        assert client.get("/x").json()["server"] == "default"
