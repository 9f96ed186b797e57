"""The data-plane HTTP/1.1 edge (sidecar/dataplane/edge.py) as a client on a raw socket sees it.

Pipelined requests are answered in order even when a later one is decided without Redis;
keep-alive, Connection: close and HTTP/1.0; chunked bodies; and malformed framing gets a
4xx and a closed connection, never a 5xx or a hang.
"""

from __future__ import annotations

import socket

import pytest
from conftest import start_sidecar, stop_process
from live import make

BODY = b'{"model": "gpt-5.5", "messages": []}'


@pytest.fixture
def car(tmp_path, redis_url):
    car = start_sidecar(tmp_path, redis_url, keepalive_timeout_s=2)
    yield car
    stop_process(car.proc)


def request(path: str, key: str | None = None, body: bytes = BODY, extra: str = "",
            version: str = "1.1") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/{version}\r\nHost: sidecar\r\n{auth}{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_answers(sock: socket.socket, count: int) -> list[tuple[int, dict, bytes]]:
    """`count` answers from the socket (status, headers, body), or fewer if it closes."""
    buf, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return answers
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(buf) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        answers.append((int(lines[0].split()[1]), headers, buf[:length]))
        buf = buf[length:]
    return answers


def connect(car) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", car.port), timeout=10)
    return sock


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return True


async def test_pipelined_answers_keep_request_order(car, plane):
    """An allow waiting on Redis, then denials decided at once: answered in sent order."""
    _, key = await make(plane, unlimited=True)
    sock = connect(car)
    sock.sendall(request("/authz/v1/chat/completions", key)
                 + request("/authz/v1/chat/completions")               # missing key
                 + request("/authz/v1/chat/completions", "sk-short")   # malformed
                 + request("/authz/v1/chat/completions", key))
    answers = read_answers(sock, 4)
    assert [a[0] for a in answers] == [200, 401, 401, 200]
    assert b"missing_api_key" in answers[1][2] and b"invalid_api_key" in answers[2][2]
    assert answers[0][1]["x-key-id"] == answers[3][1]["x-key-id"]
    sock.close()


async def test_keep_alive_and_connection_close(car, plane):
    _, key = await make(plane, unlimited=True)
    sock = connect(car)
    for _ in range(3):   # one connection, several calls
        sock.sendall(request("/authz/v1/chat/completions", key))
        assert read_answers(sock, 1)[0][0] == 200
    sock.sendall(request("/authz/v1/chat/completions", key, extra="Connection: close\r\n"))
    status, headers, _ = read_answers(sock, 1)[0]
    assert status == 200 and headers["connection"] == "close"
    assert closed(sock)

    sock = connect(car)   # HTTP/1.0 without keep-alive: one answer, then closed
    sock.sendall(request("/authz/v1/chat/completions", key, version="1.0"))
    assert read_answers(sock, 1)[0][0] == 200
    assert closed(sock)


async def test_chunked_body_names_the_model(car, plane):
    _, key = await make(plane, unlimited=True, models=["gpt-5.5"])
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                      for part in (b'{"model": "o3"', b', "messages": []}')) + b"0\r\n\r\n"
    sock = connect(car)
    sock.sendall(b"POST /authz/v1/chat/completions HTTP/1.1\r\nHost: s\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    status, _, body = read_answers(sock, 1)[0]
    assert status == 403 and b"model_not_allowed" in body
    sock.close()


@pytest.mark.parametrize("raw,status", [
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET /authz/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: s\r\n\r\n", 414),
    (b"GET /authz/v1/models HTTP/1.1\r\nHost: s\r\n"
     + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70)) + b"\r\n", 431),
    (b"POST /authz/v1/models HTTP/1.1\r\nHost: s\r\nContent-Length: nope\r\n\r\n", 400),
    # An upgrade is not switched to: the request is answered as any other, then closed.
    (b"GET /authz/v1/models HTTP/1.1\r\nHost: s\r\nUpgrade: websocket\r\n"
     b"Connection: Upgrade\r\n\r\n", 401),
])
async def test_malformed_framing_gets_a_4xx_and_a_close(car, raw, status):
    sock = connect(car)
    sock.sendall(raw)
    answers = read_answers(sock, 1)
    assert answers and answers[0][0] == status
    assert answers[0][1]["content-type"] == "application/json"
    assert closed(sock)


async def test_idle_connection_is_closed_after_keepalive_timeout(car, plane):
    """keepalive_timeout_s=2 here: an idle keep-alive connection is closed by the sidecar
    (the proxy's own idle timeout must be shorter, see deploy/envoy)."""
    _, key = await make(plane, unlimited=True)
    sock = connect(car)
    sock.sendall(request("/authz/v1/chat/completions", key))
    assert read_answers(sock, 1)[0][0] == 200
    sock.settimeout(8)   # bounded: a connection never closed fails the test
    assert sock.recv(1) == b""


async def test_client_gone_mid_body_leaves_the_server_serving(car, plane):
    _, key = await make(plane, unlimited=True)
    sock = connect(car)
    sock.sendall(b"POST /authz/v1/chat/completions HTTP/1.1\r\nHost: s\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\":")
    sock.close()
    sock = connect(car)
    sock.sendall(request("/authz/v1/chat/completions", key))
    assert read_answers(sock, 1)[0][0] == 200
    sock.close()
    assert car.proc.poll() is None
    assert "Traceback" not in car.logs()


def test_an_answer_header_cannot_be_split_by_a_line_break():
    """Values come from records and our own JSON; even so, a CR/LF never starts a header."""
    from sidecar.dataplane.http_messages import Answer, encode

    raw = encode(Answer(200, {"x-key-id": "key_1\r\nSet-Cookie: x=1", "x-org-id": ""}), True)
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b"x-key-id: key_1  Set-Cookie: x=1" in head
    assert not any(line.lower().startswith(b"set-cookie") for line in head)
    assert raw.endswith(b"Content-Length: 0\r\n\r\n")


async def test_a_request_stalled_half_way_gets_408_and_a_close(tmp_path, redis_url):
    """request_timeout_s=1: headers or a body that stop arriving do not hold the
    connection for the whole keep-alive (here 30 s)."""
    car = start_sidecar(tmp_path, redis_url, keepalive_timeout_s=30, request_timeout_s=1)
    try:
        for partial in (b"POST /authz/v1/chat/completions HTTP/1.1\r\nHost: s\r\n",
                        request("/authz/v1/chat/completions", "sk-" + "a" * 40,
                                extra="")[:-5]):
            sock = connect(car)
            sock.settimeout(8)   # bounded: no answer fails the test instead of hanging
            sock.sendall(partial)
            answers = read_answers(sock, 1)
            assert answers and answers[0][0] == 408
            assert b"request_timeout" in answers[0][2]
            assert closed(sock)
    finally:
        stop_process(car.proc)
