"""A loopback HTTP server for tests: a static folder, with or without range requests, and faults.

``serve(root, ranges=False)`` behaves like ``python -m http.server`` (directory listings, no
range requests); ``ranges=True`` answers ``Range`` with 206 like an object store. Faults are
injected for real on the socket: ``unavailable={"00001.tar": 3}`` answers the next 3 requests
for paths containing ``00001.tar`` with 503, ``drops={"00001.tar": 1}`` sends the headers and
half of the body of the next GET, then closes the connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    """What the server does wrong, per path substring, and what it was asked."""

    unavailable: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    requests: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, kind: dict[str, int], path: str) -> bool:
        with self.lock:
            for part, left in kind.items():
                if part in path and left != 0:
                    kind[part] = left - 1
                    return True
        return False


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet tests
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        faults: Faults = self.server.faults  # type: ignore[attr-defined]
        with faults.lock:
            faults.requests[(self.command, self.path)] += 1
        if faults.take(faults.unavailable, self.path):
            self.send_error(503, "Service Unavailable")
            return
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not os.path.isfile(path):
            (super().do_GET if body else super().do_HEAD)()
            return
        data = Path(path).read_bytes()
        start, end, status = 0, len(data) - 1, 200
        wanted = self.headers.get("Range")
        if self.server.ranges and wanted and wanted.startswith("bytes="):  # type: ignore[attr-defined]
            first, _, last = wanted[len("bytes="):].partition("-")
            start = int(first or 0)
            end = min(int(last) if last else len(data) - 1, len(data) - 1)
            status = 206
        chunk = data[start : end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(chunk)))
        if self.server.ranges:  # type: ignore[attr-defined]
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if faults.take(faults.drops, self.path):
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(chunk)


@contextlib.contextmanager
def serve(root: Path, ranges: bool = False, faults: Faults | None = None) -> Iterator[tuple[str, Faults]]:
    """Serve ``root`` on 127.0.0.1 in a thread; yields the base URL (``http://127.0.0.1:PORT``)
    and the server's ``Faults``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    server.ranges = ranges  # type: ignore[attr-defined]
    server.faults = faults or Faults()  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.faults  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
