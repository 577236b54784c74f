"""AMQP frames for aiormq's connections: read from the socket in chunks, and the
frames of a message coded without pamqp's generic walk over each field.

aiormq's own frame reader (``aiormq.connection.FrameReceiver``) reads each frame with
three ``readexactly`` calls under a lock into a fresh ``BytesIO``, then has pamqp decode
it: per frame, several coroutines and copies, and a message is three frames (method,
header, body). This reader takes whatever the socket has in one ``read`` and cuts every
whole frame out of it; only when the buffer holds no whole frame does it wait. Frames
come out in the same order, as the same pamqp objects, with the same errors on a broken
or closed connection, so aiormq's connection, channels, heartbeats and close handshake
work unchanged above it (tests/test_amqp_frames.py runs aiormq on it against the broker).

The frames every job and event takes (``Basic.Publish``, ``Basic.Deliver``,
``Basic.Ack``/``Nack``, content header and body) are packed and unpacked here with
``struct`` into the very pamqp objects and bytes pamqp makes; every other frame, and any
header this does not know (a second flag word), goes to pamqp as before.
tests/test_amqp_frames.py checks both directions against pamqp, byte for byte and field
by field, over every property.

``install()`` makes every aiormq connection opened afterwards use them;
``shared.amqp.AmqpLink`` calls it before each connect (docs/performance.md, fifth pass,
has the CPU it saves). ``Deliveries`` hands a channel's deliveries to our consumers as
their frames are read (``shared.amqp.consume``).
"""

from __future__ import annotations

import asyncio
import inspect
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import aiormq.connection
import pamqp.decode
import pamqp.encode
import pamqp.frame
import structlog
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.exceptions import PAMQPException, UnmarshalingException
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

log = structlog.get_logger("botline.amqp")

_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_HEAD_SIZE = _HEAD.size
_FRAME_END = 0xCE
_CHUNK = 1 << 17
_METHOD, _HEADER, _BODY, _HEARTBEAT = 1, 2, 3, 8
_INDEX = struct.Struct(">I")
_LONG_LONG = struct.Struct(">q")  # signed, as pamqp has it
_CONTENT = struct.Struct(">HHQH")  # class, weight, body size, first flag word
_CONTENT_SIZE = _CONTENT.size
_CONTENT_HEAD = struct.Struct(">HHQ")
_TAIL = bytes((_FRAME_END,))
_PUBLISH = _INDEX.pack(Basic.Publish.index) + b"\x00\x00"  # and its ticket, always 0
_ACK = _INDEX.pack(Basic.Ack.index)
# pamqp.frame.unmarshal's answer: bytes used, channel, frame.
Received = tuple[int, int, pamqp.frame.FrameTypes]
# Basic.Properties in AMQP's order: attribute, flag bit, and whether it is a short string.
_PROPERTIES = tuple(
    (name, Basic.Properties.flags[name], Basic.Properties.amqp_type(name) == "shortstr")
    for name in Basic.Properties.__slots__
)
_pamqp_marshal = pamqp.frame.marshal
# The properties coded as one byte each.
_OCTETS = frozenset(
    name for name in Basic.Properties.__slots__ if Basic.Properties.amqp_type(name) == "octet"
)


def _short_string(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise TypeError("string exceeds maximum length of 255 bytes")
    return bytes((len(data),)) + data


# Headers tables coded by pamqp, by their (name, value)s: a gateway's jobs all
# carry the same one. Only str and int values (bool is not int here), a bounded few.
_tables: dict[tuple[tuple[str, object], ...], bytes] = {}
_TABLES_KEPT = 256


def _table(headers: Any) -> bytes:
    if type(headers) is not dict:
        return pamqp.encode.field_table(headers)
    key = tuple(headers.items())
    for _, value in key:
        kind = type(value)
        if kind is not str and kind is not int:
            return pamqp.encode.field_table(headers)
    # Values only str and int (never bool, whose True equals 1): equal items, equal bytes.
    coded = _tables.get(key)
    if coded is None:
        coded = pamqp.encode.field_table(headers)
        if len(_tables) >= _TABLES_KEPT:
            _tables.clear()
        _tables[key] = coded
    return coded


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _HEAD.pack(kind, channel, len(payload)) + payload + _TAIL


def _properties(properties: Basic.Properties) -> bytes:
    """``Basic.Properties.marshal``: the flag word, then each property set, in order."""
    flags, parts = 0, []
    for name, bit, short in _PROPERTIES:
        value = getattr(properties, name)
        if value is None or value == "":
            continue
        flags |= bit
        if short and type(value) is str:
            parts.append(_short_string(value))
        elif name == "headers":
            parts.append(_table(value))
        elif name in _OCTETS and type(value) is int and 0 <= value <= 255:
            parts.append(bytes((value,)))  # delivery mode, priority: pamqp's octet
        else:
            parts.append(properties.encode_property(name, value))
    return flags.to_bytes(2, "big") + b"".join(parts)


def _publish_method(exchange: str, routing_key: str, mandatory: bool, immediate: bool) -> bytes:
    return b"".join(
        (
            _PUBLISH,
            _short_string(exchange),
            _short_string(routing_key),
            bytes((bool(mandatory) | bool(immediate) << 1,)),
        )
    )


def publish_frames(
    channel: int,
    body: bytes,
    properties: Basic.Properties,
    *,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    max_content: int,
) -> bytes:
    """A whole message as aiormq's ``basic_publish`` writes it: method, header, body frames."""
    header = _CONTENT_HEAD.pack(Basic.frame_id, 0, len(body)) + _properties(properties)
    frames = [
        _frame(_METHOD, channel, _publish_method(exchange, routing_key, mandatory, False)),
        _frame(_HEADER, channel, header),
    ]
    for at in range(0, len(body), max_content):
        frames.append(_frame(_BODY, channel, body[at : at + max_content]))
    return b"".join(frames)


def marshal(frame_value: pamqp.frame.FrameTypes, channel_id: int) -> bytes:
    """``pamqp.frame.marshal``, packed here for the frames of a message and its ack."""
    frame, channel, kind = frame_value, channel_id, type(frame_value)
    if kind is ContentBody:
        return _frame(_BODY, channel, frame.value)  # type: ignore[union-attr]
    if kind is ContentHeader:
        header: ContentHeader = frame  # type: ignore[assignment]
        payload = _CONTENT_HEAD.pack(Basic.frame_id, 0, header.body_size) + _properties(
            header.properties
        )
        return _frame(_HEADER, channel, payload)
    if kind is Basic.Publish:
        publish: Basic.Publish = frame  # type: ignore[assignment]
        payload = _publish_method(
            publish.exchange, publish.routing_key, publish.mandatory, publish.immediate
        )
        return _frame(_METHOD, channel, payload)
    if kind is Basic.Ack:
        ack: Basic.Ack = frame  # type: ignore[assignment]
        return ack_frame(channel, ack.delivery_tag, multiple=ack.multiple)
    return _pamqp_marshal(frame, channel)


def ack_frame(channel: int, delivery_tag: int, *, multiple: bool = False) -> bytes:
    """A ``Basic.Ack`` method frame, as pamqp codes it."""
    payload = _ACK + _LONG_LONG.pack(delivery_tag) + bytes((bool(multiple),))
    return _frame(_METHOD, channel, payload)


def _short_at(data: bytes, at: int) -> tuple[str, int]:
    end = at + 1 + data[at]
    if end > len(data):
        raise ValueError("short string runs past the frame")
    return data[at + 1 : end].decode(), end


def _deliver(payload: bytes) -> Basic.Deliver:
    frame = Basic.Deliver.__new__(Basic.Deliver)
    frame.consumer_tag, at = _short_at(payload, 4)
    (frame.delivery_tag,) = _LONG_LONG.unpack_from(payload, at)
    frame.redelivered = bool(payload[at + 8] & 1)
    frame.exchange, at = _short_at(payload, at + 9)
    frame.routing_key, at = _short_at(payload, at)
    return frame


def _confirm(payload: bytes, kind: type[Basic.Ack] | type[Basic.Nack]) -> Basic.Ack | Basic.Nack:
    frame = kind.__new__(kind)
    (frame.delivery_tag,) = _LONG_LONG.unpack_from(payload, 4)
    bits = payload[12]
    frame.multiple = bool(bits & 1)
    if kind is Basic.Nack:
        frame.requeue = bool(bits & 2)  # type: ignore[union-attr]
    return frame


def _header(payload: bytes) -> ContentHeader | None:
    """A content header with one flag word, as pamqp decodes it; None for any other."""
    class_id, weight, body_size, flags = _CONTENT.unpack_from(payload)
    if flags & 1:
        return None
    properties = Basic.Properties.__new__(Basic.Properties)
    at = _CONTENT_SIZE
    for name, bit, short in _PROPERTIES:
        if not flags & bit:
            value: object = "" if name == "cluster_id" else None
        elif short:
            value, at = _short_at(payload, at)
        else:
            used, value = pamqp.decode.by_type(payload[at:], Basic.Properties.amqp_type(name))
            at += used
        setattr(properties, name, value)
    header = ContentHeader.__new__(ContentHeader)
    header.class_id, header.weight, header.body_size = class_id, weight, body_size
    header.properties = properties
    return header


def unmarshal(data: bytes) -> Received:
    """``pamqp.frame.unmarshal`` of one whole frame, decoded here for a message's frames."""
    kind, channel, size = _HEAD.unpack_from(data)
    payload = data[_HEAD_SIZE:-1]
    try:
        if kind == _BODY:
            return len(data), channel, ContentBody(payload)
        if kind == _HEADER and size >= _CONTENT_SIZE:
            header = _header(payload)
            if header is not None:
                return len(data), channel, header
        elif kind == _METHOD and size >= 4:
            (index,) = _INDEX.unpack_from(payload)
            if index == Basic.Deliver.index:
                return len(data), channel, _deliver(payload)
            if index == Basic.Ack.index and size >= 13:
                return len(data), channel, _confirm(payload, Basic.Ack)
            if index == Basic.Nack.index and size >= 13:
                return len(data), channel, _confirm(payload, Basic.Nack)
        elif kind == _HEARTBEAT and size == 0:
            return len(data), channel, Heartbeat()
    except (struct.error, ValueError, IndexError) as exc:
        raise UnmarshalingException("frame", exc) from exc
    return pamqp.frame.unmarshal(data)


class FrameReader:
    """aiormq's ``FrameReceiver`` interface (``get_frame``, async iteration) over chunks."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.started = False
        self._buffer = b""
        self._frames: deque[Received] = deque()

    def __aiter__(self) -> FrameReader:
        return self

    async def __anext__(self) -> Received:
        return await self.get_frame()

    async def get_frame(self) -> Received:
        frames = self._frames
        while not frames:
            await self._fill()
        return frames.popleft()

    async def _fill(self) -> None:
        """Read once and cut every whole frame out of the buffer; ends the iteration at EOF."""
        try:
            data = await self.reader.read(_CHUNK)
        except OSError as exc:
            raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
        if not data:
            if self._buffer:
                raise AMQPConnectionError(
                    "Server connection unexpectedly closed. "
                    f"Read {len(self._buffer)} bytes of an unfinished frame"
                )
            raise StopAsyncIteration
        buffer = self._buffer + data if self._buffer else data
        if not self.started:
            if buffer[:4] == b"AMQP":  # the broker answered with its protocol header
                raise ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
        at, size, append = 0, len(buffer), self._frames.append
        while size - at >= _HEAD_SIZE + 1:
            _, _, length = _HEAD.unpack_from(buffer, at)
            end = at + _HEAD_SIZE + length + 1
            if end > size:
                break
            if buffer[end - 1] != _FRAME_END:
                raise InvalidFrameError(f"frame at byte {at} does not end with 0xCE")
            try:
                append(unmarshal(buffer[at:end]))
            except PAMQPException as exc:
                raise InvalidFrameError(str(exc)) from exc
            at = end
        self._buffer = buffer[at:] if at < size else b""


# The most bytes one write of the connection's writer carries when frames are merged.
MERGED_MAX = 1 << 16


class WriteQueue(asyncio.Queue[ChannelFrame]):
    """A connection's write queue whose frames, while they wait, are merged.

    aiormq's writer sends each queued item with a write of its own: a system
    call, and on loopback the receiver's side of TCP too, charged to the sender
    (the biggest single share of a worker's CPU: an answer's end event and its
    job's ack went out as two writes, one after the other). Here an item put
    behind one that is still waiting joins it, as long as neither closes the
    connection and the two stay under :data:`MERGED_MAX`. Drain waiters (a
    publish's or an ack's ``wait=True``, the writer's backpressure) join too:
    the merged item carries one that, once the writer has drained the socket
    after it, releases each of them (a drain is about the socket's buffer, not
    whose bytes are in it). Nothing waits to be merged: an item put while the
    queue is empty goes out as soon as the writer runs, as before. The order of
    bytes on the connection is unchanged, and so is the bound: the queue still
    holds at most ``maxsize`` items, and a put to a full queue waits as before,
    merged or not. (Until waiters joined too, every job's acked end item was a
    wall the next job's frames could not join: ten of them filled aiormq's
    ten-item queue and the next publish fell back to ``basic_publish``.)
    """

    def _put(self, item: ChannelFrame) -> None:
        waiting = self._queue  # type: ignore[attr-defined]
        if waiting and not item.should_close:
            last: ChannelFrame = waiting[-1]
            if not last.should_close and len(last.payload) + len(item.payload) <= MERGED_MAX:
                waiting[-1] = ChannelFrame(
                    payload=last.payload + item.payload,
                    should_close=False,
                    drain_future=_both(last.drain_future, item.drain_future),
                )
                # put_nowait counts the item as unfinished after this: one item, not two.
                self._unfinished_tasks -= 1  # type: ignore[attr-defined]
                return
        waiting.append(item)


def _both(
    first: asyncio.Future[Any] | None, second: asyncio.Future[Any] | None
) -> asyncio.Future[Any] | None:
    """One drain waiter standing for two: once set, it sets whichever still waits.

    Each of the two is its channel's own future, which the channel fails if it
    closes first; the one made here is only ever set by the writer's drain."""
    if first is None or first.done():
        return second
    if second is None or second.done():
        return first
    both: asyncio.Future[Any] = first.get_loop().create_future()
    both.add_done_callback(lambda _: _release(first, second))
    return both


def _release(*waiters: asyncio.Future[Any]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


_aiormq_receiver = aiormq.connection.FrameReceiver
_aiormq_init = aiormq.connection.Connection.__init__


def _connection_init(self: aiormq.connection.Connection, *args: Any, **kwargs: Any) -> None:
    _aiormq_init(self, *args, **kwargs)
    self.write_queue = WriteQueue(maxsize=self.write_queue.maxsize)


def install() -> None:
    """Make aiormq connections read with ``FrameReader``, write with ``marshal`` and
    merge waiting writes (``WriteQueue``).

    Idempotent; a connection already made keeps the reader and queue it was made with.
    """
    aiormq.connection.FrameReceiver = FrameReader  # type: ignore[misc, assignment]
    pamqp.frame.marshal = marshal  # aiormq's ChannelFrame.marshall calls it by this name
    aiormq.connection.Connection.__init__ = _connection_init  # type: ignore[method-assign]


def uninstall() -> None:
    """Back to aiormq's reader, pamqp's marshal and a plain queue (the probe's comparison,
    tests)."""
    aiormq.connection.FrameReceiver = _aiormq_receiver  # type: ignore[misc]
    pamqp.frame.marshal = _pamqp_marshal
    aiormq.connection.Connection.__init__ = _aiormq_init  # type: ignore[method-assign]


Consumer = Callable[[DeliveredMessage], Coroutine[Any, Any, None] | None]


class Deliveries:
    """A channel's messages for consumers of ours, handed over as their frames arrive.

    aiormq's connection reader puts each frame of a channel on the channel's queue,
    from which the channel's reader task takes the three frames of a message one at a
    time, gathers the body and starts a task for the consumer. This stands in for the
    queue's ``put``: a delivery to a consumer registered here is gathered as its frames
    come and handed to the consumer at once (a coroutine consumer in a task of the
    channel's own, as aiormq runs it, so closing the channel cancels it as before); every
    other frame goes on to the queue. The consumer is registered before the broker knows
    its tag, so no delivery of it takes the queue and overtakes another.
    """

    def __init__(self, channel: aiormq.Channel) -> None:
        self._channel = channel
        self._put = channel.frames.put
        self._consumers: dict[str, tuple[Consumer, bool]] = {}
        # The message being gathered: its delivery, header, body parts and bytes so far.
        self._deliver: Basic.Deliver | None = None
        self._header: ContentHeader | None = None
        self._parts: list[bytes] = []
        self._size = 0

    @classmethod
    def of(cls, channel: aiormq.Channel) -> Deliveries:
        """The channel's, put in place of its queue's ``put`` on first use."""
        put = channel.frames.put
        if isinstance(put, cls):
            return put
        deliveries = cls(channel)
        channel.frames.put = deliveries  # type: ignore[method-assign]
        return deliveries

    def add(self, consumer_tag: str, consumer: Consumer) -> None:
        self._consumers[consumer_tag] = (consumer, inspect.iscoroutinefunction(consumer))

    async def __call__(self, item: tuple[int, pamqp.frame.FrameTypes]) -> None:
        frame = item[1]
        kind = type(frame)
        if self._deliver is None:
            if kind is Basic.Deliver and frame.consumer_tag in self._consumers:  # type: ignore[union-attr]
                self._deliver = frame  # type: ignore[assignment]
                return
            if kind in (Basic.CancelOk, Basic.Cancel):  # no more deliveries to that tag
                self._consumers.pop(frame.consumer_tag, None)  # type: ignore[union-attr]
            await self._put(item)
            return
        header = self._header
        if header is None and kind is ContentHeader:
            header = self._header = frame  # type: ignore[assignment]
        elif header is not None and kind is ContentBody:
            self._parts.append(frame.value)  # type: ignore[union-attr]
            self._size += len(frame.value)  # type: ignore[union-attr]
        else:
            # Not the next frame of a message: the broker broke the protocol. The
            # message is dropped, the frame goes on, and aiormq decides (it closes
            # the channel on a frame it does not expect).
            log.error("amqp.unexpected_frame", frame=kind.__name__)
            self._reset()
            await self._put(item)
            return
        if header is not None and self._size >= header.body_size:
            self._hand_over(self._deliver, header)

    def _reset(self) -> None:
        self._deliver, self._header, self._parts, self._size = None, None, [], 0

    def _hand_over(self, deliver: Basic.Deliver, header: ContentHeader) -> None:
        parts = self._parts
        self._reset()
        channel = self._channel
        message = DeliveredMessage(
            delivery=deliver,
            header=header,
            body=parts[0] if len(parts) == 1 else b"".join(parts),
            channel=channel,
        )
        consumer, coroutine = self._consumers[deliver.consumer_tag]  # type: ignore[index]
        if coroutine:
            task = channel.create_task(consumer(message))  # type: ignore[arg-type]
            task.add_done_callback(channel._on_consumer_done)
            return
        try:
            consumer(message)
        except Exception as exc:  # a consumer's bug must not stop the connection's reader
            # The error's type only: its text could quote the message.
            log.error("amqp.consumer_failed", error=type(exc).__name__)
