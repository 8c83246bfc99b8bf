"""A server that accepts connections and never answers, for tests and benchmarks.

It stands in for a hung model server (a process stuck in a GPU call, a proxy whose upstream is
gone): a real listening socket on loopback that accepts every connection and holds it open
without reading or writing a byte. `connections` counts the connections it was asked for.
"""

from __future__ import annotations

import socket
import threading


class HungServer:
    """Start with `with HungServer() as hung:`; point clients at `hung.url`."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, name="hung-server", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                self._held.append(connection)
                self.connections += 1

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for connection in self._held:
                connection.close()
            self._held.clear()

    def __enter__(self) -> HungServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
