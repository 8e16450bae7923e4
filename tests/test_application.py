"""The app as a whole: lifespan, own endpoints, and errors that never escape as tracebacks."""

from __future__ import annotations

from typing import Any

import httpx

from lbapp import create_app

from .conftest import EchoBackend, ThreadedServer, make_settings, mark_down


class ExplodingBalancer:
    def pick(self, backends: Any, request: Any) -> Any:
        raise RuntimeError("bug in a policy")


def test_a_crash_in_a_handler_is_a_500_and_the_process_lives_on(echo_backends: list[EchoBackend]) -> None:
    app = create_app(make_settings([echo_backends[0].url]))
    cluster = app.state.clusters.default
    good = cluster.balancer
    with ThreadedServer(app) as server:
        cluster.balancer = ExplodingBalancer()
        response = httpx.get(server.url + "/x")
        assert response.status_code == 500
        assert "Traceback" not in response.text and "bug in a policy" not in response.text
        cluster.balancer = good
        assert httpx.get(server.url + "/x").status_code == 200


def test_lifespan_creates_and_closes_the_shared_client(echo_backends: list[EchoBackend]) -> None:
    app = create_app(make_settings([echo_backends[0].url]))
    proxy = app.state.proxy
    with ThreadedServer(app) as server:
        client = proxy.upstream.client
        assert client is not None and not client.is_closed
        assert httpx.get(server.url + "/").status_code == 200
    assert client.is_closed
    assert app.state.health.client.is_closed


def test_metrics_is_a_plain_route_without_redirect(echo_backends: list[EchoBackend]) -> None:
    app = create_app(make_settings([echo_backends[0].url]))
    with ThreadedServer(app) as server:
        response = httpx.get(server.url + "/metrics", follow_redirects=False)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")


async def test_readiness_follows_the_lifespan_not_the_backends() -> None:
    app = create_app(make_settings(["http://127.0.0.1:9"]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://lb.test") as client:
        assert (await client.get("/lb-ready")).status_code == 503  # not started yet
        async with app.router.lifespan_context(app):
            pool = app.state.clusters.default.pool
            mark_down(pool, pool.backends[0])
            response = await client.get("/lb-ready")
            assert response.status_code == 200
            assert response.json() == {"ready": True, "healthy_backends": 0}
            assert (await client.get("/lb-health")).status_code == 200
        assert (await client.get("/lb-ready")).status_code == 503  # shut down
