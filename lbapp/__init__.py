"""lbapp: an HTTP load balancer served by uvicorn (`uvicorn lbapp:app`)."""

from __future__ import annotations

import sys
from typing import Any

from .application import create_app
from .settings import Settings, SettingsError, load_settings

__all__ = ["Settings", "SettingsError", "app", "create_app", "load_settings"]
__version__ = "0.1.0"

_app: Any = None


def __getattr__(name: str) -> Any:
    """Build `app` on first access, so importing lbapp in tests reads no environment."""
    global _app
    if name != "app":
        raise AttributeError(f"module 'lbapp' has no attribute {name!r}")
    if _app is None:
        try:
            _app = create_app()
        except SettingsError as exc:
            print(f"lbapp: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
    return _app
