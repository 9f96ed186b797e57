"""`sidecar fallback`: the JSON error a proxy shows when the sidecar itself cannot answer.

Traefik has no way to write a response body of its own. When its forwardAuth cannot reach
the sidecar it answers an empty 500, and a body over its limit gets an empty 401: the SDKs
read no error code from either. Traefik's `errors` middleware can replace such an answer
with a page fetched from a service; this process is that service (deploy/traefik/).

`GET /503` and `GET /413` answer the sidecar's own JSON for that status, in the dialect
of the client's call: the Anthropic shape when the call's path (X-Forwarded-Uri, else the
`url` query parameter that Traefik fills in) is under /v1/messages, else the OpenAI one.
It needs no Redis and no secret, and must run apart from the sidecar: it answers exactly
when the sidecar does not.
"""

from __future__ import annotations

import asyncio
import signal
from urllib.parse import parse_qs, urlsplit

from .decision import DENIALS, Code, Denial, error_body
from .edge import EdgeServer
from .http_messages import Answer, Call

TOO_LARGE = Denial(413, "request_too_large", "invalid_request_error", "request_too_large",
                   "The request body is larger than this gateway accepts.")
PAGES: dict[str, Denial] = {"/503": DENIALS[Code.unavailable], "/413": TOO_LARGE}
MESSAGES = "/v1/messages"


def client_path(call: Call) -> str:
    """The path of the client's call this error page stands for ('' if unknown)."""
    uri = call.headers.get("X-Forwarded-Uri")
    if not uri:
        url = parse_qs(urlsplit(call.target).query).get("url", [""])[0]
        uri = urlsplit(url).path
    return uri.partition("?")[0]


def page(call: Call) -> Answer:
    denial = PAGES.get(call.path)
    if denial is None:
        return Answer(404, {}, b"", None)
    anthropic = client_path(call).startswith(MESSAGES)
    headers = {"Retry-After": "1"} if denial.status == 503 else {}
    return Answer(denial.status, headers, error_body(denial, anthropic), "application/json")


async def _page(call: Call) -> Answer:
    return page(call)


async def run(host: str, port: int) -> None:
    """Serve until SIGTERM / SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    edge = EdgeServer(lambda _path: (_page, True), max_body=0, keepalive_timeout=75.0)
    await edge.listen(host, port, reuse_port=False)
    await stop.wait()
    await edge.shutdown(5.0)
