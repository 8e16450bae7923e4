"""The upstream side: one shared `httpx.AsyncClient` per process, and the cheapest way through it.

Profiled (README, Performance), httpx's client layer (auth and redirect machinery, cookie
extraction, event hooks, response wrapping) costs about as much per request as the whole
lean transport, and a proxy needs none of it. So the client is built, owned and closed as usual,
but the proxy hands each request straight to the client's transport: the same `httpx.Request`
and `httpx.Response` objects and exceptions, without the layers between.
"""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from .rawheaders import adopt, lowered
from .transport import LeanTransport


def no_cookies() -> CookieJar:
    """A jar that stores nothing, for the shared client.

    The proxy hands requests straight to the transport, so the client layer (and its jar) never
    sees them; should anything send through `client.send`, one client's cookies still could never
    be replayed to another.
    """
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def fast_headers(raw: list[tuple[bytes, bytes]]) -> httpx.Headers:
    """An `httpx.Headers` from header names that are already lower-case bytes (ASGI guarantees it).

    `httpx.Headers(list)` re-encodes and lower-cases every name; with trusted input that is pure
    overhead on the hot path (rawheaders.py has the measurement).
    """
    return adopt(httpx.Headers(), [(name, name, value) for name, value in raw])


def lower_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    """The response's headers as (lower-case name, value), order and duplicates kept."""
    return lowered(response.headers)


class Upstream:
    """Owns the shared client and its transport (`LB_TRANSPORT`), from lifespan start to stop."""

    def __init__(
        self,
        *,
        transport: str = "lean",
        connect_timeout: float = 2.0,
        timeout: float = 10.0,
        idle_timeout: float = 4.0,
        max_connections: int = 0,
    ) -> None:
        self.kind = transport
        self.connect_timeout = connect_timeout
        self.timeout = timeout  # read, write and pool (waiting for a connection)
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections or None  # per origin; 0: unlimited
        self.timeouts = httpx.Timeout(
            connect=connect_timeout, read=timeout, write=timeout, pool=timeout
        ).as_dict()
        self.client: httpx.AsyncClient | None = None
        self.transport: httpx.AsyncBaseTransport | None = None

    def start(self) -> httpx.AsyncClient:
        transport: httpx.AsyncBaseTransport
        if self.kind == "lean":
            transport = LeanTransport(
                max_connections=self.max_connections,
                max_keepalive=self.max_connections or 512,
                keepalive_expiry=self.idle_timeout,
                connect_timeout=self.connect_timeout,
                read_timeout=self.timeout,
                write_timeout=self.timeout,
                pool_timeout=self.timeout,
            )
        else:
            transport = httpx.AsyncHTTPTransport(
                limits=httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections or 256,
                    keepalive_expiry=self.idle_timeout,
                ),
                trust_env=False,
            )
        client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(**self.timeouts),
            follow_redirects=False,
            trust_env=False,
            cookies=no_cookies(),
        )
        client.headers.clear()  # httpx's default Accept/User-Agent/... must never be invented
        self.client, self.transport = client, transport
        return client

    @property
    def started(self) -> bool:
        return self.client is not None and not self.client.is_closed

    def request(
        self,
        method: str,
        origin: httpx.URL,
        headers: list[tuple[bytes, bytes]],
        stream: httpx.AsyncByteStream,
        target: bytes,
    ) -> httpx.Request:
        """The upstream request; `target` is sent verbatim as the request-line target."""
        return httpx.Request(
            method,
            origin,
            headers=fast_headers(headers),
            stream=stream,
            extensions={"target": target, "timeout": self.timeouts},
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        assert self.transport is not None, "the lifespan has not started"
        if self.kind == "lean":
            return await self.transport.handle_async_request(request)
        try:
            return await self.transport.handle_async_request(request)
        except (AttributeError, OSError) as exc:
            # httpcore over anyio can fail outside its exception map when a backend resets the
            # connection at once ('NoneType' object has no attribute 'getpeername'): still a
            # network failure of this attempt, never a 500.
            raise httpx.NetworkError(f"connection failed: {exc!r}", request=request) from exc

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
