"""Slow and greedy clients against a running sidecar (issue 8, item 5), on raw sockets.

- A request that trickles in (a byte now and then, never silent for long) gets 408 and
  a close once request_deadline_s has passed since its first byte; a connection idle
  between requests is held for the keep-alive, which is a separate setting.
- Too many headers, or too many header bytes: 431 and a close.
- Under a lowered open-file limit, more trickling connections than the process has files
  for: the sidecar sheds the idle and the slowest, and a fresh request is answered.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import start_sidecar, stop_process
from live import make, send

TRICKLE = b"POST /authz/v1/chat/completions HTTP/1.1\r\nHost: s\r\nX-Pad: "


def authz_request(key: str, headers: bytes = b"") -> bytes:
    body = b'{"model": "m"}'
    return (b"POST /authz/v1/chat/completions HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer "
            + key.encode() + b"\r\n" + headers
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def trickle(port: int, pause: float, stop: asyncio.Event) -> bytes:
    """Send TRICKLE, then one byte every `pause` seconds, until the server answers or
    closes (returns what it sent back) or `stop` is set (returns b'')."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(TRICKLE)
        await writer.drain()
        while not stop.is_set():
            try:
                answer = await asyncio.wait_for(reader.read(65536), pause)
            except TimeoutError:
                try:
                    writer.write(b"p")
                    await writer.drain()
                except ConnectionError:
                    return b"closed"
                continue
            return answer or b"closed"
        return b""
    except ConnectionError:
        return b"closed"
    finally:
        writer.close()


async def test_a_trickling_request_gets_408_at_its_deadline(tmp_path, redis_url, plane):
    """request_deadline_s=2; pauses of 0.3 s never reach request_timeout_s (10 s)."""
    car = start_sidecar(tmp_path, redis_url, request_deadline_s=2, request_timeout_s=10,
                        keepalive_timeout_s=30)
    try:
        stop = asyncio.Event()
        answer = await asyncio.wait_for(trickle(car.port, 0.3, stop), 15)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        assert b"Connection: close" in answer and b"request_timeout" in answer
        # Between requests a connection idles for the keep-alive, longer than the
        # deadline: the same connection still serves a request after 3 s of silence.
        _, key = await make(plane, unlimited=True)
        reader, writer = await asyncio.open_connection("127.0.0.1", car.port)
        try:
            for pause in (0, 3):
                await asyncio.sleep(pause)
                writer.write(authz_request(key))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 "), head   # no body: length 0
        finally:
            writer.close()
    finally:
        stop_process(car.proc)


@pytest.fixture(scope="module")
def small_headers(tmp_path_factory, redis_server):
    car = start_sidecar(tmp_path_factory.mktemp("headers"), redis_server.url,
                        max_headers=20, max_header_bytes=4096)
    yield car
    stop_process(car.proc)


async def test_too_many_headers_get_431_and_a_close(small_headers, redis_url, plane):
    _, key = await make(plane, unlimited=True)
    # Authorization, Host and Content-Length are three of the 20.
    ok = b"".join(b"X-H%d: v\r\n" % i for i in range(17))
    status, head, _ = await send(small_headers, authz_request(key, ok))
    assert status == 200, head
    too_many = ok + b"X-H17: v\r\n"
    status, head, body = await send(small_headers, authz_request(key, too_many))
    assert status == 431 and b"Connection: close" in head, head
    assert json.loads(body)["error"]["code"] == "request_too_large"
    # The same name repeated counts each time (repeats are joined into one value).
    repeated = b"X-Same: v\r\n" * 30
    assert (await send(small_headers, authz_request(key, repeated)))[0] == 431
    # Thousands of empty headers are refused as the 21st arrives, not parsed to the end.
    flood = b"a:\r\n" * 65_000
    assert (await send(small_headers, authz_request(key, flood)))[0] == 431


async def test_too_many_header_bytes_get_431_and_a_close(small_headers, redis_url, plane):
    _, key = await make(plane, unlimited=True)
    fits = b"X-Big: " + b"v" * 3000 + b"\r\n"
    assert (await send(small_headers, authz_request(key, fits)))[0] == 200
    # Under the count limit, over the bytes limit in total.
    spread = b"".join(b"X-B%d: " % i + b"v" * 900 + b"\r\n" for i in range(5))
    status, head, _ = await send(small_headers, authz_request(key, spread))
    assert status == 431 and b"Connection: close" in head, head
    one_big = b"X-Big: " + b"v" * 5000 + b"\r\n"
    assert (await send(small_headers, authz_request(key, one_big)))[0] == 431


OPEN_FILES = 200     # the sidecar's RLIMIT_NOFILE (soft and hard) in the test below


async def test_a_fresh_request_is_answered_past_the_file_limit(tmp_path, redis_url, plane):
    """More trickling connections than the process has files for. Without a cap the
    process runs out of descriptors and accept() fails for everyone; with it, the
    slowest are shed (503 or a close) and a fresh request is answered."""
    car = start_sidecar(tmp_path, redis_url, open_files=OPEN_FILES, request_deadline_s=30,
                        request_timeout_s=30)
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    try:
        listening = [json.loads(line) for line in car.logs().splitlines()
                     if '"listening"' in line][0]
        cap = listening["max_connections"]
        assert listening["open_files"] == OPEN_FILES and 0 < cap < OPEN_FILES
        _, key = await make(plane, unlimited=True)
        count = OPEN_FILES + 50
        for _ in range(count):
            tasks.append(asyncio.create_task(trickle(car.port, 1.0, stop)))
            await asyncio.sleep(0)
        # The sidecar sheds down to its cap (bounded wait: never shedding fails here).
        for _ in range(200):
            if sum(t.done() for t in tasks) >= count - cap:
                break
            await asyncio.sleep(0.05)
        answered = await asyncio.wait_for(send(car, authz_request(key)), 10)
        assert answered[0] == 200, answered[1]
        assert (await asyncio.wait_for(send(car, b"GET /healthz HTTP/1.1\r\n\r\n"),
                                       10))[0] == 200
        done = [t.result() for t in tasks if t.done()]
        assert len(done) >= count - cap, (len(done), cap)
        assert all(d == b"closed" or d.startswith(b"HTTP/1.1 503 ") for d in done)
        assert car.proc.poll() is None
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        stop_process(car.proc)
