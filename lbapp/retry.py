"""When a failed attempt may be sent again, and how many requests may be retrying at once.

The rule (`RetryPolicy.retryable`): a request is sent again only if nothing of it reached a
backend (a connect-phase error, or the transport says no byte was written), or it is safe to
repeat: an idempotent method without a body, or any request with an `Idempotency-Key` whose body
was kept whole for a replay; a timeout after sending is never retried (the backend may still be
working on it), and nothing is retried once the response began. Each retry goes to another
backend when there is one, at most `max_retries` times.

The budget (`RetryBudget`, as in Envoy and Finagle) bounds retry storms: requests retrying at once
<= max(minimum, percent of the requests in flight). A request's `Attempts` holds one slot from its
first retry until it ends.
"""

from __future__ import annotations

from types import TracebackType

import httpx

from .backend import Backend
from .streaming import ClientBody

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CONNECT_PHASE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def has_idempotency_key(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request says it is safe to repeat (draft-ietf-httpapi-idempotency-key-header)."""
    return any(name == b"idempotency-key" and value.strip() for name, value in headers)


def error_status(error: Exception) -> int:
    """The answer for a failed attempt: 504 for a timeout waiting on the backend, else 502."""
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.PoolTimeout):
        return 504
    return 502


class RetryPolicy:
    """`LB_MAX_RETRIES` and the rule above, as data."""

    __slots__ = ("delay", "max_retries")

    def __init__(self, max_retries: int = 2, delay: float = 0.0) -> None:
        self.max_retries = max_retries
        self.delay = delay  # seconds between attempts (LB_RETRY_DELAY)

    @staticmethod
    def safe_to_repeat(method: str, has_body: bool, idempotency_key: bool) -> bool:
        """May the request be sent again after a backend received it?"""
        return (method in IDEMPOTENT and not has_body) or idempotency_key

    @staticmethod
    def request_is_safe(method: str, has_body: bool, headers: list[tuple[bytes, bytes]]) -> bool:
        """`safe_to_repeat` for a request's method, framing and headers (its Idempotency-Key)."""
        key = method not in IDEMPOTENT and has_idempotency_key(headers)
        return RetryPolicy.safe_to_repeat(method, has_body, key)

    def retryable(self, error: Exception, attempts: int, body: ClientBody | None, safe: bool) -> bool:
        """After `attempts` attempts, the last failing with `error`: may another be made?"""
        if attempts > self.max_retries:
            return False
        if body is not None and body.started and not body.replayable:
            return False  # part of the body is gone: it cannot be sent again
        if isinstance(error, CONNECT_PHASE) or getattr(error, "request_sent", True) is False:
            return True
        return safe and not isinstance(error, httpx.TimeoutException)


class RetryBudget:
    """How many requests are retrying now, against max(minimum, percent of those in flight)."""

    __slots__ = ("minimum", "ratio", "retrying")

    def __init__(self, percent: float = 20.0, minimum: int = 3) -> None:
        self.ratio = percent / 100.0
        self.minimum = minimum
        self.retrying = 0

    def allows(self, in_flight: int) -> bool:
        return self.retrying < max(self.minimum, in_flight * self.ratio)


class Attempts:
    """One request's attempts, as a context manager: the backends tried, and its budget slot.

    The slot is taken at the first retry and given back when the request ends, however it ends.
    """

    __slots__ = ("backend", "budget", "count", "holding", "policy", "tried")

    def __init__(self, policy: RetryPolicy, budget: RetryBudget) -> None:
        self.policy = policy
        self.budget = budget
        self.tried: set[Backend] = set()
        self.backend: Backend | None = None  # the one tried last (or answering)
        self.count = 0
        self.holding = False

    def __enter__(self) -> Attempts:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.holding:
            self.holding = False
            self.budget.retrying -= 1

    def next_attempt(self, error: Exception, body: ClientBody | None, safe: bool, in_flight: int) -> str:
        """After a failed attempt: RETRY, STOP (not retryable) or DENIED (the budget is spent)."""
        if not self.policy.retryable(error, self.count, body, safe):
            return STOP
        if not self.holding:
            if not self.budget.allows(in_flight):
                return DENIED
            self.holding = True
            self.budget.retrying += 1
        return RETRY


RETRY, STOP, DENIED = "retry", "stop", "denied"
