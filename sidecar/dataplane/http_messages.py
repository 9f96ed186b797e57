"""What the data-plane edge hands a handler and what it writes back: the request
(`Call`, its `Headers`), the `Answer`, the handler and router types, and the answer's
HTTP/1.1 bytes (`encode`: one status line, a Date cached per second, one buffer).

Transport-neutral on the way in: the gRPC ext_authz adapter builds the same `Call` and
reads the same `Answer`; only the HTTP edge (edge.py) calls `encode`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

import orjson


class Headers(dict):
    """Request headers, names lower-cased; `get` is case-insensitive. Repeated headers are
    joined with ',' (RFC 9110 5.3), as aiohttp's multidict `get` would not, but proxies
    send each of ours once."""

    __slots__ = ()

    def get(self, name: str, default=None):  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


@dataclass(slots=True)
class Call:
    """One request as a handler sees it."""

    method: str
    target: str              # path and query, as sent (e.g. /authz/v1/models?x=1)
    path: str                # target without the query
    headers: Headers
    body: bytes
    peer_ip: str             # '' for a unix-socket peer
    body_truncated: bool = False


@dataclass(slots=True)
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str | None = None


Handler = Callable[[Call], Awaitable[Answer]]
# route(path) -> (handler, eager) or None for 404
Router = Callable[[str], "tuple[Handler, bool] | None"]


def json_answer(status: int, doc: dict, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, headers or {}, orjson.dumps(doc), "application/json")


def error_answer(status: int, code: str | None, message: str) -> Answer:
    return json_answer(status, {"error": {"message": message, "type": "invalid_request_error",
                                          "code": code}})


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        reason = _REASONS.get(status, b"Unknown")
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    return line


class _Clock:
    """The Date header, formatted once per second, not once per answer."""

    def __init__(self) -> None:
        self._second = 0
        self.header = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self.header = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.header


_clock = _Clock()


def encode(answer: Answer, keep_alive: bool) -> bytes:
    headers = answer.headers
    head = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if head.count("\n") != len(headers) or head.count("\r") != len(headers):
        # Values come from our records and our own JSON; a CR/LF would split a header.
        head = "".join([f"{name}: {_one_line(value)}\r\n" for name, value in headers.items()])
    if answer.content_type:
        head += f"Content-Type: {answer.content_type}\r\n"
    head += f"Content-Length: {len(answer.body)}\r\n"
    if not keep_alive:
        head += "Connection: close\r\n"
    return b"".join((_status_line(answer.status), _clock.date(),
                     head.encode("latin-1", "replace"), b"\r\n", answer.body))


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")
