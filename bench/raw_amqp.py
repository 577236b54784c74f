"""AMQP 0-9-1 with raw frames: the least a client can do, for the benchmark's floors.

pamqp codes the handshake and the few synchronous methods; after that each publish is
one ``transport.write`` of frames packed with ``struct``, and deliveries are parsed from
the read buffer (the properties this module knows, then the body) with no queue, lock or
task per frame. Publisher confirms and acks only as far as ``bench.floor``'s guarded
target asks the broker for them (a confirm's tag handed to a callback, an ack written
with a publish); no nacks or returns handled, no flow control, no reconnects: not a
client to ship. ``bench.amqp_probe`` measures its CPU per message beside aiormq's;
``bench.floor`` builds the design's least path on it.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pamqp.commands as spec
import pamqp.frame
from pamqp.common import FieldTable
from yarl import URL

_FRAME_END = b"\xce"
_HEADER = struct.Struct(">BHI")  # frame type, channel, size
_CONTENT = struct.Struct(">HHQH")  # class, weight, body size, property flags
_DELIVER = struct.pack(">HH", 60, 60)
_CONFIRM = struct.pack(">HH", 60, 80)  # Basic.Ack from the broker: a publish confirmed
_ACK = struct.Struct(">BHIHHQB")  # an ack's whole method frame but its end
_TAG = struct.Struct(">Q")
# Basic's property flags in AMQP's order, up to the last this module writes or reads.
_CONTENT_TYPE = 0x8000
_ENCODING = 0x4000
_HEADERS = 0x2000
_MODE = 0x1000
_PRIORITY = 0x0800
_CORRELATION = 0x0400
_REPLY_TO = 0x0200
_EXPIRATION = 0x0100
_MESSAGE_ID = 0x0080
_TYPE = 0x0020

# Handed each delivery: its correlation id, reply-to and body.
OnMessage = Callable[[bytes, bytes, bytes], None]
# Handed each confirm: its delivery tag and whether it confirms every tag up to it.
OnConfirm = Callable[[int, bool], None]


def _short(data: bytes) -> bytes:
    return bytes((len(data),)) + data


class RawChannel:
    """One connection with one channel (number 1)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        # (exchange, routing key, mandatory) -> its Basic.Publish frame
        self._methods: dict[tuple[str, str, bool], bytes] = {}
        self._task: asyncio.Task[None] | None = None
        # The delivery tag of the delivery being handed to ``on_message`` (for its ack).
        self.delivery_tag = 0

    @classmethod
    async def open(cls, url: str, product: str = "botline bench") -> RawChannel:
        """Connect, log in as the URL's user (guest by default), open channel 1."""
        where = URL(url)
        reader, writer = await asyncio.open_connection(where.host, where.port or 5672)
        channel = cls(reader, writer)
        writer.write(b"AMQP\x00\x00\x09\x01")
        await channel._frame()  # Connection.Start
        login = f"\0{where.user or 'guest'}\0{where.password or 'guest'}"
        start_ok = spec.Connection.StartOk(client_properties={"product": product}, response=login)
        tune = await channel._call(0, start_ok)
        assert isinstance(tune, spec.Connection.Tune)
        writer.write(
            pamqp.frame.marshal(spec.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0)
        )
        await channel._call(0, spec.Connection.Open(virtual_host=where.path[1:] or "/"))
        await channel._call(1, spec.Channel.Open())
        return channel

    async def _frame(self) -> object:
        head = await self._reader.readexactly(7)
        rest = await self._reader.readexactly(_HEADER.unpack(head)[2] + 1)
        return pamqp.frame.unmarshal(head + rest)[2]

    async def _call(self, channel: int, method: object) -> object:
        self._writer.write(pamqp.frame.marshal(method, channel))  # type: ignore[arg-type]
        return await self._frame()

    async def declare(
        self,
        queue: str = "",
        *,
        exclusive: bool = False,
        arguments: FieldTable | None = None,
    ) -> str:
        """Declare an auto-deleted queue (named by the server when ``queue`` is empty)."""
        declare = spec.Queue.Declare(
            queue=queue, exclusive=exclusive, auto_delete=True, arguments=arguments
        )
        ok = await self._call(1, declare)
        assert isinstance(ok, spec.Queue.DeclareOk)
        return ok.queue or queue

    async def declare_exchange(
        self, exchange: str, kind: str, arguments: FieldTable | None = None
    ) -> None:
        """Declare an auto-deleted exchange."""
        declare = spec.Exchange.Declare(
            exchange=exchange, exchange_type=kind, auto_delete=True, arguments=arguments
        )
        ok = await self._call(1, declare)
        assert isinstance(ok, spec.Exchange.DeclareOk)

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        """Bind ``queue`` to ``exchange`` by ``routing_key``."""
        bind = spec.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key)
        ok = await self._call(1, bind)
        assert isinstance(ok, spec.Queue.BindOk)

    async def confirm_select(self) -> None:
        """Put the channel in confirm mode: the broker confirms each publish, tags 1, 2, ..."""
        ok = await self._call(1, spec.Confirm.Select())
        assert isinstance(ok, spec.Confirm.SelectOk)

    async def qos(self, prefetch: int) -> None:
        """At most ``prefetch`` deliveries unacked at once."""
        ok = await self._call(1, spec.Basic.Qos(prefetch_count=prefetch))
        assert isinstance(ok, spec.Basic.QosOk)

    async def consume(
        self,
        queue: str,
        on_message: OnMessage,
        *,
        no_ack: bool = True,
        on_confirm: OnConfirm | None = None,
    ) -> None:
        """From now on, hand every delivery from ``queue`` to ``on_message`` as it is read
        (its tag in ``delivery_tag`` meanwhile), and every confirm to ``on_confirm``.

        One consumer per channel: after this, replies to synchronous methods are not read.
        """
        ok = await self._call(1, spec.Basic.Consume(queue=queue, no_ack=no_ack))
        assert isinstance(ok, spec.Basic.ConsumeOk)
        self._task = asyncio.create_task(self._read(on_message, on_confirm))

    def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        correlation: bytes,
        exchange: str = "",
        mandatory: bool = False,
        reply_to: bytes = b"",
        content_type: bytes = b"",
        priority: int | None = None,
        expiration: bytes = b"",
        message_id: bytes = b"",
        message_type: bytes = b"",
        ack: int = 0,
    ) -> None:
        """A transient message, in one socket write; with ``ack``, that delivery's ack
        written ahead of it."""
        key = (exchange, routing_key, mandatory)
        method = self._methods.get(key)
        if method is None:
            publish = spec.Basic.Publish(
                exchange=exchange, routing_key=routing_key, mandatory=mandatory
            )
            method = pamqp.frame.marshal(publish, 1)
            self._methods[key] = method
        flags = _MODE | _CORRELATION
        fields = [_short(content_type)] if content_type else []
        fields.append(b"\x01")
        if priority is not None:
            flags |= _PRIORITY
            fields.append(bytes((priority,)))
        fields.append(_short(correlation))
        optional = (
            (_REPLY_TO, reply_to),
            (_EXPIRATION, expiration),
            (_MESSAGE_ID, message_id),
            (_TYPE, message_type),
        )
        for flag, value in optional:
            if value:
                flags |= flag
                fields.append(_short(value))
        if content_type:
            flags |= _CONTENT_TYPE
        header = _CONTENT.pack(60, 0, len(body), flags) + b"".join(fields)
        self._transport.write(
            b"".join(
                (
                    _ACK.pack(1, 1, 13, 60, 80, ack, 0) + _FRAME_END if ack else b"",
                    method,
                    _HEADER.pack(2, 1, len(header)),
                    header,
                    _FRAME_END,
                    _HEADER.pack(3, 1, len(body)),
                    body,
                    _FRAME_END,
                )
            )
        )

    async def _read(self, on_message: OnMessage, on_confirm: OnConfirm | None) -> None:
        buffer = b""
        body_left = 0  # -1: a content header comes next
        correlation = reply_to = b""
        parts: list[bytes] = []
        while data := await self._reader.read(1 << 16):
            buffer += data
            at = 0
            while len(buffer) - at >= 8:
                kind, _, size = _HEADER.unpack_from(buffer, at)
                end = at + 7 + size
                if end + 1 > len(buffer):
                    break
                if kind == 1 and buffer[at + 7 : at + 11] == _DELIVER:
                    body_left = -1
                    # After the consumer tag (a short string): the delivery tag.
                    self.delivery_tag = _TAG.unpack_from(buffer, at + 12 + buffer[at + 11])[0]
                elif kind == 1 and buffer[at + 7 : at + 11] == _CONFIRM and on_confirm:
                    on_confirm(_TAG.unpack_from(buffer, at + 11)[0], bool(buffer[at + 19] & 1))
                elif kind == 2 and body_left == -1:
                    _, _, body_left, flags = _CONTENT.unpack_from(buffer, at + 7)
                    correlation, reply_to = properties(buffer, at + 21, flags)
                    parts = []
                    if body_left == 0:
                        on_message(correlation, reply_to, b"")
                elif kind == 3 and body_left > 0:
                    parts.append(buffer[at + 7 : end])
                    body_left -= size
                    if body_left == 0:
                        on_message(correlation, reply_to, b"".join(parts))
                at = end + 1
            buffer = buffer[at:]

    def close(self) -> None:
        """Stop reading and close the socket (the server drops what was auto-deleted)."""
        if self._task is not None:
            self._task.cancel()
        self._writer.close()


def properties(buffer: bytes, pos: int, flags: int) -> tuple[bytes, bytes]:
    """The correlation id and reply-to among a content header's properties at ``pos``."""
    found = {_CORRELATION: b"", _REPLY_TO: b""}
    for bit in (_CONTENT_TYPE, _ENCODING, _HEADERS, _MODE, _PRIORITY, _CORRELATION, _REPLY_TO):
        if not flags & bit:
            continue
        if bit in (_MODE, _PRIORITY):
            pos += 1
        elif bit == _HEADERS:
            pos += 4 + int.from_bytes(buffer[pos : pos + 4], "big")
        else:
            length = buffer[pos]
            found[bit] = buffer[pos + 1 : pos + 1 + length]
            pos += 1 + length
    return found[_CORRELATION], found[_REPLY_TO]
