"""Webhook endpoints and signatures, the Standard Webhooks way. Pure: no I/O.

A delivery carries three headers:
  webhook-id         the event id (the same on every retry and replay: dedupe on it)
  webhook-timestamp  integer Unix seconds of this attempt
  webhook-signature  `v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>`
where key is the secret `whsec_<base64>` without its prefix, base64-decoded.

An endpoint URL is checked when it is configured (config file or admin API), not when
something is sent: http or https, a host, no user:password (it would end up in logs and
error messages), at most 2048 characters. Logs show `shown_url` (no query: query strings
often carry tokens); a secret is never shown.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from .events import TYPES

SECRET_PREFIX = "whsec_"
MAX_URL = 2048
SECRET_BYTES = (24, 64)          # the spec's recommended key size, in bytes


class InvalidEndpoint(ValueError):
    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class WebhookEndpoint:
    """Where events go: a configured (global) endpoint, or one of an organization."""
    ref: str                       # cfg_... (endpoint_ref of the URL) or the wh_ id
    url: str
    secret: str
    events: tuple[str, ...] = ()   # empty: every type
    org: str | None = None         # None: global (every organization's events)

    def __repr__(self) -> str:     # never the secret, never the query
        return (f"WebhookEndpoint({self.ref}, {shown_url(self.url)}, "
                f"events={list(self.events)})")

    def wants(self, event_type: str, org: str | None) -> bool:
        return (not self.events or event_type in self.events) and (
            self.org is None or self.org == org)


def parse_endpoint(raw: object, field: str = "webhooks") -> WebhookEndpoint:
    """One entry of the config's `webhooks:` list: {url, secret, events}."""
    if not isinstance(raw, dict):
        raise InvalidEndpoint(field, "each entry must be a mapping {url, secret, events}")
    unknown = sorted(set(raw) - {"url", "secret", "events"})
    if unknown:
        raise InvalidEndpoint(field, f"unknown field {unknown[0]!r} (url, secret, events)")
    url = check_url(raw.get("url"), field + ".url")
    secret = check_secret(raw.get("secret"), field + ".secret")
    return WebhookEndpoint(endpoint_ref(url), url, secret,
                    check_events(raw.get("events"), field + ".events"))


def check_url(url: object, field: str = "url") -> str:
    if not isinstance(url, str) or not url:
        raise InvalidEndpoint(field, "must be a non-empty string")
    if len(url) > MAX_URL or any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidEndpoint(field, f"must be at most {MAX_URL} characters, no spaces")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise InvalidEndpoint(field, "is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidEndpoint(field, "must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise InvalidEndpoint(field, "must not carry credentials (user:password@); "
                                     "receivers check the signature instead")
    if not parts.hostname:
        raise InvalidEndpoint(field, "has no host")
    if parts.fragment:
        raise InvalidEndpoint(field, "must not have a #fragment")
    return url


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def blocked_address(address: str, allowed: Networks = ()) -> bool:
    """Whether an organization's endpoint may not be reached at this address: anything
    but a public (global) one, unless the operator allowed its network. An organization
    admin must not make the sidecar POST into its own network (loopback, the admin
    listener, cloud metadata at 169.254.169.254, private ranges)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed):
        return False
    return not ip.is_global or ip.is_multicast


def check_reachable(url: str, allowed: Networks = (), field: str = "url") -> str:
    """At configuration: an organization's URL naming a host it may not reach by its
    address (an IP, localhost) is refused now; names are checked again when resolved."""
    host = urlsplit(url).hostname or ""
    literal = host.strip("[]")
    try:
        ipaddress.ip_address(literal.split("%", 1)[0])
    except ValueError:
        literal = "127.0.0.1" if host == "localhost" or host.endswith(".localhost") else ""
    if literal and blocked_address(literal, allowed):
        raise InvalidEndpoint(field, "must reach a public address (loopback, private, "
                                     "link-local and reserved ones are refused unless "
                                     "webhook_allowed_networks names them)")
    return url


def shown_url(url: str) -> str:
    """The URL for logs and listings: scheme, host, port and path; no query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret (checked by check_secret)."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)


def check_secret(secret: object, field: str = "secret") -> str:
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise InvalidEndpoint(field, f"must be {SECRET_PREFIX}<base64>")
    try:
        key = secret_key(secret)
    except (binascii.Error, ValueError):
        raise InvalidEndpoint(field, f"must be {SECRET_PREFIX}<base64>") from None
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise InvalidEndpoint(field, f"must hold {low} to {high} bytes, base64-encoded")
    return secret


def check_events(events: object, field: str = "events") -> tuple[str, ...]:
    """The event types an endpoint receives; empty or ['*']: all of them."""
    if events is None:
        return ()
    if not isinstance(events, list | tuple) or not all(isinstance(e, str) for e in events):
        raise InvalidEndpoint(field, "must be a list of event types")
    if list(events) == ["*"]:
        return ()
    unknown = [e for e in events if e not in TYPES]
    if unknown:
        raise InvalidEndpoint(field, f"unknown event type {unknown[0]!r} (one of "
                                     f"{', '.join(TYPES)}, or '*')")
    return tuple(dict.fromkeys(events))


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature value of one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, msg_id: str, timestamp: int, body: bytes, header: str) -> bool:
    """What a receiver checks: one of the space-separated signatures matches."""
    expected = sign(secret, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, given) for given in header.split())


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {"content-type": "application/json", "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body)}


def endpoint_ref(url: str) -> str:
    """The ref of a configured (global) endpoint: stable while its URL is unchanged;
    an organization's endpoints are referred to by their id (wh_...)."""
    return "cfg_" + hashlib.sha256(url.encode()).hexdigest()[:16]
