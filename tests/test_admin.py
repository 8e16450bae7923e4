"""The admin guard end to end: CSRF refusals, the bearer token, JSON bodies, the read allow-list."""

from __future__ import annotations

import httpx
import pytest

from lbapp.settings import load_settings

from .conftest import EchoBackend, run_lb

TOKEN = "s3cret-admin-token-0123456789"


def drain(server_url: str, url: str, **kwargs: object) -> httpx.Response:
    return httpx.post(server_url + "/lb-admin/backends/drain", params={"url": url}, **kwargs)  # type: ignore[arg-type]


def undrain(server_url: str, url: str) -> httpx.Response:
    return httpx.post(server_url + "/lb-admin/backends/undrain", params={"url": url})


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
    ids=["origin", "origin-null", "fetch-cross-site", "fetch-same-site"],
)
def test_browser_writes_are_refused(echo_backends: list[EchoBackend], headers: dict[str, str]) -> None:
    backend = echo_backends[0]
    with run_lb([backend.url]) as server:
        response = drain(server.url, backend.url, headers=headers)
        assert response.status_code == 403
        assert "cross-origin" in response.json()["error"]
        state = server.app.state.clusters.default.pool.backends[0].state
        assert state == "healthy"  # nothing changed
        # The same request without the browser's headers goes through.
        assert drain(server.url, backend.url).json()["state"] == "draining"


def test_a_body_must_be_json(echo_backends: list[EchoBackend]) -> None:
    backend = echo_backends[0]
    with run_lb([backend.url]) as server:
        # A text/plain body is what an HTML form or a "simple" fetch can send without preflight.
        response = drain(server.url, backend.url, content=b"x", headers={"Content-Type": "text/plain"})
        assert response.status_code == 415
        response = drain(server.url, backend.url, content=b"{}")  # no Content-Type at all
        assert response.status_code == 415
        assert server.app.state.clusters.default.pool.backends[0].state == "healthy"
        ok = drain(
            server.url,
            backend.url,
            content=b"{}",
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        assert ok.status_code == 200


def test_token_missing_or_wrong_is_401_right_is_200(echo_backends: list[EchoBackend]) -> None:
    backend = echo_backends[0]
    with run_lb([backend.url], admin_token=TOKEN) as server:
        missing = drain(server.url, backend.url)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'Bearer realm="lbapp-admin"'
        for auth in ("Bearer wrong-token-0123456789", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"):
            wrong = drain(server.url, backend.url, headers={"Authorization": auth})
            assert wrong.status_code == 401, auth
            assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
            assert TOKEN not in wrong.text
        assert server.app.state.clusters.default.pool.backends[0].state == "healthy"
        right = drain(server.url, backend.url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200
        assert right.json()["state"] == "draining"
        # The token does not excuse a cross-origin request.
        crossed = httpx.post(
            server.url + "/lb-admin/backends/undrain",
            params={"url": backend.url},
            headers={"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"},
        )
        assert crossed.status_code == 403
        # Reads do not need the token (they have their own allow-list).
        assert httpx.get(server.url + "/lb-metrics").status_code == 200


def test_write_allow_list_comes_before_the_token(echo_backends: list[EchoBackend]) -> None:
    backend = echo_backends[0]
    with run_lb([backend.url], admin_token=TOKEN, admin_write_allow=["10.0.0.0/8"]) as server:
        response = drain(server.url, backend.url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 403


def test_read_endpoints_refuse_a_peer_outside_the_allow_list(echo_backends: list[EchoBackend]) -> None:
    backend = echo_backends[0]
    with run_lb([backend.url]) as server:  # the default: loopback and private networks
        for path in ("/metrics", "/lb-metrics", "/lb-status"):
            assert httpx.get(server.url + path).status_code == 200, path
    with run_lb([backend.url], admin_allow=["192.168.0.0/16", "fc00::/7"]) as server:
        for path in ("/metrics", "/lb-metrics", "/lb-status", "/lb-status?format=json"):
            response = httpx.get(server.url + path)
            assert response.status_code == 403, path
            assert backend.url not in response.text
        assert httpx.get(server.url + "/lb-health").status_code == 200


def test_admin_settings_defaults_and_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert "10.0.0.0/8" in settings.admin_allow and "172.16.0.0/12" in settings.admin_allow
    assert settings.admin_write_allow == ["127.0.0.1/32", "::1/128"]
    assert settings.admin_token is None
    monkeypatch.setenv("LB_ADMIN_ALLOW", "*")
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    settings = load_settings()
    assert settings.admin_allow == ["0.0.0.0/0", "::/0"]
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())


def test_a_bad_token_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from lbapp.settings import SettingsError

    monkeypatch.setenv("LB_ADMIN_TOKEN", "short-secret")
    with pytest.raises(SettingsError, match=r"^invalid setting LB_ADMIN_TOKEN: must be at least 16") as error:
        load_settings()
    assert "short-secret" not in str(error.value)
