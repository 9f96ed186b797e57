"""What an authorize call asks, read from the proxy's request. Pure functions, no I/O.

Each proxy speaks differently (see docs/proxies.md): Envoy sends the original
method and `/authz<path>`; NGINX and Traefik send GET with X-Original-*/X-Forwarded-*.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import orjson

AUTHZ_PREFIX = "/authz"
READ_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
_MODEL_IN_BODY = re.compile(rb'(?<!\\)"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
_MODEL_IN_PATH = re.compile(r"/models/([^/:?#]{1,256})")
_VERSION = re.compile(r"v\d+(?:alpha|beta)?\d*")
MAX_MODEL_LEN = 256


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The original call, as permissions see it."""

    method: str
    path: str            # without the query
    scope: str           # e.g. chat.completions:write
    granting: str        # a scope that grants this one too ('' if none)
    write: bool
    anthropic: bool      # answer denials in the Anthropic error shape


def bearer_or_api_key(headers: Mapping[str, str]) -> str | None:
    """The client's key; Authorization wins over x-api-key. None when neither is sent."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            return value.strip()
        return auth.strip()  # a key without the scheme: still checked, malformed -> 401
    key = headers.get("x-api-key")
    return key.strip() if key else None


def original_call(method: str, raw_path: str, headers: Mapping[str, str]) -> tuple[str, str]:
    """(method, path with query) of the client's request behind the proxy."""
    original_method = headers.get("X-Original-Method") or headers.get("X-Forwarded-Method")
    uri = headers.get("X-Original-URI") or headers.get("X-Forwarded-Uri")
    if uri is None:
        uri = raw_path[len(AUTHZ_PREFIX):] if raw_path.startswith(AUTHZ_PREFIX) else raw_path
        uri = uri or "/"
    return (original_method or method).upper(), utf8(uri)


def utf8(text: str) -> str:
    """Text that encodes as UTF-8. aiohttp decodes header bytes that are not UTF-8 into
    lone surrogates, which no Redis command can carry: they become U+FFFD."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@lru_cache(maxsize=4096)
def classify(method: str, path: str) -> Endpoint:
    """Scope of a call: `<resource>:read|write`, resource from the path after the version.

    /v1/chat/completions -> chat.completions, /v1/models/x -> models,
    /v1beta/models/x:generateContent -> models.generateContent. A write scope also grants
    the read of the same resource.
    """
    parts = [p for p in path.split("/") if p]
    if parts and _VERSION.fullmatch(parts[0]):
        parts = parts[1:]
    resource_parts: list[str] = []
    for i, part in enumerate(parts):
        if i > 0 and parts[i - 1] in ("models", "files", "batches", "assistants", "threads",
                                       "fine_tuning", "jobs", "vector_stores", "responses"):
            # an id in the path: keep only a trailing action (models/x:generateContent)
            if ":" in part:
                resource_parts.append(part.split(":", 1)[1])
            continue
        resource_parts.append(part)
    resource = ".".join(resource_parts) or "root"
    write = method not in READ_METHODS
    scope = f"{resource}:{'write' if write else 'read'}"
    return Endpoint(method, path, scope, "" if write else f"{resource}:write", write,
                    path.startswith("/v1/messages"))


def model_of(body: bytes, headers: Mapping[str, str], path: str) -> str:
    """The model named by the call ('' for none): JSON body, then x-model, then the path."""
    return read_model(body, headers, path)[0]


def read_model(body: bytes, headers: Mapping[str, str], path: str) -> tuple[str, bool]:
    """(model, certain). JSON body first, then x-model, then the path.

    Envoy may send a truncated body (allow_partial_message): when it is not valid JSON, a
    `"model": "..."` is still read from the bytes that arrived, for attribution and cost,
    but it is *uncertain*: it may be nested, and a second "model" past the cut (the one an
    upstream parser keeps) is unseen. authorize.lua refuses uncertain models on write calls
    of whitelisted keys, so padding a body cannot smuggle a model past a whitelist.
    """
    if body:
        model, certain = None, True
        try:
            doc = orjson.loads(body)
            if isinstance(doc, dict):
                value = doc.get("model")
                model = value if isinstance(value, str) else None
        except orjson.JSONDecodeError:
            match = _MODEL_IN_BODY.search(body)
            if match:
                certain = False
                try:
                    model = orjson.loads(b'"' + match.group(1) + b'"')
                except orjson.JSONDecodeError:
                    model = None
        if model:
            return utf8(model[:MAX_MODEL_LEN]), certain
    header = headers.get("x-model")
    if header:
        return utf8(header.strip()[:MAX_MODEL_LEN]), True
    match = _MODEL_IN_PATH.search(path)
    if match:
        return match.group(1), True
    return "", True


@lru_cache(maxsize=65536)
def ip_hex(ip: str) -> str:
    """32 hex digits of the address, IPv4 mapped into IPv6 (::ffff:a.b.c.d); '' if invalid."""
    try:
        addr = ipaddress.ip_address(ip.strip().split("%", 1)[0])
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv4Address):
        return "00000000000000000000ffff" + addr.packed.hex()
    if addr.ipv4_mapped is not None:
        return "00000000000000000000ffff" + addr.ipv4_mapped.packed.hex()
    return addr.packed.hex()


def network_entry(cidr: str) -> str:
    """A key's allowed IP or CIDR in the script's form 'hex/bits'. Raises ValueError."""
    net = ipaddress.ip_network(cidr.strip(), strict=False)
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    return f"{ip_hex(str(net.network_address))}/{bits}"


class ClientIp:
    """Finds the client IP: the peer, unless the peer is a trusted proxy.

    From a trusted proxy: Envoy's x-envoy-external-address / x-client-ip, NGINX's X-Real-IP,
    else X-Forwarded-For counted from the right by `hops` (entries the trusted proxies
    appended). A client cannot pick its own IP: from an untrusted peer the headers are
    ignored, and XFF entries it prepended sit left of the ones we count.
    """

    def __init__(self, trusted: tuple, hops: int = 1):
        self._trusted = trusted
        self._hops = hops
        self.trusts = lru_cache(maxsize=4096)(self._check)

    def _check(self, peer: str) -> bool:
        if not self._trusted:
            return False
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._trusted)

    def __call__(self, peer: str | None, headers: Mapping[str, str]) -> str:
        peer = peer or ""
        if not self._trusted or not self.trusts(peer):
            return peer
        for name in ("x-envoy-external-address", "x-client-ip", "X-Real-IP"):
            value = headers.get(name)
            if value:
                return value.strip()
        xff = headers.get("X-Forwarded-For")
        if xff:
            hops = [h.strip() for h in xff.split(",") if h.strip()]
            if hops:
                return hops[-self._hops] if len(hops) >= self._hops else hops[0]
        return peer
