"""The upstream side: one shared `httpx.AsyncClient` per process, and the cheapest way through it.

Profiled (README, Performance), httpx's client layer (auth and redirect machinery, cookie
extraction, event hooks, response wrapping) costs about as much per request as the whole
lean transport, and a proxy needs none of it. So the client is built, owned and closed as usual,
but the proxy hands each request straight to the client's transport. With the lean transport
(the default) it goes one step further: `LeanTransport.exchange` takes the request's parts and
returns a `LeanResponse`, so no `httpx.Request`, `httpx.Headers` or `httpx.Response` is built per
exchange (~12% of a proxied request's CPU, profiled); the exceptions are httpx's, as through
`handle_async_request`, which the transport still implements for any other caller. The httpcore
transport (`LB_TRANSPORT=httpcore`) is called through the httpx interface.
"""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from .rawheaders import adopt, triples
from .transport import LeanResponse, LeanTransport

Reply = LeanResponse | httpx.Response  # what `Upstream.send` returns
EMPTY_BODY = httpx.ByteStream(b"")


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


def response_headers(response: Reply) -> list[tuple[bytes, bytes, bytes]]:
    """The response's headers as (raw name, lower-case name, value), order and duplicates kept."""
    return response.headers if isinstance(response, LeanResponse) else triples(response.headers)


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
        self.timeouts: dict[str, float | None] = httpx.Timeout(
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

    async def send(
        self,
        method: str,
        origin: httpx.URL,
        key: tuple[str, str, int],
        headers: list[tuple[bytes, bytes]],
        stream: httpx.AsyncByteStream | None,
        target: bytes,
    ) -> Reply:
        """Send the request to `origin` (`key` = its scheme, host and port); `target` is sent
        verbatim as the request-line target, `stream` is the body (None: none)."""
        transport = self.transport
        assert transport is not None, "the lifespan has not started"
        if isinstance(transport, LeanTransport):
            return await transport.exchange(key, method, target, headers, stream, self.timeouts)
        request = httpx.Request(
            method,
            origin,
            headers=fast_headers(headers),
            stream=stream or EMPTY_BODY,
            extensions={"target": target, "timeout": self.timeouts},
        )
        try:
            return await transport.handle_async_request(request)
        except (AttributeError, OSError) as exc:
            # httpcore over anyio can fail outside its exception map when a backend resets the
            # connection at once ('NoneType' object has no attribute 'getpeername'): still a
            # network failure of this attempt, never a 500.
            raise httpx.NetworkError(f"connection failed: {exc!r}", request=request) from exc

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
