"""Helpers the tests import: a free loopback port, and the real app served on it.

Fixtures live in conftest.py (pytest finds them); plain functions live here, so no test imports
from conftest.
"""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(backend, settings=None):
    """Build the real app for `backend` and serve it on a free loopback port; yields its URL."""
    from chat.config import Settings
    from chat.operations import Operations
    from chat.ui import build_demo, launch_options

    settings = settings or Settings()
    settings = type(settings)(**{**settings.__dict__, "port": free_port()})
    operations = Operations(backend, log_messages=settings.log_messages)
    demo = build_demo(backend, settings, operations)
    demo.launch(**launch_options(settings, operations), prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{settings.port}/"
    finally:
        demo.close()
