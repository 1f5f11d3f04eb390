"""A read-only status page of a federated run, served by the standard library from a thread.

``GET /`` is the page (:mod:`ewtune.coordinator.status_view`), ``GET /status.json`` the run's ``status.json`` as
the ServerApp last wrote it (atomically), ``{"state": "waiting"}`` before it exists. Every other method is
refused with 405: nothing here changes anything. It binds to loopback by default; any other address needs
TLS (the coordinator's SuperLink certificate and key, from ``ewtune keys init``) and a token, since the page
shows each holder's budget and spend: every request must then carry it, as HTTP Basic's password (a browser
asks for it once) or as ``Authorization: Bearer TOKEN``; without it the answer is 401. Responses carry a
Content-Security-Policy that allows only this origin.

At most :data:`MAX_CONNECTIONS` connections are served at a time; one more is closed at once, unanswered. Each
connection is closed :data:`CONNECTION_DEADLINE_S` seconds after it was accepted, whatever it sent (a request
is one small GET, HTTP/1.0, one per connection), and its TLS handshake happens in its own thread, so no client,
idle or slow, holds a slot or the accepting thread for longer.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import secrets
import socket
import ssl
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError
from ewtune.coordinator.status_view import PAGE, SCRIPT
from ewtune.coordinator.superlink import is_loopback

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
WAITING = b'{"state": "waiting"}'
MAX_CONNECTIONS = 32
CONNECTION_DEADLINE_S = 5.0
LISTEN_BACKLOG = 64
TOKEN_BYTES = 32


class StatusServer:
    """Serves the status page of ``status_path`` on ``host:port`` (port 0: any free one) until :meth:`stop`."""

    def __init__(self, status_path: str | Path, host: str = "127.0.0.1", port: int = 0,
                 certificate: str | Path | None = None, key: str | Path | None = None, token: str | None = None,
                 max_connections: int = MAX_CONNECTIONS, deadline_s: float = CONNECTION_DEADLINE_S):
        """``token``: the secret every request must carry; required off loopback (see :func:`status_token`)."""
        if (certificate is None) != (key is None):
            raise InvalidInputError("TLS for the status page needs both a certificate and its key")
        if not is_loopback(host) and (certificate is None or not token):
            raise InvalidInputError(
                f"the status page shows every holder's budget and spend: serve it on {host} only with TLS "
                "(--credentials) and a token (--token-file), or bind to 127.0.0.1"
            )
        self.status_path = Path(status_path)
        try:
            self._server = _BoundedHTTPServer((host, port), _handler(self.status_path, token, deadline_s), max_connections)
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
            # The handshake runs in the connection's own thread (_handler's setup), under its deadline.
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True, do_handshake_on_connect=False)
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


def status_token(path: str | Path) -> str:
    """The status page's token kept in ``path``: read, or made from the OS's secure source and written 0600
    (created exclusively, whatever the umask) when the file does not exist yet."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if not token:
            raise InvalidInputError(f"the status page token file {path} is empty") from None
        return token
    except OSError as error:
        raise InvalidInputError(f"cannot create the status page token file {path}: {error.strerror or error}") from None
    token = secrets.token_urlsafe(TOKEN_BYTES)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return token


def presented_token(authorization: str | None) -> str | None:
    """The token in an ``Authorization`` header: ``Bearer TOKEN``, or HTTP Basic with TOKEN as the password
    (any user name)."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them; one more is closed at once, unanswered."""

    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        """Quiet for a client that timed out, hung up or failed its handshake; anything else as usual."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _handler(status_path: Path, token: str | None, deadline_s: float) -> type[BaseHTTPRequestHandler]:
    routes = {
        "/": ("text/html; charset=utf-8", lambda: PAGE.encode()),
        "/status.js": ("text/javascript; charset=utf-8", lambda: SCRIPT.encode()),
        "/status.json": ("application/json", lambda: _status_bytes(status_path)),
    }

    class Handler(BaseHTTPRequestHandler):
        server_version = "ewtune-status"
        sys_version = ""
        timeout = deadline_s

        def setup(self) -> None:
            """Close the connection ``deadline_s`` after it was accepted, whatever it sends."""
            self._deadline = threading.Timer(deadline_s, self._hang_up)
            self._deadline.start()
            super().setup()

        def handle(self) -> None:
            if isinstance(self.request, ssl.SSLSocket):  # the TLS handshake, in this connection's thread
                self.request.do_handshake()
            super().handle()

        def finish(self) -> None:
            self._deadline.cancel()
            super().finish()

        def _hang_up(self) -> None:
            try:
                self.request.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed already
                pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _authorised(self) -> bool:
            presented = presented_token(self.headers.get("Authorization"))
            return token is None or (presented is not None and hmac.compare_digest(presented.encode(), token.encode()))

        def _serve(self, body: bool) -> None:
            if not self._authorised():
                self._reply(HTTPStatus.UNAUTHORIZED, "text/plain; charset=utf-8", b"a token is required\n", body,
                            {"WWW-Authenticate": 'Basic realm="ewtune status", charset="UTF-8"'})
                return
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
