"""What an authorize call asks, read from the proxy's request. Pure functions, no I/O.

Each proxy speaks differently (see docs/proxies.md): Envoy sends the original
method and `/authz<path>`; NGINX and Traefik send GET with X-Original-*/X-Forwarded-*.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import orjson

AUTHZ_PREFIX = "/authz"
READ_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
_MODEL_IN_BODY = re.compile(rb'(?<!\\)"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
_MODEL_IN_PATH = re.compile(r"/models/([^/:?#]{1,257})")   # 257: longer is refused
# "model" spelled with an escape (\u006d = 'm' ... \u006c = 'l'): every letter is \u006X.
_ESCAPED_LETTER = b"\\u006"
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


def original_call(method: str, raw_path: str, headers: Mapping[str, str],
                  trusted: bool) -> tuple[str, str]:
    """(method, path with query) of the client's request behind the proxy.

    X-Original-Method / X-Forwarded-Method and X-Original-URI / X-Forwarded-Uri count only
    from a trusted proxy (`trusted`: the peer is in trusted_proxies). From anyone else the
    request line is the call: a client cannot call its POST a GET.
    """
    original_method = uri = None
    if trusted:
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


def model_of(body: bytes, path: str, relayed: str | None = None) -> str:
    """The model named by the call ('' for none); see read_model."""
    return read_model(body, path, relayed)[0]


def read_model(body: bytes, path: str, relayed: str | None = None,
               whole: bool = True) -> tuple[str, bool]:
    """(model, certain): the model the upstream will serve, and whether we can be sure.

    The rule (README, "How a call is decided"):
    1. The model is the first named of: the path (`/v1beta/models/<m>:generateContent`,
       `/v1/models/<m>`), the JSON body's top-level "model", the x-model header. The
       path wins because it is what the upstream serves, whatever the body or a header
       says. `relayed` is x-model as a *trusted proxy* sent it (None from anyone else):
       NGINX's njs reads the body the sidecar never sees and relays its model there.
    2. The model is certain only when
       - every source that names a model names the same one;
       - a body that was sent could be read whole (`whole`: not cut off at max_body_bytes
         or by Envoy, not compressed) as a JSON object with at most one top-level
         "model", and that "model", if present, is a non-empty string. Not JSON, a cut,
         multipart, `NaN`, two "model" keys (parsers disagree on which one counts): what
         the upstream reads is unknown. A model is still read from such bytes, for
         attribution and cost, but uncertain;
       - it is not taken from x-model while the body was sent (the header stands in for
         a body the proxy could not send, not for a model the body leaves out);
       - the path names one plain model (no %-escape, no dot segment, which an upstream
         may decode or normalise into another).
    authorize.lua refuses an uncertain model on write calls of keys with a model
    whitelist (model_not_allowed); other keys are unaffected.
    """
    in_path, certain = _path_model(path) if "/models/" in path else ("", True)
    in_body = ""
    if body:
        if whole:
            in_body, readable = _body_model(body)
        else:
            in_body, readable = _scanned_model(body), False
        if not readable:
            certain = False
    if relayed:
        relayed = relayed.strip()
    if in_path:
        model = in_path
        if in_body and in_body != model or relayed and relayed != model:
            certain = False
    elif in_body:
        model = in_body
        if relayed and relayed != model:
            certain = False
    elif relayed:
        model = relayed
        if body:   # x-model stands in for a body the proxy could not send, not this one
            certain = False
    else:
        return "", certain
    if len(model) > MAX_MODEL_LEN:   # a prefix could equal a listed name
        model, certain = model[:MAX_MODEL_LEN], False
    return utf8(model), certain


def body_is_whole(truncated: bool, headers: Mapping[str, str]) -> bool:
    """The body as the upstream gets it, all of it: not cut at max_body_bytes or by Envoy
    (x-envoy-auth-partial-body; believed from anyone, it can only make a model uncertain),
    not compressed."""
    return not truncated \
        and headers.get("content-encoding", "identity").lower() == "identity" \
        and headers.get("x-envoy-auth-partial-body", "false").lower() != "true"


def _path_model(path: str) -> tuple[str, bool]:
    found = _MODEL_IN_PATH.findall(path)
    if not found:
        return "", True
    return found[0], len(found) == 1 and "%" not in path and "/." not in path


NOT_JSON = object()
_last_parsed: list = [b"", NOT_JSON]     # [body, its document]


def json_doc(body: bytes) -> object:
    """orjson.loads(body), or NOT_JSON. The last body's document is kept (by identity):
    the model rule and the spend estimate read the same body in one call, and it is
    parsed once (profile: the second parse was ~1 µs a call). Callers never mutate it."""
    last = _last_parsed
    if body is last[0]:
        return last[1]
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = NOT_JSON
    last[0], last[1] = body, doc
    return doc


def _body_model(body: bytes) -> tuple[str, bool]:
    """(top-level "model" or '', readable) of a whole body."""
    doc = json_doc(body)
    if doc is NOT_JSON:
        return _scanned_model(body), False
    if not isinstance(doc, dict):
        return "", False
    value = doc.get("model")
    if value is None:
        return "", "model" not in doc          # "model": null is no name we can check
    if not isinstance(value, str) or not value:
        return "", False
    # orjson keeps the last of repeated keys; some upstream parsers keep the first. Only a
    # body that may hold a second one is parsed again: "model" twice in the text, or an
    # escape that spells one of its letters (a memchr for '\\' first: most bodies have
    # none, and the rest pay a second scan).
    if (body.count(b'"model"') > 1 or b"\\" in body and _ESCAPED_LETTER in body) \
            and _model_keys(body) != 1:
        return value, False
    return value, True


def _scanned_model(body: bytes) -> str:
    """A `"model": "..."` found in bytes that are not a JSON document (for attribution)."""
    match = _MODEL_IN_BODY.search(body)
    if not match:
        return ""
    try:
        found = orjson.loads(b'"' + match.group(1) + b'"')
    except orjson.JSONDecodeError:
        return ""
    return found if isinstance(found, str) else ""


def _model_keys(body: bytes) -> int:
    """How many top-level keys of a JSON object body decode to "model"."""
    try:
        pairs = json.loads(body, object_pairs_hook=_as_pairs)
    except (ValueError, RecursionError):
        return -1
    return sum(1 for name, _ in pairs if name == "model")


def _as_pairs(pairs: list) -> list:
    return pairs


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

    def __call__(self, peer: str | None, headers: Mapping[str, str],
                 trusted: bool | None = None) -> str:
        """`trusted`: trusts(peer), when the caller has it already."""
        peer = peer or ""
        if not (self.trusts(peer) if trusted is None else trusted):
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
