"""KeyRecord: the one place the record's short field names are read and written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.control.key_spec import InvalidKeySpec, KeySpec, validate_spec
from sidecar.schema.keys import TYPE_CODE, KeyType
from sidecar.schema.record import FIELD, PERMISSIONS, READ_ONLY, KeyRecord

STORED = {"id": "key_1", "t": "b", "st": "a", "nm": "n", "ca": "5", "cb": "cli", "ex": "0",
          "ul": "0", "qr": "7", "qu": "0", "pm": "r", "sc": ",keys:read,", "m": ",a,b,",
          "ips": "00/128,ff/64", "cq": "10", "cu": "2", "ce": "99", "cp": "86400000",
          "pg": "1", "ow": "org_1:acct", "org": "org_1", "sub": "sub_1",
          "ra": "123456", "td": "9"}     # fields KeyRecord does not name (GCRA state)


def test_a_stored_record_reads_by_name_and_writes_back_unchanged():
    rec = KeyRecord.from_hash({k.encode(): v.encode() for k, v in STORED.items()})
    assert (rec.type, rec.active, rec.permission) == (KeyType.subscription, True, "restricted")
    assert (rec.quota_remaining, rec.scopes, rec.models) == (7, ["keys:read"], ["a", "b"])
    assert (rec.networks, rec.payg_fallback, rec.wallet) == (["00/128", "ff/64"], True,
                                                             "org_1:acct")
    assert rec.extra == {"ra": "123456", "td": "9"}
    assert rec.to_hash() == STORED


def test_absent_fields_stay_absent():
    rec = KeyRecord.from_hash({"id": "key_2", "t": "s", "st": "d"})
    assert (rec.active, rec.permission, rec.quota_remaining, rec.scopes) == (False, "all",
                                                                             None, [])
    assert rec.to_hash() == {"id": "key_2", "t": "s", "st": "d", "pm": "a"}


def test_partial_writes_name_their_fields():
    assert KeyRecord.fields(active=False, disabled_reason="rotated", expires_ms=5,
                            unlimited=True) == {"st": "d", "dr": "rotated", "ex": "5",
                                                "ul": "1"}
    assert KeyRecord.fields(permission=READ_ONLY, scopes=[]) == {"pm": "ro", "sc": ""}
    assert len(set(FIELD.values())) == len(FIELD)        # one attribute per field


def test_the_code_maps_are_the_schema_ones():
    for typ, code in TYPE_CODE.items():
        assert KeyRecord.from_hash({"t": code}).type is typ
    for word, code in PERMISSIONS.items():
        assert KeyRecord.from_hash({"pm": code}).permission == word
        assert KeyRecord.fields(permission=word) == {"pm": code}


@given(st.sampled_from(list(KeyType)), st.text(max_size=200).filter(lambda s: "\x00" not in s),
       st.integers(0, 10**12), st.booleans(), st.integers(0, 10**12))
def test_a_validated_spec_survives_a_round_trip(typ, name, quota, unlimited, rpm):
    spec = KeySpec(type=typ, name=name, quota=None if unlimited else quota,
                   unlimited=unlimited, rpm=rpm, models=["gpt-4o"], ips=["10.0.0.0/8"],
                   expires_at=datetime.now(UTC) + timedelta(days=1))
    rec = validate_spec(spec)
    assert KeyRecord.from_hash(rec.to_hash()) == rec


def test_bad_settings_name_their_field():
    for spec, field in ((KeySpec(name="x" * 201), "name"), (KeySpec(quota=-1), "quota"),
                        (KeySpec(cycle_days=0), "cycle_days"),
                        (KeySpec(models=["a,b"]), "models"), (KeySpec(ips=["nope"]), "ips"),
                        (KeySpec(permission="some"), "permission"),
                        (KeySpec(account="a:b"), "account")):
        with pytest.raises(InvalidKeySpec) as caught:
            validate_spec(spec)
        assert caught.value.field == field and str(caught.value).startswith(field + ": ")
