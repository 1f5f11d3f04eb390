"""A read-only status page of a federated run, served by the standard library from a thread.

``GET /`` is the page (:mod:`coordinator.status_view`), ``GET /status.json`` the run's ``status.json`` as
the ServerApp last wrote it (atomically), ``{"state": "waiting"}`` before it exists. Every other method is
refused with 405: nothing here changes anything. It binds to loopback by default; any other address needs
TLS (the coordinator's SuperLink certificate and key, from ``ewtune keys init``), since the page shows each
holder's budget and spend. Responses carry a Content-Security-Policy that allows only this origin.
"""

from __future__ import annotations

import json
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from accountant.errors import InvalidInputError
from coordinator.status_view import PAGE, SCRIPT

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
WAITING = b'{"state": "waiting"}'


class StatusServer:
    """Serves the status page of ``status_path`` on ``host:port`` (port 0: any free one) until :meth:`stop`."""

    def __init__(self, status_path: str | Path, host: str = "127.0.0.1", port: int = 0,
                 certificate: str | Path | None = None, key: str | Path | None = None):
        from coordinator.superlink import is_loopback

        if (certificate is None) != (key is None):
            raise InvalidInputError("TLS for the status page needs both a certificate and its key")
        if certificate is None and not is_loopback(host):
            raise InvalidInputError(
                f"the status page shows every holder's budget and spend: serve it on {host} only with TLS "
                "(--credentials), or bind to 127.0.0.1"
            )
        self.status_path = Path(status_path)
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(self.status_path))
        except OSError as error:
            raise InvalidInputError(f"cannot serve the status page on {host}:{port}: {error.strerror or error}") from None
        self.scheme = "http"
        if certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(str(certificate), str(key))
            except (OSError, ssl.SSLError) as error:
                self._server.server_close()
                raise InvalidInputError(f"cannot load the TLS certificate {certificate}: {error}") from None
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, name="ewtune-status-page", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self.scheme}://{host if ':' not in host else f'[{host}]'}:{port}/"

    def start(self) -> "StatusServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "StatusServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _handler(status_path: Path) -> type[BaseHTTPRequestHandler]:
    routes = {
        "/": ("text/html; charset=utf-8", lambda: PAGE.encode()),
        "/status.js": ("text/javascript; charset=utf-8", lambda: SCRIPT.encode()),
        "/status.json": ("application/json", lambda: _status_bytes(status_path)),
    }

    class Handler(BaseHTTPRequestHandler):
        server_version = "ewtune-status"
        sys_version = ""

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                self._reply(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", body)
                return
            content_type, content = route
            self._reply(HTTPStatus.OK, content_type, content(), body)

        def _refuse(self) -> None:
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", b"read-only: GET and HEAD only\n",
                        True, {"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse

        def _reply(self, status: HTTPStatus, content_type: str, content: bytes, body: bool,
                   extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in {**SECURITY_HEADERS, "Content-Type": content_type, **(extra or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if body:
                self.wfile.write(content)

        def log_message(self, format: str, *args) -> None:  # quiet: polled every two seconds
            return

    return Handler


def _status_bytes(path: Path) -> bytes:
    """The last complete status (the ServerApp replaces the file atomically), or ``waiting`` before it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return WAITING
    try:
        json.loads(data)
    except ValueError:
        return json.dumps({"state": "unreadable", "reason": f"{path} is not valid JSON"}).encode()
    return data
