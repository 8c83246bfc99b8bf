"""Backends: where tokens come from. One protocol (`base.Backend`), one module per backend.

Backends take plain constructor arguments and read no configuration: `chat.factory` turns the
app's `Settings` into a backend, so a backend can be built in a test from a few values.
"""

from __future__ import annotations

from .base import Backend, Token

__all__ = ["Backend", "Token"]
