"""The gRPC transport of ext_authz: unary `Check` calls over HTTP/2 (h2), on the loop.

Why not grpcio's asyncio server: profiled under real Envoy, it cost ~260 µs of CPU per
Check in its own machinery (completion queue, per-RPC objects, a Task each), ~10x the
whole decision (OPTIMIZATIONS §13). Here the HTTP/2 protocol is h2's (framing, HPACK,
flow control, stream states, SETTINGS, PING, GOAWAY), the gRPC part is ours and small:
one unary method, length-prefixed messages, status in trailers. Each Check is stepped
like an HTTP call (stepping.py): it runs at once up to its Redis call, in the same
batches as the HTTP edge's calls.

    HEADERS  :method POST, :path /envoy.service.auth.v3.Authorization/Check,
             content-type application/grpc[+proto]
    DATA     1 byte compressed flag (0; we accept no compression), 4 bytes length
             (big-endian), the CheckRequest
    ->       HEADERS :status 200, DATA the CheckResponse, trailers grpc-status 0
    errors   "trailers only": one HEADERS with grpc-status / grpc-message, end of stream

Bounded like the HTTP edge: a request message beyond `max_message` bytes is refused with
RESOURCE_EXHAUSTED as soon as its data passes the bound (nothing more is buffered);
at most MAX_STREAMS Checks in flight per connection (SETTINGS_MAX_CONCURRENT_STREAMS,
and our own count, which keeps the Checks of streams the client reset until they end);
a header block at most h2's 64 KiB; a client that does not read its answers is not read
either (pause_writing). Connections are Envoy's, long-lived: none is closed for idling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from .stepping import step

log = logging.getLogger("sidecar.grpc")

CHECK_PATH = b"/envoy.service.auth.v3.Authorization/Check"
MAX_STREAMS = 1024
WINDOW = 1 << 20           # flow-control window we give: a 200 KB body in one go
# gRPC status codes (grpc/status.h) this server answers with itself.
UNIMPLEMENTED, INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE = 12, 13, 8, 14

# handle(message bytes, peer ip) -> a coroutine of the response message bytes, or of
# None for a message that does not parse.
Handler = Callable[[bytes, str], Coroutine[Any, Any, bytes | None]]


# Header validation off, both ways (~20% of h2's cost per call, measured): we read three
# request headers by exact byte comparison (:method, :path, content-type) and pass none
# on, and send only our own constant ones. HPACK decoding stays bounded by h2's limit on
# a header list (64 KiB).
_CONFIG = h2.config.H2Configuration(
    client_side=False, header_encoding=None, validate_inbound_headers=False,
    normalize_inbound_headers=False, validate_outbound_headers=False,
    normalize_outbound_headers=False)


class _CheckStream:
    __slots__ = ("data", "size")

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.size = 0


class _GrpcConnection(asyncio.Protocol):
    def __init__(self, server: GrpcServer):
        self.server = server
        self.conn = h2.connection.H2Connection(config=_CONFIG)
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.streams: dict[int, _CheckStream] = {}
        self.pending: dict[int, list] = {}    # stream -> frames waiting for window
        self.inflight = 0

    # -- connection events ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else ""
        self.server.connections.add(self)
        conn = self.conn
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                              h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        conn.increment_flow_control_window(WINDOW - 65535)
        self._write()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.streams.clear()
        self.pending.clear()

    # A client that sends Checks but does not read the answers would grow our write
    # buffer without end (headers and trailers are outside flow control): past the
    # transport's high-water mark, its requests are not read until the answers drain.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:   # h2 has queued the GOAWAY
            log.info("grpc: protocol error from %s: %s", self.peer_ip, exc)
            self._write()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            kind = type(event)
            if kind is h2.events.RequestReceived:
                self._request(event.stream_id, event.headers)
            elif kind is h2.events.DataReceived:
                self._data(event.stream_id, event.data, event.flow_controlled_length)
            elif kind is h2.events.StreamEnded:
                self._ended(event.stream_id)
            elif kind is h2.events.StreamReset:
                self.streams.pop(event.stream_id, None)
                self.pending.pop(event.stream_id, None)
            elif kind in (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged):
                self._send_pending()
            elif kind is h2.events.ConnectionTerminated:
                # The client's GOAWAY. h2 closes its side on it and sends nothing more,
                # so neither can we (hypercorn, on h2 too, does the same): what is still
                # in flight is lost to a client that has given up on the connection.
                self._write()
                if self.transport is not None:
                    self.transport.close()
                return
        self._write()

    # -- one Check -------------------------------------------------------------------
    def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        fields = dict(headers)
        if fields.get(b":method") != b"POST" or fields.get(b":path") != CHECK_PATH:
            self._trailers_only(stream_id, UNIMPLEMENTED, "unknown method")
        elif not fields.get(b"content-type", b"").startswith(b"application/grpc"):
            self._reply(stream_id, [(b":status", b"415")], end=True)
        elif self.server.closing:
            self._trailers_only(stream_id, UNAVAILABLE, "shutting down")
        elif self.inflight + len(self.streams) >= MAX_STREAMS:
            # Streams the client reset still hold their decision until it is done: h2's
            # stream count forgets them, this one does not (the "rapid reset" flood).
            self._trailers_only(stream_id, RESOURCE_EXHAUSTED,
                                f"more than {MAX_STREAMS} checks in flight")
        else:
            self.streams[stream_id] = _CheckStream()

    def _data(self, stream_id: int, data: bytes, flow: int) -> None:
        # The window is given back at once: a refused or finished stream's data is
        # dropped, not held, so the connection never stalls on it.
        self.conn.acknowledge_received_data(flow, stream_id)
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.size += len(data)
        if stream.size > self.server.max_message + 5:
            del self.streams[stream_id]      # what follows on it is dropped
            self._trailers_only(stream_id, RESOURCE_EXHAUSTED,
                                f"request larger than {self.server.max_message} bytes")
            return
        stream.data.append(data)

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        body = b"".join(stream.data)
        if len(body) < 5:
            self._trailers_only(stream_id, INTERNAL, "no request message")
            return
        if body[0] != 0:
            self._trailers_only(stream_id, UNIMPLEMENTED, "compressed messages")
            return
        length = int.from_bytes(body[1:5], "big")
        if length != len(body) - 5:
            self._trailers_only(stream_id, INTERNAL, "one request message, whole")
            return
        self.inflight += 1
        step(self.server.handle(body[5:], self.peer_ip), self._answered, stream_id)

    def _answered(self, stream_id: int, message: object) -> None:
        """`message`: the response; None when the request did not parse; anything
        else when the handler failed (stepping.py answers a bug with an Answer)."""
        self.inflight -= 1
        if self.transport is None:
            return
        if not isinstance(message, bytes):
            self._trailers_only(stream_id, INTERNAL, "the request message does not parse"
                                if message is None else "internal error")
        else:
            frames = [("headers", [(b":status", b"200"),
                                   (b"content-type", b"application/grpc")], False),
                      ("data", b"\0" + len(message).to_bytes(4, "big") + message),
                      ("headers", [(b"grpc-status", b"0")], True)]
            self.pending[stream_id] = frames
            self._send_pending()
        self._write()
        if self.server.closing and not self.inflight and self.transport is not None:
            self.transport.close()

    # -- sending -----------------------------------------------------------------------
    def _trailers_only(self, stream_id: int, status: int, message: str) -> None:
        self._reply(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                (b"grpc-status", str(status).encode()),
                                (b"grpc-message", message.encode())], end=True)

    def _reply(self, stream_id: int, headers: list, end: bool) -> None:
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return   # the client reset the stream, or the connection, meanwhile
        if end:
            self.streams.pop(stream_id, None)

    def _send_pending(self) -> None:
        """Frames of answered Checks, as far as the client's flow-control windows let
        them go (a response is small: almost always all at once)."""
        conn = self.conn
        for stream_id in list(self.pending):
            frames = self.pending[stream_id]
            try:
                while frames:
                    kind, payload, *end = frames[0]
                    if kind == "headers":
                        conn.send_headers(stream_id, payload, end_stream=end[0])
                    else:
                        room = min(conn.local_flow_control_window(stream_id),
                                   conn.max_outbound_frame_size)
                        if room <= 0:
                            break
                        conn.send_data(stream_id, payload[:room])
                        if len(payload) > room:
                            frames[0] = (kind, payload[room:])
                            continue
                    frames.pop(0)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                frames.clear()   # reset by the client, or gone with the connection
            if not frames:
                del self.pending[stream_id]

    def _write(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def goaway(self) -> None:
        """Shutdown: no new streams; those in flight are still answered. The GOAWAY is
        written as a frame of its own: h2's close_connection() would also close h2's
        side, and refuse the answers still to come."""
        if self.transport is None:
            return
        self._write()
        self.transport.write(GoAwayFrame(
            0, last_stream_id=self.conn.highest_inbound_stream_id,
            error_code=h2.errors.ErrorCodes.NO_ERROR).serialize())
        if not self.inflight:
            self.transport.close()


class GrpcServer:
    """`Check` on host:port; `handle` decides, each decision stepped (stepping.py)."""

    def __init__(self, handle: Handler, max_message: int):
        self.handle = handle
        self.max_message = max_message
        self.connections: set[_GrpcConnection] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None

    async def listen(self, host: str, port: int, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _GrpcConnection(self), host, port,
                                                reuse_port=reuse_port, backlog=1024)

    async def stop(self, timeout: float) -> None:
        """Stop accepting, GOAWAY to every connection, let the Checks in flight finish
        (up to `timeout` seconds), then close what is left."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.goaway()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(c.inflight for c in self.connections) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
