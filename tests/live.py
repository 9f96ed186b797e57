"""Helpers for the tests that talk to a running sidecar over HTTP (not fixtures).

The fixtures themselves (redis_server, store, http, start_sidecar) live in conftest.py;
this module only holds the small request/CLI helpers those tests share.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
import orjson
from conftest import ROOT, Sidecar, sidecar_env

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)  # a hang fails the test, never blocks it


@dataclass
class Answer:
    status: int
    headers: dict[str, str]        # lower-cased names
    raw: bytes

    @property
    def json(self) -> dict:
        return orjson.loads(self.raw)

    @property
    def code(self) -> str | None:
        """The OpenAI-style `code` of a denial, or the Anthropic error type."""
        body = self.json
        if body.get("type") == "error":
            return body["error"]["type"]
        return body["error"]["code"]


async def authz(http: aiohttp.ClientSession, car: Sidecar, path: str = CHAT, *,
                method: str = "POST", key: str | None = None, api_key: str | None = None,
                headers: dict[str, str] | None = None, body: dict | bytes | None = None,
                authz_path: str | None = None) -> Answer:
    """One authorize call the way Envoy makes it: original method, /authz + path."""
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if api_key is not None:
        sent["x-api-key"] = api_key
    data = orjson.dumps(body) if isinstance(body, dict) else body
    if isinstance(body, dict):
        sent.setdefault("Content-Type", "application/json")
    url = car.url + (authz_path if authz_path is not None else "/authz" + path)
    async with http.request(method, url, headers=sent, data=data,
                            timeout=CLIENT_TIMEOUT) as resp:
        raw = await resp.read()
        return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, raw)


def avoid_minute_edge(margin_s: float = 3.0) -> None:
    """Rate windows are whole minutes: wait out the last seconds of one, so a burst
    meant for one window cannot straddle two (a wait, not a timed assertion)."""
    into = time.time() % 60
    if into > 60 - margin_s:
        time.sleep(60 - into + 0.05)


def cli(redis_url: str, *args: str, cwd=None, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    """`python -m sidecar ...` against the test Redis, with the test pepper."""
    return subprocess.run([sys.executable, "-m", "sidecar", *args],
                          env=env or sidecar_env(redis_url), cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=30)


def evalsha_calls(client) -> int:
    """How many EVALSHA commands this redis-server has run (INFO commandstats)."""
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",")
                     if "=" in part)
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in (labels or {}).items()):
            total += float(value)
    return total
