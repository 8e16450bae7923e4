"""The version, in one place (pyproject.toml holds the same for packaging)."""

VERSION = "0.1.0"
