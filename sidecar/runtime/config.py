"""Process settings: one frozen dataclass, read from YAML then overridden by SIDECAR_* env.

Key policy (quotas, models, IPs) lives in Redis, never here. A bad value stops the process
with one line that names the field (`ConfigError`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import zoneinfo
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..schema.limits import BadThresholds, pack_thresholds, parse_thresholds
from ..schema.money import MAX_TOKENS, BadAmount, PriceList
from ..schema.webhooks import InvalidEndpoint, WebhookEndpoint, parse_endpoint

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


class Refused(RuntimeError):
    """The settings are fine but this machine refuses them (the state folder is another
    process's, a port is held, there is no store yet): one line, exit 1."""


@dataclass(frozen=True)
class Settings:
    # Redis. None: `serve` starts and supervises a private redis-server under state_dir.
    redis_url: str | None = None
    redis_timeout_ms: int = 250          # bound on every Redis call on the hot path
    redis_pool_size: int = 16            # control-plane pool (admin, CLI); hot path pipelines
    failure_mode: str = "closed"         # closed: 503 when Redis cannot answer; open: allow
    # Listeners.
    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:8081"
    grpc_listen: str | None = None       # Envoy gRPC ext_authz (Authorization/Check); off
    workers: int = 1
    keepalive_timeout_s: float = 75.0    # must exceed the proxy's upstream idle timeout
    request_timeout_s: float = 10.0      # a request begun may not pause longer than this
    request_deadline_s: float = 10.0     # ... and must arrive whole within this (408)
    max_headers: int = 100               # per request (431 past it)
    max_header_bytes: int = 32_768       # names + values, per request (431 past it)
    max_connections: int = 10_000        # data-plane connections per process, and never
                                         # above the open-file limit minus a reserve (0:
                                         # that alone)
    shutdown_timeout_s: float = 10.0     # SIGTERM: how long in-flight calls may finish
    max_body_bytes: int = 65_536         # bodies are read only this far for the model
    # Secrets and state.
    key_pepper: str | None = None        # HMAC secret; generated under state_dir when embedded
    state_dir: str | None = None         # the embedded default's store; None: state_path()
    # Who may tell us the client IP; no proxy is trusted by default.
    trusted_proxies: tuple[str, ...] = ()
    trusted_hops: int = 1                # X-Forwarded-For entries appended by trusted proxies
    # Cost of one request in quota units.
    default_cost: int = 1
    model_costs: dict[str, int] = field(default_factory=dict)
    cost_header: str | None = None       # honoured only from a trusted proxy
    # Usage settlement (POST /settle on the data plane): off until a token is set.
    settlement_token: str | None = None  # the gateway sends it as `Authorization: Bearer`
    token_costs: dict[str, int] = field(default_factory=dict)  # units per 1000 tokens
    reservation_ttl_s: int = 3600        # how long an allowed call's reservation awaits
    # Money budgets (docs/budgets.md): prices per million tokens in `currency`.
    currency: str = "USD"
    prices: dict[str, Any] = field(default_factory=dict)   # model -> {input, output, ...}
    default_price: dict[str, Any] | None = None            # for models not in prices
    budget_timezone: str = "UTC"         # where a `day` / `month` budget period turns
    default_max_output_tokens: int = 4096  # a call's output cap when its body sets none
    prompt_bytes_per_token: int = 2      # prompt tokens reserved = body bytes / this
    expired_reservation: str = "charge"  # unsettled past the ttl: charge | release it
    concurrency_retry_after_s: int = 1   # Retry-After of a concurrency_limited 429
    # Alerts and usage history (docs/usage.md): the fractions of quota or budget left
    # that raise quota.* / budget.* events where a key or level sets none ([] none), and
    # the days of daily usage buckets kept (hourly ones: 48 h; 0 keeps no history).
    alert_thresholds: tuple[str, ...] = ("0.2", "0.05", "0")
    usage_retention_days: int = 90
    # How often one sidecar of the deployment counts the keys at or below each of
    # alert_thresholds, for sidecar_keys_below_threshold (runtime/census.py).
    threshold_census_interval_s: float = 300.0
    log_level: str = "info"
    # Webhooks (docs/webhooks.md): global endpoints, each {url, secret, events}; an
    # organization adds its own through the admin API.
    webhooks: tuple[WebhookEndpoint, ...] = ()
    webhook_timeout_s: float = 10.0        # one delivery attempt
    webhook_retry_window_s: float = 86_400.0   # retries end this long after the event
    webhook_backoff_s: float = 1.0         # first retry delay; doubles, with jitter
    webhook_backoff_max_s: float = 600.0   # longest delay between two attempts
    # Non-public networks an organization's endpoints may reach (its admins choose the
    # URLs): none by default. The endpoints of `webhooks:` above may reach anything.
    webhook_allowed_networks: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never print the pepper or Redis credentials
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["key_pepper"] = "***" if self.key_pepper else None
        shown["settlement_token"] = "***" if self.settlement_token else None
        if self.redis_url:
            shown["redis_url"] = mask_url(self.redis_url)
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    def default_thresholds(self) -> str:
        """alert_thresholds in the scripts' form (schema/limits.pack_thresholds)."""
        return pack_thresholds(parse_thresholds(",".join(self.alert_thresholds)))

    def webhook_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False)
                     for n in self.webhook_allowed_networks)

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_proxies)


APP = "llm-key-sidecar"


def default_state_dir(env: dict[str, str] | None = None, uid: int | None = None) -> Path:
    """Where the embedded default keeps its store unless state_dir says otherwise: the same
    folder whatever the current directory, so `serve` and the CLI always agree.
    $XDG_STATE_HOME/llm-key-sidecar when set; else /var/lib/llm-key-sidecar for root and
    ~/.local/state/llm-key-sidecar for everyone else."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():   # the XDG spec: a relative value is ignored
        return Path(xdg) / APP
    if (os.geteuid() if uid is None else uid) == 0:
        return Path("/var/lib") / APP
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / APP


def state_path(settings: Settings) -> Path:
    """The state folder in use: state_dir (made absolute when loaded), or the default."""
    return Path(settings.state_dir) if settings.state_dir else default_state_dir()


def absolute_dir(path: str, base: Path) -> str:
    """`path` (~ expanded) as an absolute path, a relative one taken from `base`."""
    return str((base / Path(path).expanduser()).absolute())


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(":" + parts.password + "@", ":***@", 1)
    return url


def parse_hostport(value: str, name: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


_ENV_PREFIX = "SIDECAR_"


def load_settings(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read the YAML file (`path`, else $SIDECAR_CONFIG, else none: the current directory
    is never searched), apply SIDECAR_* overrides, validate. Raises ConfigError.
    A relative state_dir is taken from the file's folder (from the current one when it
    comes from the environment), so it names one folder wherever the command runs."""
    env = dict(os.environ if env is None else env)
    raw: dict[str, Any] = {}
    chosen = Path(path) if path else Path(env["SIDECAR_CONFIG"]) if env.get(
        "SIDECAR_CONFIG") else None
    if chosen is not None:
        try:
            loaded = yaml.safe_load(chosen.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"config file {chosen}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {chosen}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {chosen}: expected a mapping of settings")
        raw.update(loaded)
        if isinstance(raw.get("state_dir"), str) and raw["state_dir"]:
            raw["state_dir"] = absolute_dir(raw["state_dir"], chosen.parent)
    known = {f.name: f for f in fields(Settings)}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{name}: unknown setting in {chosen}")
    for name in known:
        value = env.get(_ENV_PREFIX + name.upper())
        if value is not None:
            raw[name] = value
    if env.get("SIDECAR_STATE_DIR"):
        raw["state_dir"] = absolute_dir(env["SIDECAR_STATE_DIR"], Path.cwd())
    return validate(Settings(**{k: _coerce(k, v, known[k].type) for k, v in raw.items()}))


def _coerce(name: str, value: Any, typ: Any) -> Any:  # noqa: C901 — one branch per setting type
    typ = str(typ)
    if typ.startswith("tuple[WebhookEndpoint"):   # its own errors: never echo a secret
        return _endpoints(value)
    try:
        if value is None:
            return None
        if typ.startswith("dict[str, Any]"):   # nested mappings (prices): YAML or JSON text
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        if typ.startswith("int"):
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError  # YAML `true` or `2.5` is no count: int() would truncate
            return int(value)
        if typ.startswith("float"):
            return float(value)
        if typ.startswith("tuple"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list | tuple):
                raise ValueError
            return tuple(str(v) for v in value)
        if typ.startswith("dict"):
            if isinstance(value, str):
                value = dict(_pair(p) for p in value.split(",") if p.strip())
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): int(v) for k, v in value.items()}
        if typ.startswith("str"):
            if isinstance(value, dict | list):
                raise ValueError
            text = str(value)
            return text if text != "" else None if "None" in typ else text
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {typ}") from None
    return value


def _endpoints(value: Any) -> tuple[WebhookEndpoint, ...]:
    """The `webhooks:` list (SIDECAR_WEBHOOKS: the same list as JSON)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError("webhooks: not a valid JSON/YAML list") from None
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ConfigError("webhooks: must be a list of {url, secret, events}")
    try:
        found = tuple(parse_endpoint(raw, f"webhooks[{i}]") for i, raw in enumerate(value))
    except InvalidEndpoint as exc:
        raise ConfigError(str(exc)) from None
    if len({e.ref for e in found}) < len(found):
        raise ConfigError("webhooks: the same url is listed twice")
    return found


def _pair(item: str) -> tuple[str, str]:
    model, sep, cost = item.partition("=")
    if not sep:
        raise ValueError(item)
    return model.strip(), cost.strip()


def validate(s: Settings) -> Settings:  # noqa: C901 — a flat list, one check per setting
    if s.redis_url is not None:
        scheme = urlsplit(s.redis_url).scheme
        if scheme not in REDIS_SCHEMES:
            raise ConfigError(
                f"redis_url: scheme {scheme!r} not one of {', '.join(REDIS_SCHEMES)}")
    if s.redis_timeout_ms <= 0 or s.redis_timeout_ms > 60_000:
        raise ConfigError("redis_timeout_ms: must be between 1 and 60000")
    if s.redis_pool_size < 1:
        raise ConfigError("redis_pool_size: must be at least 1")
    if s.failure_mode not in ("closed", "open"):
        raise ConfigError("failure_mode: must be 'closed' or 'open'")
    parse_hostport(s.listen, "listen")
    parse_hostport(s.admin_listen, "admin_listen")
    if s.grpc_listen is not None:
        parse_hostport(s.grpc_listen, "grpc_listen")
    if not 1 <= s.workers <= 256:
        raise ConfigError("workers: must be between 1 and 256")
    if s.keepalive_timeout_s <= 0:
        raise ConfigError("keepalive_timeout_s: must be positive")
    if not 0 < s.request_timeout_s <= 3600:
        raise ConfigError("request_timeout_s: must be between 0 and 3600 (exclusive of 0)")
    if not 0 < s.request_deadline_s <= 3600:
        raise ConfigError("request_deadline_s: must be between 0 and 3600 (exclusive of 0)")
    if not 1 <= s.max_headers <= 10_000:
        raise ConfigError("max_headers: must be between 1 and 10000")
    if not 1024 <= s.max_header_bytes <= 1_048_576:
        raise ConfigError("max_header_bytes: must be between 1024 and 1048576")
    if not 0 <= s.max_connections <= 1_000_000:
        raise ConfigError("max_connections: must be between 0 (from the open-file limit) "
                          "and 1000000")
    if s.shutdown_timeout_s < 0:
        raise ConfigError("shutdown_timeout_s: must not be negative")
    if not 0 <= s.max_body_bytes <= 1_048_576:
        raise ConfigError("max_body_bytes: must be between 0 and 1048576")
    if s.key_pepper is not None and len(s.key_pepper) < 16:
        raise ConfigError("key_pepper: must be at least 16 characters")
    if not s.embedded_redis and not s.key_pepper:
        raise ConfigError("key_pepper: required when redis_url is set (SIDECAR_KEY_PEPPER)")
    for net in s.trusted_proxies:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_proxies: {net!r} is not an IP or CIDR") from None
    if s.trusted_hops < 1:
        raise ConfigError("trusted_hops: must be at least 1")
    if s.default_cost < 0:
        raise ConfigError("default_cost: must not be negative")
    if any(c < 0 for c in s.model_costs.values()):
        raise ConfigError("model_costs: costs must not be negative")
    if s.settlement_token is not None and len(s.settlement_token) < 16:
        raise ConfigError("settlement_token: must be at least 16 characters")
    if not 1 <= s.reservation_ttl_s <= 604_800:
        raise ConfigError("reservation_ttl_s: must be between 1 and 604800 (a week)")
    if any(c < 0 for c in s.token_costs.values()):
        raise ConfigError("token_costs: units per 1000 tokens must not be negative")
    _validate_webhooks(s)
    _validate_money(s)
    _validate_alerts(s)
    if s.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level: one of debug, info, warning, error")
    return s


def _validate_webhooks(s: Settings) -> None:
    for net in s.webhook_allowed_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"webhook_allowed_networks: {net!r} is not an IP or "
                              "CIDR") from None
    if not 0 < s.webhook_timeout_s <= 300:
        raise ConfigError("webhook_timeout_s: must be between 0 and 300 (exclusive of 0)")
    if not 0 <= s.webhook_retry_window_s <= 30 * 86_400:
        raise ConfigError("webhook_retry_window_s: must be between 0 and 2592000 (30 days)")
    if not 0 < s.webhook_backoff_s <= s.webhook_backoff_max_s:
        raise ConfigError("webhook_backoff_s: must be positive and at most "
                          "webhook_backoff_max_s")


def _validate_money(s: Settings) -> None:
    try:
        PriceList.parse(s.prices, s.default_price)
    except BadAmount as exc:
        raise ConfigError(str(exc)) from None
    if not re.fullmatch(r"[A-Z]{3}", s.currency):
        raise ConfigError("currency: a three-letter ISO 4217 code such as USD")
    try:
        zoneinfo.ZoneInfo(s.budget_timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"budget_timezone: {s.budget_timezone!r} is not a time zone "
                          "(e.g. UTC, Europe/Paris)") from None
    if not 1 <= s.default_max_output_tokens <= MAX_TOKENS:
        raise ConfigError(f"default_max_output_tokens: must be between 1 and {MAX_TOKENS}")
    if not 1 <= s.prompt_bytes_per_token <= 16:
        raise ConfigError("prompt_bytes_per_token: must be between 1 and 16")
    if s.expired_reservation not in ("charge", "release"):
        raise ConfigError("expired_reservation: 'charge' or 'release'")
    if not 1 <= s.concurrency_retry_after_s <= 3600:
        raise ConfigError("concurrency_retry_after_s: must be between 1 and 3600")


def _validate_alerts(s: Settings) -> None:
    try:
        parse_thresholds(",".join(s.alert_thresholds))
    except BadThresholds as exc:
        raise ConfigError("alert_" + str(exc)) from None
    if not 0 <= s.usage_retention_days <= 3660:
        raise ConfigError("usage_retention_days: must be between 0 (none) and 3660")
    if not 1 <= s.threshold_census_interval_s <= 86_400:
        raise ConfigError("threshold_census_interval_s: must be between 1 and 86400 (a day)")


def price_list(s: Settings) -> PriceList:
    """The settings' prices (validated when the settings were loaded)."""
    return PriceList.parse(s.prices, s.default_price)


def with_overrides(s: Settings, **changes: Any) -> Settings:
    return validate(replace(s, **changes))
