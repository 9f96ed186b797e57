"""The event streams on a real redis-server (issue 12): what the control plane writes,
the active-tags set, retire_tag.lua's rule, and the dead letters' round trip."""

from __future__ import annotations

from sidecar.control import events as control_events
from sidecar.redis.runner import run_script
from sidecar.schema import events, names
from sidecar.schema.contracts import RetireTagArgs, RetireTagReply
from sidecar.schema.scripts import RETIRE_TAG


async def retire(aredis, tag: str, score: float) -> int:
    call = RetireTagArgs(names.EVENTS_ACTIVE, tag, repr(score))
    return RetireTagReply.parse(await run_script(aredis, RETIRE_TAG, call.keys(),
                                                 call.argv())).removed


async def test_emit_appends_to_the_tags_stream_and_bumps_the_tag(aredis):
    fields = events.entry("key.disabled", key_id="key_1", org="org_1", reason="r")
    entry = await control_events.emit(aredis, "abc", fields)
    assert await aredis.xlen(names.events("abc")) == 1
    assert await aredis.zscore(names.EVENTS_ACTIVE, "abc") == 1
    await control_events.emit(aredis, "abc", events.entry("key.disabled"))
    assert await aredis.zscore(names.EVENTS_ACTIVE, "abc") == 2
    (_, raw), = await aredis.xrange(names.events("abc"), entry, entry)
    read = events.from_entry("abc", entry, {k.decode(): v.decode() for k, v in raw.items()})
    assert read.id == fields["id"] and read.org == "org_1" and read.target is None


async def test_a_tag_is_retired_only_if_nothing_was_written_since(aredis):
    await control_events.emit(aredis, "abc", events.entry("key.disabled"))
    seen = await aredis.zscore(names.EVENTS_ACTIVE, "abc")
    await control_events.emit(aredis, "abc", events.entry("key.disabled"))  # a write since
    assert await retire(aredis, "abc", seen) == 0
    assert await aredis.zscore(names.EVENTS_ACTIVE, "abc") == seen + 1
    assert await retire(aredis, "abc", seen + 1) == 1
    assert await aredis.zscore(names.EVENTS_ACTIVE, "abc") is None
    assert await retire(aredis, "abc", seen + 1) == 0          # gone already: no error


async def test_dead_letters_list_and_replay_to_their_one_endpoint(aredis):
    fields = events.entry("key.disabled", key_id="key_1", at_ms=1_700_000_000_000)
    event = events.from_entry("abc", "1-0", fields)
    for endpoint in ("cfg_a", "wh_b"):
        await control_events.add_dead_letter(aredis, event, endpoint, "https://h/x", 3,
                                             "HTTP 500")
    letters = await control_events.dead_letters(aredis)
    assert [(d["event_id"], d["endpoint"], d["attempts"]) for d in letters] == [
        (event.id, "cfg_a", 3), (event.id, "wh_b", 3)]
    assert await control_events.replay(aredis, "evt_other") == []
    done = await control_events.replay(aredis, event.id)
    assert len(done) == 2 and await control_events.dead_letters(aredis) == []
    queued = await aredis.xrange(names.events("abc"))
    back = [events.from_entry("abc", i.decode(), {k.decode(): v.decode()
                                                  for k, v in raw.items()})
            for i, raw in queued]
    assert sorted(e.target for e in back) == ["cfg_a", "wh_b"]
    assert {e.id for e in back} == {event.id}
    assert {e.occurred_ms for e in back} == {1_700_000_000_000}   # the same event
