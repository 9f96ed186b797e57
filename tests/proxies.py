"""Helpers for the tests that run a real proxy (Traefik, Envoy) with a shipped config.

- `venv_binary`: a proxy installed by the `[dev]` extra, found beside the venv's python
  (CI runs with PATH=/usr/bin:/bin). A missing one fails the test, never skips it.
- `render`: the file users deploy, with only its addresses and paths substituted; every
  substitution must match, so an edit that breaks the harness fails loudly instead of
  testing something else.
- `RecordingUpstream`: the LLM API stand-in; answers like OpenAI / Anthropic (so the
  official SDKs parse the answer) and records every request it sees.
- `listening_addresses`: where a process listens, to prove nothing beyond loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiohttp import web
from conftest import free_port
from live import socket_inodes


def venv_binary(name: str) -> Path:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{path} is missing: pip install -e '.[dev]' installs {name}"
    return path


def render(text: str, swaps: dict[str, str], what: str = "config") -> str:
    """`text` with each key replaced by its value; each key must occur at least once."""
    for old, new in swaps.items():
        assert old in text, f"{what} no longer contains {old!r}: update the test harness"
        text = text.replace(old, new)
    return text


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]      # lower-cased names
    raw_names: list[str]         # the names as they arrived, in order
    body: bytes


@dataclass
class RecordingUpstream:
    """Answers every call with a minimal OpenAI or Anthropic success and records it."""

    port: int = 0
    calls: list[Seen] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.ServerRunner | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        self.calls.append(Seen(request.method, request.path_qs,
                               {k.lower(): v for k, v in request.headers.items()},
                               list(request.headers.keys()), body))
        try:
            model = orjson.loads(body).get("model", "") if body else ""
        except (orjson.JSONDecodeError, AttributeError):
            model = ""
        if request.path.startswith("/v1/messages"):
            return web.json_response({
                "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}})
        if request.path.startswith("/v1/models"):
            return web.json_response({"object": "list", "data": [
                {"id": "gpt-a", "object": "model", "created": 0, "owned_by": "test"}]})
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def start(self) -> RecordingUpstream:
        async def serve() -> web.ServerRunner:
            runner = web.ServerRunner(web.Server(self.handle))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner

        self.port = free_port()
        self._loop = loop = asyncio.new_event_loop()
        ready: list = []
        started = threading.Event()

        def run() -> None:   # in its own thread: callers may be inside an event loop
            asyncio.set_event_loop(loop)
            try:
                self._runner = loop.run_until_complete(serve())
                ready.append(True)
            finally:
                started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait(10)
        assert ready, "the recording upstream did not start"
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None


def _listening(table: str) -> dict[str, tuple[str, int]]:
    """inode -> (address, port) of the listening sockets in /proc/net/tcp or tcp6."""
    found = {}
    with open(table) as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[3] != "0A":
                continue
            addr, port = cols[1].rsplit(":", 1)
            raw = bytes.fromhex(addr)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found[cols[9]] = (str(ipaddress.ip_address(raw)), int(port, 16))
    return found


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on."""
    mine = socket_inodes(pid)
    table = {**_listening("/proc/net/tcp"), **_listening("/proc/net/tcp6")}
    return {where for inode, where in table.items() if inode in mine}


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback
