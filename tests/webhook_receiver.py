"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 that checks every
delivery's Standard Webhooks signature with its own code (not the sidecar's), and the
helpers to point sidecars at it and to know when nothing more can arrive."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import free_port

from sidecar.schema import names

SECRET = "whsec_" + base64.b64encode(b"receiver-secret-0123456789abcdef").decode()


class Receiver:
    """POSTs on 127.0.0.1, answered `status`; each kept with whether its signature is
    right (computed here, independently of the sidecar's code)."""

    def __init__(self, secret: str = SECRET, status: int = 200):
        self.secret, self.status = secret, status
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = outer.status
                with outer.lock:
                    outer.calls.append({"headers": {k.lower(): v for k, v in
                                                    self.headers.items()},
                                        "body": body, "path": self.path,
                                        "valid": outer.valid(self.headers, body),
                                        "status": status})
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=not-for-logs"

    def valid(self, headers, body: bytes) -> bool:
        key = base64.b64decode(self.secret.removeprefix("whsec_"))
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        mac = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        return any(hmac.compare_digest("v1," + mac, s)
                   for s in headers["webhook-signature"].split())

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(c["body"]) for c in self.calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def endpoints(*receivers: Receiver, **extra) -> str:
    return json.dumps([{"url": r.url, "secret": r.secret, **extra} for r in receivers])


def drained(client) -> bool:
    """Every event stream empty and nothing pending: no delivery can still happen."""
    for tag in names.ALL_TAGS:
        stream = names.events(tag)
        if client.exists(stream) and (client.xlen(stream) or any(
                g["pending"] for g in client.xinfo_groups(stream))):
            return False
    return True
