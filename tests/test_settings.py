"""Settings: defaults, the LB_* contract, the config file, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lbapp.settings import DEFAULT_BACKENDS, SettingsError, load_settings

from .conftest import ROOT


def test_defaults_serve_the_demo_stack() -> None:
    settings = load_settings()
    assert [b.url for b in settings.backends] == DEFAULT_BACKENDS.split(",")
    assert settings.algorithm == "round_robin"
    assert (settings.health_path, settings.health_interval, settings.health_timeout) == ("", 10, 3)
    assert settings.health_type == "tcp"  # no path configured: a TCP connect check
    assert (settings.healthy_threshold, settings.unhealthy_threshold) == (2, 2)
    assert (settings.max_retries, settings.retry_delay) == (2, 0.05)
    assert (settings.connect_timeout, settings.upstream_timeout) == (2, 10)


def test_backends_as_a_comma_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LB_BACKENDS", "http://10.0.0.1:80, https://b.example/")
    assert [(b.url, b.weight) for b in load_settings().backends] == [
        ("http://10.0.0.1:80", 1),
        ("https://b.example", 1),
    ]
    monkeypatch.setenv("LB_BACKENDS", '[{"url": "http://a:1", "weight": 3}, "http://b:2"]')
    assert [(b.url, b.weight) for b in load_settings().backends] == [("http://a:1", 3), ("http://b:2", 1)]


def test_durations_accept_numbers_and_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LB_HEALTH_INTERVAL", "250ms")
    monkeypatch.setenv("LB_UPSTREAM_TIMEOUT", "1m")
    monkeypatch.setenv("LB_RETRY_DELAY", "0")
    settings = load_settings()
    assert (settings.health_interval, settings.upstream_timeout, settings.retry_delay) == (0.25, 60, 0)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LB_BACKENDS", "ftp://x:1", "LB_BACKENDS[0].url"),
        ("LB_BACKENDS", "", "LB_BACKENDS"),
        ("LB_BACKENDS", "[{", "LB_BACKENDS"),
        ("LB_BACKENDS", '[{"url": "http://a", "weight": -1}]', "LB_BACKENDS[0].weight"),
        ("LB_HEALTH_INTERVAL", "-1", "LB_HEALTH_INTERVAL"),
        ("LB_HEALTH_TIMEOUT", "0", "LB_HEALTH_TIMEOUT"),
        ("LB_MAX_RETRIES", "lots", "LB_MAX_RETRIES"),
        ("LB_HEALTHY_THRESHOLD", "0", "LB_HEALTHY_THRESHOLD"),
        ("LB_TRUSTED_PROXIES", "10.0.0.0/8,nope", "LB_TRUSTED_PROXIES"),
        ("LB_HEALTH_PATH", "health", "LB_HEALTH_PATH"),
        ("LB_LOG_FORMAT", "xml", "LB_LOG_FORMAT"),
        ("LB_METRICS_PATH", "metrics", "LB_METRICS_PATH"),
        ("LB_STATUS_PATH", "/lb-health", "LB_STATUS_PATH"),
        ("LB_STATUS_PATH", "/metrics", "LB_STATUS_PATH"),
        ("LB_JSON_METRICS_PATH", "/x/{id}", "LB_JSON_METRICS_PATH"),
        ("LB_ADMIN_ALLOW", "127.0.0.1,everyone", "LB_ADMIN_ALLOW"),
        ("LB_METRICS_FLUSH_INTERVAL", "0", "LB_METRICS_FLUSH_INTERVAL"),
    ],
)
def test_bad_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert f"invalid setting {expected}:" in message
    assert "\n" not in message


def test_debug_takes_any_non_empty_value(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in (("1", True), ("yes", True), ("verbose", True), ("", False), ("0", False)):
        monkeypatch.setenv("LB_DEBUG", value)
        assert load_settings().debug is expected


def test_config_file_with_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "lb.json"
    config.write_text(
        json.dumps({"backends": ["http://a:1", "http://b:2"], "max_retries": 5, "algorithm": "x"})
    )
    monkeypatch.setenv("LB_CONFIG", str(config))
    monkeypatch.setenv("LB_ALGORITHM", "round_robin")
    settings = load_settings()
    assert [b.url for b in settings.backends] == ["http://a:1", "http://b:2"]
    assert settings.max_retries == 5
    assert settings.algorithm == "round_robin"


def test_config_file_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cases = {"missing.json": None, "bad.json": "{", "list.json": "[]", "typo.json": '{"max_retrys": 1}'}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        monkeypatch.setenv("LB_CONFIG", str(path))
        with pytest.raises(SettingsError, match=r"^LB_CONFIG: ") as error:
            load_settings()
        assert "\n" not in str(error.value)


def test_settings_env_file_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "settings.env").write_text("LB_BACKENDS=http://from-file:1\nLB_MAX_RETRIES=4\n")
    settings = load_settings()
    assert [b.url for b in settings.backends] == ["http://from-file:1"]
    assert settings.max_retries == 4


def test_uvicorn_start_up_stops_with_one_line_on_a_bad_setting(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "LB_HEALTH_INTERVAL": "soon", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "lbapp:app", "--port", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("lbapp:")]
    assert errors == [
        "lbapp: invalid setting LB_HEALTH_INTERVAL: expected a positive number of seconds, e.g. 2, 0.5, "
        "250ms, 1m (got 'soon')"
    ]


def test_unknown_algorithm_stops_start_up() -> None:
    with pytest.raises(SettingsError, match="LB_ALGORITHM: unknown algorithm 'fastest'"):
        load_settings(backends=["http://a:1"], algorithm="fastest")


def test_settings_env_example_lists_every_setting_with_its_default(tmp_path: Path) -> None:
    from lbapp.settings import Settings

    example = (Path(ROOT) / "settings.env.example").read_text()
    names = {line.lstrip("# ").split("=", 1)[0] for line in example.splitlines() if "=" in line}
    assert {f"LB_{field.upper()}" for field in Settings.model_fields} <= names
    (tmp_path / "settings.env").write_text(example)
    assert load_settings() == load_settings(_env_file=None)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LB_HASH_KEY", "header:", "LB_HASH_KEY"),
        ("LB_HASH_KEY", "query", "LB_HASH_KEY"),
        ("LB_HASH_KEY", "cookie:a b", "LB_HASH_KEY"),
        ("LB_STICKY_COOKIE", "a;b", "LB_STICKY_COOKIE"),
        ("LB_STICKY_SECRET", "hunter2", "LB_STICKY_SECRET"),
    ],
)
def test_bad_balancing_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=rf"^invalid setting {expected}: ") as error:
        load_settings()
    assert "\n" not in str(error.value)
    if name == "LB_STICKY_SECRET":
        assert value not in str(error.value)  # a secret is never echoed into a log


def test_hash_key_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in (
        ("ip", "ip"),
        (" PATH ", "path"),
        ("header:X-User", "header:x-user"),
        ("cookie:Session", "cookie:Session"),
    ):
        monkeypatch.setenv("LB_HASH_KEY", value)
        assert load_settings().hash_key == expected


def test_sticky_secret_is_optional_and_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().sticky_secret is None
    monkeypatch.setenv("LB_STICKY_SECRET", "")
    assert load_settings().sticky_secret is None
    monkeypatch.setenv("LB_STICKY_SECRET", "0123456789abcdef-secret")
    settings = load_settings()
    assert settings.sticky_secret is not None
    assert settings.sticky_secret.get_secret_value() == "0123456789abcdef-secret"
    assert "0123456789abcdef" not in repr(settings)


def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, document: object) -> None:
    path = tmp_path / "lb.json"
    path.write_text(json.dumps(document))
    monkeypatch.setenv("LB_CONFIG", str(path))


def test_routes_table_from_the_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    routes = [
        {"prefix": "/api", "backends": ["http://a:1", {"url": "http://b:2", "weight": 3}]},
        {"prefix": "/static/", "backends": ["http://c:3"], "algorithm": "first", "strip_prefix": True},
    ]
    write_config(tmp_path, monkeypatch, {"routes": routes})
    first, second = load_settings().routes
    assert first.prefix == "/api" and first.algorithm is None and first.strip_prefix is False
    assert [(b.url, b.weight) for b in first.backends] == [("http://a:1", 1), ("http://b:2", 3)]
    assert (second.prefix, second.algorithm, second.strip_prefix) == ("/static/", "first", True)


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ([{"prefix": "api", "backends": ["http://a:1"]}], "LB_ROUTES[0].prefix"),
        ([{"prefix": "/a?b", "backends": ["http://a:1"]}], "LB_ROUTES[0].prefix"),
        ([{"prefix": "/api", "backends": []}], "LB_ROUTES[0].backends"),
        ([{"prefix": "/api"}], "LB_ROUTES[0].backends"),
        ([{"prefix": "/api", "backends": ["ftp://a"]}], "LB_ROUTES[0].backends[0].url"),
        ([{"prefix": "/api", "backends": ["http://a:1"], "strip": True}], "LB_ROUTES[0].strip"),
        (
            [{"prefix": "/a", "backends": ["http://a:1"]}, {"prefix": "/a", "backends": ["http://b:1"]}],
            "LB_ROUTES",
        ),
        ({"prefix": "/api"}, "LB_ROUTES"),
    ],
)
def test_bad_routes_name_the_entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, routes: object, expected: str
) -> None:
    write_config(tmp_path, monkeypatch, {"routes": routes})
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert str(error.value).startswith(f"invalid setting {expected}: ")
    assert "\n" not in str(error.value)


def test_routes_are_refused_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LB_ROUTES", '[{"prefix": "/api", "backends": ["http://a:1"]}]')
    with pytest.raises(SettingsError, match=r"^invalid setting LB_ROUTES: set it in the LB_CONFIG file"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LB_HEALTH_EXPECTED_STATUS", "ok"),
        ("LB_HEALTH_EXPECTED_STATUS", "200-700"),
        ("LB_HEALTH_EXPECTED_STATUS", "399-200"),
        ("LB_HEALTH_METHOD", "GE T"),
        ("LB_HEALTH_TYPE", "udp"),
        ("LB_HEALTH_JITTER", "2"),
        ("LB_HEALTH_UNHEALTHY_INTERVAL", "soon"),
        ("LB_OUTLIER_CONSECUTIVE_FAILURES", "-1"),
        ("LB_OUTLIER_STATUSES", "5xx"),
        ("LB_OUTLIER_EJECTION_TIME", "0"),
        ("LB_OUTLIER_MAX_EJECTION_TIME", "1"),
        ("LB_OUTLIER_MAX_EJECTION_PERCENT", "150"),
        ("LB_BACKEND_MAX_CONNS", "many"),
        ("LB_QUEUE_SIZE", "-5"),
        ("LB_QUEUE_TIMEOUT", "0"),
        ("LB_SLOW_START", "slowly"),
        ("LB_PANIC_THRESHOLD", "101"),
        ("LB_RETRY_BUDGET", "lots"),
        ("LB_RETRY_BUDGET_MIN", "-1"),
        ("LB_ADMIN_WRITE_ALLOW", "localhost"),
    ],
)
def test_bad_health_values_name_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=rf"^invalid setting {name}: ") as error:
        load_settings()
    assert "\n" not in str(error.value)


def test_health_setting_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    from lbapp.config import parse_statuses

    monkeypatch.setenv("LB_RETRY_BUDGET", "25%")
    monkeypatch.setenv("LB_HEALTH_METHOD", "head")
    monkeypatch.setenv("LB_SLOW_START", "1m")
    monkeypatch.setenv("LB_ADMIN_WRITE_ALLOW", "")
    settings = load_settings()
    assert (settings.retry_budget, settings.health_method, settings.slow_start) == (25.0, "HEAD", 60.0)
    assert settings.admin_write_allow == []
    assert load_settings(_env_file=None).outlier_statuses == {502, 503, 504}  # parsed once, here
    assert parse_statuses("200-204, 304") == {200, 201, 202, 203, 204, 304}
    monkeypatch.delenv("LB_ADMIN_WRITE_ALLOW")
    assert load_settings().admin_write_allow == ["127.0.0.1/32", "::1/128"]


def test_websocket_settings_parse_sizes_and_durations() -> None:
    settings = load_settings()
    assert (settings.websocket_max_message, settings.websocket_idle_timeout) == (16 * 1024 * 1024, 0.0)
    assert settings.websocket_ping_interval == 20.0
    parsed = load_settings(
        websocket_max_message="64KiB", websocket_idle_timeout="2m", websocket_ping_interval="0"
    )
    assert (parsed.websocket_max_message, parsed.websocket_idle_timeout) == (65536, 120.0)
    assert parsed.websocket_ping_interval == 0.0
    assert load_settings(websocket_max_message="1048576").websocket_max_message == 1048576


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LB_WEBSOCKET_MAX_MESSAGE", "lots"),
        ("LB_WEBSOCKET_MAX_MESSAGE", "0"),
        ("LB_WEBSOCKET_MAX_MESSAGE", "16GiB"),
        ("LB_WEBSOCKET_IDLE_TIMEOUT", "-1"),
        ("LB_WEBSOCKET_PING_INTERVAL", "often"),
    ],
)
def test_bad_websocket_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=rf"^invalid setting {name}: ") as error:
        load_settings()
    assert "\n" not in str(error.value)
