"""The cache's one user-facing error type."""

from __future__ import annotations


class CacheError(ValueError):
    """A cache cannot be created, opened or read as asked; the message ends with the fix."""
