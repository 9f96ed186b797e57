"""Webhook signatures (Standard Webhooks), endpoint checks and the retry backoff: pure."""

from __future__ import annotations

import random

import pytest

from sidecar.runtime.webhooks import backoff_delay
from sidecar.schema import events
from sidecar.schema.webhooks import (
    InvalidEndpoint,
    blocked_address,
    check_events,
    check_reachable,
    check_secret,
    check_url,
    endpoint_ref,
    headers,
    new_secret,
    parse_endpoint,
    shown_url,
    sign,
    verify,
)

# The Standard Webhooks specification's own test vector.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID, SPEC_TS = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
SPEC_BODY = b'{"test": 2432232314}'


def test_the_specification_vector():
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
    sent = headers(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY)
    assert sent["webhook-id"] == SPEC_ID and sent["webhook-timestamp"] == str(SPEC_TS)
    assert verify(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY,
                  "v1,bm90IGl0 " + sent["webhook-signature"])
    assert not verify(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY + b" ",
                      sent["webhook-signature"])
    assert not verify(new_secret(), SPEC_ID, SPEC_TS, SPEC_BODY, sent["webhook-signature"])


def test_secrets():
    assert check_secret(new_secret()) and check_secret(SPEC_SECRET)
    for bad in (None, "", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_***", "whsec_c2hvcnQ=",
                "whsec_" + "QUFB" * 30):
        with pytest.raises(InvalidEndpoint):
            check_secret(bad)


@pytest.mark.parametrize("url", ["https://alerts.example.com/hook?t=1",
                                 "http://127.0.0.1:9000/", "https://[::1]:8443/x"])
def test_good_urls(url):
    assert check_url(url) == url


@pytest.mark.parametrize("url", ["", "ftp://example.com/", "file:///etc/passwd",
                                 "https://user:pw@example.com/", "https://user@example.com/",
                                 "https:///path", "https://example.com/#frag",
                                 "https://example.com:99999/", "https://exa mple.com/",
                                 "javascript:alert(1)", "https://example.com/" + "a" * 2100,
                                 5, None])
def test_bad_urls(url):
    with pytest.raises(InvalidEndpoint) as err:
        check_url(url)
    assert err.value.field == "url"


def test_shown_url_drops_the_query():
    assert shown_url("https://h.example:8443/p/q?token=abc") == "https://h.example:8443/p/q"


def test_events_filter():
    assert check_events(None) == () and check_events(["*"]) == ()
    assert check_events(["quota.low", "quota.low", "key.disabled"]) == (
        "quota.low", "key.disabled")
    for bad in ("quota.low", ["quota.gone"], [1]):
        with pytest.raises(InvalidEndpoint):
            check_events(bad)


def test_a_configured_endpoint_never_shows_its_secret():
    ep = parse_endpoint({"url": "https://h.example/x?k=v", "secret": SPEC_SECRET,
                         "events": ["quota.low"]})
    assert ep.ref == endpoint_ref("https://h.example/x?k=v")
    assert SPEC_SECRET not in repr(ep) and "k=v" not in repr(ep)
    assert ep.wants("quota.low", "org_a") and not ep.wants("key.disabled", "org_a")
    with pytest.raises(InvalidEndpoint):
        parse_endpoint({"url": "https://h.example/", "secret": SPEC_SECRET, "extra": 1})


def test_backoff_doubles_with_jitter_up_to_the_cap():
    rand = random.Random(7)
    for attempt in range(1, 30):
        ceiling = min(60.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(20):
            delay = backoff_delay(attempt, 0.5, 60.0, rand)
            assert ceiling / 2 <= delay <= ceiling
    assert backoff_delay(10_000, 1.0, 600.0, rand) <= 600.0
    spread = {round(backoff_delay(5, 1.0, 600.0, rand), 6) for _ in range(50)}
    assert len(spread) > 40            # jitter: retries of many events spread out


def test_event_entries_and_payload():
    fields = {"t": "quota.low", "k": "key_1", "o": "org_1", "p": "prj_1", "l": "k",
              "th": "0.2", "r": "19", "lim": "100"}
    ev = events.from_entry("abc", "1733000000000-0", fields)
    assert ev.id == "evt_abc_1733000000000-0" and events.valid_id(ev.id)
    body = events.payload(ev)
    assert body == {"id": ev.id, "object": "event", "type": "quota.low",
                    "occurred_at": "2024-11-30T20:53:20.000Z",
                    "data": {"key_id": "key_1", "organization_id": "org_1",
                             "project_id": "prj_1", "level": "key", "threshold": 0.2,
                             "remaining": 19, "limit": 100, "reason": None}}
    assert events.from_entry("abc", "1-0", {"t": "no.such"}) is None
    made = events.entry("key.disabled", key_id="key_1", reason="disabled by cli")
    assert made["t"] == "key.disabled" and events.valid_id(made["id"]) and "o" not in made
    with pytest.raises(ValueError):
        events.entry("quota.gone")


def test_webhooks_settings_are_checked_at_start_without_echoing_a_secret():
    from sidecar.runtime.config import ConfigError, load_settings
    secret = new_secret()
    good = load_settings(env={"SIDECAR_WEBHOOKS": f'[{{"url": "https://h.example/x", '
                                                  f'"secret": "{secret}"}}]'})
    assert [e.url for e in good.webhooks] == ["https://h.example/x"]
    assert secret not in repr(good)
    for raw, field in (('[{"url": "gopher://h/", "secret": "S"}]', "webhooks[0].url"),
                       ('[{"url": "https://a:b@h/", "secret": "S"}]', "webhooks[0].url"),
                       ('[{"url": "https://h/", "secret": "whsec_bad"}]',
                        "webhooks[0].secret"),
                       ('{"url": "https://h/"}', "webhooks"), ("[5]", "webhooks[0]"),
                       ('[{"url": "https://h/", "secret": "S", "events": ["x"]}]',
                        "webhooks[0].events")):
        with pytest.raises(ConfigError) as err:
            load_settings(env={"SIDECAR_WEBHOOKS": raw.replace('"S"', f'"{secret}"')})
        assert str(err.value).startswith(field + ":") and secret not in str(err.value)
    with pytest.raises(ConfigError, match="webhook_backoff_s"):
        load_settings(env={"SIDECAR_WEBHOOK_BACKOFF_S": "0"})


def test_an_organizations_endpoint_reaches_public_addresses_only():
    import ipaddress
    for address in ("127.0.0.1", "10.0.0.5", "172.16.1.1", "192.168.1.1", "169.254.169.254",
                    "100.64.0.1", "0.0.0.0", "::1", "fe80::1%eth0", "fc00::1",
                    "::ffff:127.0.0.1", "224.0.0.1", "not-an-ip"):
        assert blocked_address(address), address
    for address in ("93.184.215.14", "2606:4700::1111", "::ffff:8.8.8.8"):
        assert not blocked_address(address), address
    lab = (ipaddress.ip_network("10.20.0.0/16"),)
    assert not blocked_address("10.20.3.4", lab) and blocked_address("10.21.0.1", lab)
    for url in ("http://127.0.0.1:8081/", "http://localhost/x", "http://a.localhost/",
                "https://[::1]/", "http://169.254.169.254/latest"):
        with pytest.raises(InvalidEndpoint):
            check_reachable(url)
    assert check_reachable("https://hooks.example.com/x")   # names: checked when resolved
    assert check_reachable("http://10.20.0.9/", lab)
