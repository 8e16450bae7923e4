"""The shared layout file: who takes it, who publishes, what a later worker starts from."""

from __future__ import annotations

import json
from pathlib import Path

from lbapp.layout import Layout, Member, RouteLayout, SharedLayout, digest, from_settings

from .conftest import make_settings


def one(url: str, weight: int = 1) -> Layout:
    return [RouteLayout("/", "round_robin", False, (Member(url, weight),))]


def test_a_later_worker_starts_from_the_file_a_first_one_from_its_configuration(tmp_path: Path) -> None:
    applied: list[Layout] = []
    first = SharedLayout(str(tmp_path), "config-1", applied.append)
    first.start(one("http://a:1"), others_running=False)
    first.publish(one("http://b:1", 3))  # an admin change in the first worker
    assert json.loads((tmp_path / "lbapp-layout.json").read_text())["version"] == 2

    later = SharedLayout(str(tmp_path), "config-1", applied.append)
    later.start(one("http://a:1"), others_running=True)
    assert applied == [one("http://b:1", 3)] and later.version == 2

    applied.clear()  # a worker whose configuration is newer publishes it (and the others follow)
    newer = SharedLayout(str(tmp_path), "config-2", applied.append)
    newer.start(one("http://c:1"), others_running=True)
    assert applied == [] and newer.version == 3
    first.poll()
    assert applied == [one("http://c:1")] and first.config_digest == "config-2"
    first.poll()  # nothing new: nothing applied twice
    assert len(applied) == 1

    applied.clear()  # a new start (no other worker alive): the configuration, not an old file
    restarted = SharedLayout(str(tmp_path), "config-2", applied.append)
    restarted.start(one("http://d:1"), others_running=False)
    assert applied == [] and restarted.version == 4


def test_digest_follows_the_layout_only() -> None:
    a = make_settings(["http://a:1"])
    assert digest(a) == digest(make_settings(["http://a:1"], health_interval=5))
    assert digest(a) != digest(make_settings([{"url": "http://a:1", "weight": 2}]))
    dns = make_settings([{"url": "http://echo:1", "discovery": "dns"}])
    assert from_settings(dns)[0].members == (Member("http://echo:1", 1, None, "dns"),)
