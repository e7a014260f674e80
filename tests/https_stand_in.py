"""An HTTPS server on loopback with a certificate from its own test CA (trustme): what the
Events API stand-in (tests/fake_events.py) and the webhook receiver
(tests/fake_webhooks.py) are built on.

The CA's PEM is written to `ca_file` at construction, so a daemon can be configured
(and started) before the server listens; `port` binds a given port for that. The TLS
handshake happens in each request's own thread (on first read), so a client that never
finishes it cannot stall the accept loop.
"""

from __future__ import annotations

import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme


class TlsServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: Any  # the HttpsStandIn serving: its handlers reach it as self.server.fake

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        self.fake.connections += 1
        context = self.fake.server_context
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up, did not trust the certificate, or was killed mid-request.
        self.fake.handler_errors += 1


class HttpsStandIn:
    """https://127.0.0.1:PORT; a context manager that starts it. A subclass names its CA
    file and thread, and gives its request handler class."""

    ca_name = "ca.pem"
    thread_name = "https-stand-in"

    def __init__(self, folder: Path, port: int = 0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = folder / self.ca_name
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert("127.0.0.1").configure_cert(self.server_context)
        self.port = port
        self.handler_errors = 0
        self.connections = 0  # accepted so far
        self._server: TlsServer | None = None
        self._thread: threading.Thread | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def start(self) -> Any:
        server = TlsServer(("127.0.0.1", self.port), self.handler())
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=self.thread_name
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
