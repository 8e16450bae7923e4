"""DNS discovery end to end: real echo backends on 127.0.0.1-3, one port, a resolver the test sets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lbapp import create_app, load_settings
from lbapp.discovery import member_url, system_resolver

from .conftest import EchoBackend, ThreadedServer, listening_socket, make_settings, wait_until
from .test_reload import write_config
from .test_runtime import SlowReader, listing, servers, state_of

NAME = "echo.test"


class Records:
    """What the test's DNS answers: a name -> its addresses, or an outage."""

    def __init__(self) -> None:
        self.addresses: dict[str, list[str]] = {}
        self.down = False
        self.lookups = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if self.down or host not in self.addresses:
            raise OSError(f"cannot resolve {host}")
        return list(self.addresses[host])


@pytest.fixture
def trio() -> Iterator[list[EchoBackend]]:
    """Echo backends e1..e3 on 127.0.0.1..3, all on the same port (as one service's replicas)."""
    port = listening_socket().getsockname()[1]  # free on 127.0.0.1; the others are nearly always free too
    backends: list[EchoBackend] = []
    try:
        for i in (1, 2, 3):
            backends.append(EchoBackend(f"e{i}", host=f"127.0.0.{i}", port=port))
        for backend in backends:
            backend.start()
        yield backends
    finally:
        for backend in backends:
            backend.stop()


def test_dns_name_expands_follows_records_and_drains(trio: list[EchoBackend]) -> None:
    port = trio[0].port
    records = Records()
    records.addresses[NAME] = ["127.0.0.1", "127.0.0.2"]
    settings = make_settings(
        [{"url": f"http://{NAME}:{port}", "discovery": "dns"}],
        dns_interval=0.05,
        algorithm="first",
        preserve_host=False,
    )
    app = create_app(settings)
    app.state.discovery.resolver = records.resolve
    with ThreadedServer(app) as server:
        e1, e2, e3 = (b.url for b in trio)
        wait_until(lambda: {state_of(server.url, u) for u in (e1, e2)} == {"healthy"})
        assert [b["url"] for b in listing(server.url)] == [e1, e2]
        answer = httpx.get(server.url + "/x").json()
        assert answer["server"] == "e1"
        assert answer["headers"]["host"] == f"{NAME}:{port}"  # the name, not the address

        reader = SlowReader(server.url)  # `first`: a long stream to e1
        assert reader.started.wait(15)
        records.addresses[NAME] = ["127.0.0.2", "127.0.0.3"]
        wait_until(lambda: state_of(server.url, e3) == "healthy")
        assert state_of(server.url, e1) == "draining"  # vanished, its stream still running
        assert servers(server.url, 3) == {"e2": 3}
        reader.finish()  # completes intact
        wait_until(lambda: state_of(server.url, e1) is None)

        # A DNS outage keeps the last known addresses.
        records.down = True
        lookups = records.lookups
        wait_until(lambda: records.lookups >= lookups + 3)
        assert sorted(b["url"] for b in listing(server.url)) == [e2, e3]
        assert servers(server.url, 2) == {"e2": 2}


async def test_the_system_resolver_answers_without_blocking() -> None:
    assert "127.0.0.1" in await system_resolver("localhost", 80)
    with pytest.raises(OSError):
        await system_resolver("no-such-name.invalid", 80)


def test_member_urls() -> None:
    assert member_url("http://echo:8000/base", "10.0.0.7") == "http://10.0.0.7:8000/base"
    assert member_url("http://echo", "fd00::7") == "http://[fd00::7]"


def test_a_reload_keeps_discovered_backends(
    trio: list[EchoBackend], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = trio[0].port
    records = Records()
    records.addresses[NAME] = ["127.0.0.1"]
    config = tmp_path / "lbapp.json"
    name = {"url": f"http://{NAME}:{port}", "discovery": "dns"}
    write_config(config, {"backends": [name], "dns_interval": 0.05})
    for key, value in {"CONFIG": str(config), "CONFIG_WATCH": "1", "HEALTH_INTERVAL": "60"}.items():
        monkeypatch.setenv(f"LB_{key}", value)
    app = create_app(load_settings())
    app.state.discovery.resolver = records.resolve
    with ThreadedServer(app) as server:
        wait_until(lambda: state_of(server.url, trio[0].url) == "healthy")
        discovered = app.state.clusters.default.pool.backends[0]
        write_config(config, {"backends": [name, trio[2].url], "dns_interval": 0.05})
        wait_until(lambda: state_of(server.url, trio[2].url) == "healthy")
        assert app.state.clusters.default.pool.backends[0] is discovered  # kept, not re-added
        assert discovered.state == "healthy"
        records.addresses[NAME] = ["127.0.0.1", "127.0.0.2"]  # the name still followed
        wait_until(lambda: state_of(server.url, trio[1].url) == "healthy")
        write_config(config, {"backends": [trio[2].url]})  # the name leaves the configuration
        wait_until(lambda: [b["url"] for b in listing(server.url)] == [trio[2].url])
