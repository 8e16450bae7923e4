"""Affinity policies: consistent hashing (properties with hypothesis) and sticky cookies."""

from __future__ import annotations

import collections
from collections.abc import Callable
from http.cookies import SimpleCookie

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbapp.backend import Backend
from lbapp.balancers import RoundRobin
from lbapp.hashing import ConsistentHash, IpHash, Sticky
from lbapp.policy import RequestInfo
from lbapp.pool import Pool
from lbapp.settings import BackendSpec

from .conftest import EchoBackend, mark_down, mark_up, run_lb, wait_until

SECRET = b"0123456789abcdef0123456789abcdef"


def request(
    client_ip: str = "10.0.0.1", headers: list[tuple[bytes, bytes]] | None = None, **scope: object
) -> RequestInfo:
    return RequestInfo({"headers": headers or [], "path": "/", **scope}, client_ip)


def pool_of(urls: list[str], weights: list[int] | None = None) -> Pool:
    weights = weights or [1] * len(urls)
    return Pool([BackendSpec(url=u, weight=w) for u, w in zip(urls, weights, strict=True)])


KEYS = [f"user-{i}" for i in range(2000)]


def assign(policy: ConsistentHash, backends: tuple[Backend, ...] | list[Backend]) -> dict[str, str]:
    return {key: policy.pick(backends, request(headers=[(b"x-user", key.encode())])).url for key in KEYS}


def test_same_key_same_backend_for_every_key_kind() -> None:
    pool = pool_of([f"http://10.0.0.{i}:80" for i in range(5)])
    cases = {
        "ip": (request("192.0.2.7"), request("192.0.2.7", [(b"x-user", b"other")])),
        "header:x-user": (
            request(headers=[(b"x-user", b"alice")]),
            request("10.9.9.9", [(b"x-user", b"alice")]),
        ),
        "cookie:session": (
            request(headers=[(b"cookie", b"a=1; session=abc")]),
            request("10.9.9.9", [(b"cookie", b"session=abc; b=2")]),
        ),
        "path": (request(raw_path=b"/cart/42"), request("10.9.9.9", raw_path=b"/cart/42")),
    }
    for key, (first, second) in cases.items():
        policy = ConsistentHash(key)
        picked = policy.pick(pool.eligible, first)
        assert all(policy.pick(pool.eligible, second) is picked for _ in range(3)), key
        # A new instance (another worker, or after a restart) agrees: no per-process salt.
        assert ConsistentHash(key).pick(pool.eligible, second) is picked, key


def test_keys_spread_over_backends_and_missing_key_falls_back_to_the_client_address() -> None:
    pool = pool_of([f"http://10.0.0.{i}:80" for i in range(4)])
    policy = ConsistentHash("header:x-user")
    spread = collections.Counter(assign(policy, pool.eligible).values())
    assert len(spread) == 4 and min(spread.values()) > 2000 / 4 * 0.8, spread
    without = request("192.0.2.1")
    assert policy.pick(pool.eligible, without) is IpHash().pick(pool.eligible, without)


def test_ip_hash_uses_the_resolved_client_address() -> None:
    pool = pool_of([f"http://10.0.0.{i}:80" for i in range(4)])
    policy = IpHash()
    picks = collections.Counter(
        policy.pick(pool.eligible, request(f"198.51.100.{i}")).url for i in range(200)
    )
    assert len(picks) == 4
    assert policy.pick(pool.eligible, request("198.51.100.9")) is policy.pick(
        pool.eligible, request("198.51.100.9")
    )


def test_weights_scale_the_share_of_keys() -> None:
    pool = pool_of(["http://a:80", "http://b:80"], [1, 3])
    shares = collections.Counter(assign(ConsistentHash("header:x-user"), pool.eligible).values())
    assert shares["http://b:80"] / len(KEYS) == pytest.approx(0.75, abs=0.05)


@settings(max_examples=40, deadline=None)
@given(
    hosts=st.lists(st.integers(min_value=1, max_value=65535), min_size=2, max_size=10, unique=True),
    data=st.data(),
)
def test_removing_a_backend_moves_only_its_keys(hosts: list[int], data: st.DataObject) -> None:
    urls = [f"http://10.1.{port % 256}.{port // 256}:{port}" for port in hosts]
    removed = data.draw(st.integers(min_value=0, max_value=len(urls) - 1))
    pool = pool_of(urls)
    before = assign(ConsistentHash("header:x-user"), pool.eligible)

    gone = pool.backends[removed]
    mark_down(pool, gone)
    # A fresh instance (never saw the removed backend) and the one that did must agree.
    after = assign(ConsistentHash("header:x-user"), pool.eligible)
    policy = ConsistentHash("header:x-user")
    assign(policy, tuple(pool.backends))
    assert assign(policy, pool.eligible) == after

    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(before[key] == gone.url for key in moved)  # only keys that were on it
    assert len(moved) / len(KEYS) <= 1 / len(urls) + 0.06  # about 1/N of them, and no more
    assert gone.url not in after.values()

    mark_up(pool, gone)  # and back: every key returns where it was
    assert assign(policy, pool.eligible) == before


def test_the_property_detects_a_modulo_hash() -> None:
    # The control for the property above: `hash % N` moves most keys when N changes.
    urls = [f"http://10.0.0.{i}:80" for i in range(5)]
    before = {key: urls[sum(key.encode()) % 5] for key in KEYS}
    after = {key: urls[:4][sum(key.encode()) % 4] for key in KEYS}
    moved = [key for key in KEYS if before[key] != after[key]]
    assert len(moved) / len(KEYS) > 1 / 5 + 0.06


# Sticky: unit level.


def sticky_pool() -> Pool:
    return pool_of(["http://a:80", "http://b:80", "http://c:80"])


def cookie_of(headers: list[tuple[bytes, bytes]] | None) -> tuple[str, str]:
    assert headers is not None and len(headers) == 1 and headers[0][0] == b"set-cookie"
    text = headers[0][1].decode()
    return text.split(";", 1)[0].split("=", 1)[1], text


def test_sticky_sets_a_signed_cookie_and_follows_it() -> None:
    pool = sticky_pool()
    policy = Sticky("srv", SECRET, RoundRobin())
    first = request()
    backend = policy.pick(pool.eligible, first)
    value, text = cookie_of(policy.response_headers(backend, first))
    assert text == f"srv={value}; Path=/; HttpOnly; SameSite=Lax"
    assert "http://" not in value  # the cookie does not reveal backend URLs
    for _ in range(5):
        again = request(headers=[(b"cookie", f"other=1; srv={value}".encode())])
        assert policy.pick(pool.eligible, again) is backend
        assert policy.response_headers(backend, again) is None  # already set: not sent again
    # Another instance with the same secret (another worker, a restart) honours it too.
    other = Sticky("srv", SECRET, RoundRobin())
    assert other.pick(pool.eligible, request(headers=[(b"cookie", f"srv={value}".encode())])) is backend


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: v[:-1] + ("A" if v[-1] != "A" else "B"),  # signature changed
        lambda v: "ffffffffffff" + v[12:],  # backend id changed, signature kept
        lambda v: v.split(".")[0],  # no signature
        lambda v: "garbage",
        lambda v: "",
    ],
)
def test_sticky_ignores_a_tampered_cookie(tamper: Callable[[str], str]) -> None:
    pool = sticky_pool()
    policy = Sticky("srv", SECRET, RoundRobin())
    values = {}
    for _ in range(3):
        probe = request()
        backend = policy.pick(pool.eligible, probe)
        values[backend.url] = cookie_of(policy.response_headers(backend, probe))[0]
    for value in values.values():
        forged = request(headers=[(b"cookie", f"srv={tamper(value)}".encode())])
        backend = policy.pick(pool.eligible, forged)  # re-picked by the fallback, no error
        assert forged.note is None
        new_value, _ = cookie_of(policy.response_headers(backend, forged))
        assert new_value == values[backend.url]
    # Another backend's id with this one's signature is a forgery too.
    a, b = values["http://a:80"], values["http://b:80"]
    forged = request(headers=[(b"cookie", f"srv={a.split('.')[0]}.{b.split('.')[1]}".encode())])
    policy.pick(pool.eligible, forged)
    assert forged.note is None


def test_sticky_cookie_from_another_secret_is_ignored() -> None:
    pool = sticky_pool()
    theirs = Sticky("srv", b"another secret of 16+ bytes", RoundRobin())
    probe = request()
    backend = theirs.pick(pool.eligible, probe)
    value, _ = cookie_of(theirs.response_headers(backend, probe))
    ours = Sticky("srv", SECRET, RoundRobin())
    replay = request(headers=[(b"cookie", f"srv={value}".encode())])
    picked = ours.pick(pool.eligible, replay)
    assert replay.note is None and ours.response_headers(picked, replay) is not None


def test_sticky_re_picks_when_the_named_backend_is_not_eligible() -> None:
    pool = sticky_pool()
    policy = Sticky("srv", SECRET, RoundRobin())
    probe = request()
    backend = policy.pick(pool.eligible, probe)
    value, _ = cookie_of(policy.response_headers(backend, probe))
    mark_down(pool, backend)
    again = request(headers=[(b"cookie", f"srv={value}".encode())])
    other = policy.pick(pool.eligible, again)
    assert other is not backend
    new_value, _ = cookie_of(policy.response_headers(other, again))
    assert new_value != value


def test_sticky_cookie_is_secure_behind_https_only_when_believed() -> None:
    pool = sticky_pool()
    policy = Sticky("srv", SECRET, RoundRobin())
    https_proto = [(b"x-forwarded-proto", b"https")]
    cases = [
        (RequestInfo({"headers": [], "scheme": "https"}, "10.0.0.1"), True),
        (RequestInfo({"headers": https_proto, "scheme": "http"}, "10.0.0.1", trusted=True), True),
        (RequestInfo({"headers": https_proto, "scheme": "http"}, "10.0.0.1", trusted=False), False),
        (RequestInfo({"headers": [], "scheme": "http"}, "10.0.0.1"), False),
    ]
    for info, secure in cases:
        _, text = cookie_of(policy.response_headers(policy.pick(pool.eligible, info), info))
        assert text.endswith("; Secure") is secure, text


# Sticky end to end.


def test_sticky_end_to_end(echo_factory: Callable[..., EchoBackend]) -> None:
    backends = [echo_factory(f"backend-{i}") for i in (1, 2, 3)]
    options = {"health_interval": 0.1, "unhealthy_threshold": 1, "sticky_secret": SECRET.decode()}
    with run_lb([b.url for b in backends], algorithm="sticky", **options) as server:
        first = httpx.get(server.url + "/x")
        cookies = first.headers.get_list("set-cookie")
        assert len(cookies) == 1
        cookie = SimpleCookie(cookies[0])["lbapp_sticky"]
        assert cookie["path"] == "/" and cookie["httponly"] and cookie["samesite"] == "Lax"
        assert not cookie["secure"]
        home = first.json()["server"]

        jar = {"lbapp_sticky": cookie.value}
        for _ in range(6):
            response = httpx.get(server.url + "/x", cookies=jar)
            assert response.json()["server"] == home
            assert "set-cookie" not in response.headers

        # The backend's own cookies pass through next to ours.
        response = httpx.get(server.url + "/cookies")
        assert len(response.headers.get_list("set-cookie")) == 3

        # A tampered cookie is re-picked without an error, and replaced.
        tampered = httpx.get(server.url + "/x", cookies={"lbapp_sticky": cookie.value[:-2] + "xx"})
        assert tampered.status_code == 200
        assert SimpleCookie(tampered.headers["set-cookie"])["lbapp_sticky"].value != cookie.value[:-2] + "xx"

        # The home backend dies: the cookie is re-picked to a live backend and re-set.
        dead = next(b for b in backends if b.name == home)
        dead.kill()
        state = next(b for b in server.app.state.clusters.default.pool.backends if b.url == dead.url)
        wait_until(lambda: not state.healthy)
        moved = httpx.get(server.url + "/x", cookies=jar)
        assert moved.status_code == 200 and moved.json()["server"] != home
        new_value = SimpleCookie(moved.headers["set-cookie"])["lbapp_sticky"].value
        assert new_value != cookie.value
        again = httpx.get(server.url + "/x", cookies={"lbapp_sticky": new_value})
        assert again.json()["server"] == moved.json()["server"]


def test_sticky_cookie_is_secure_behind_a_trusted_https_proxy(
    echo_factory: Callable[..., EchoBackend],
) -> None:
    backend = echo_factory("backend-1")
    with run_lb([backend.url], algorithm="sticky", trusted_proxies=["127.0.0.1/32"]) as server:
        behind = httpx.get(server.url + "/x", headers={"x-forwarded-proto": "https"})
        assert SimpleCookie(behind.headers["set-cookie"])["lbapp_sticky"]["secure"]
        plain = httpx.get(server.url + "/x")
        assert not SimpleCookie(plain.headers["set-cookie"])["lbapp_sticky"]["secure"]
