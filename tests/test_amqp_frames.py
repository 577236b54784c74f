"""shared/amqp_frames.py: the same bytes and objects as pamqp, and aiormq on it end to end."""

from __future__ import annotations

import asyncio
import datetime
import string
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.abc
import pamqp.frame
import pytest
import structlog.testing
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from shared import amqp_frames
from shared.amqp import Outgoing, ack_delivery, consume, publish, publish_now
from shared.settings import CommonSettings

_PAMQP_MARSHAL = amqp_frames._pamqp_marshal
_PAMQP_UNMARSHAL = pamqp.frame.unmarshal

short = st.text(max_size=40) | st.text(alphabet=string.ascii_letters, min_size=255, max_size=255)
maybe_short = st.none() | short
octet = st.none() | st.integers(0, 255)
table = st.none() | st.dictionaries(
    st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=20),
    st.integers(-(2**31), 2**31 - 1) | st.text(max_size=30) | st.booleans(),
    max_size=4,
)
stamp = st.none() | st.datetimes(
    min_value=datetime.datetime(1971, 1, 1), max_value=datetime.datetime(2100, 1, 1)
).map(lambda moment: moment.replace(microsecond=0, tzinfo=datetime.UTC))
properties = st.builds(
    spec.Basic.Properties,
    content_type=maybe_short,
    content_encoding=maybe_short,
    headers=table,
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=octet,
    correlation_id=maybe_short,
    reply_to=maybe_short,
    expiration=maybe_short,
    message_id=maybe_short,
    timestamp=stamp,
    message_type=maybe_short,
    user_id=maybe_short,
    app_id=maybe_short,
)
exchange_name = st.text(alphabet=string.ascii_letters + string.digits + "-_.:", max_size=60)
channel_number = st.integers(0, 65535)


def _fields(frame: object) -> object:
    """What a frame holds, to compare ours with pamqp's."""
    if isinstance(frame, ContentHeader):
        props = frame.properties
        return (
            "header",
            frame.class_id,
            frame.weight,
            frame.body_size,
            {name: getattr(props, name) for name in spec.Basic.Properties.__slots__},
        )
    if isinstance(frame, ContentBody):
        return ("body", frame.value)
    if isinstance(frame, Heartbeat):
        return ("heartbeat",)
    slots = type(frame).__slots__  # type: ignore[attr-defined]
    return (type(frame).__name__, {name: getattr(frame, name) for name in slots})


def _both_ways(frame: pamqp.frame.FrameTypes, channel: int) -> None:
    data = amqp_frames.marshal(frame, channel)
    assert data == _PAMQP_MARSHAL(frame, channel)
    ours, theirs = amqp_frames.unmarshal(data), _PAMQP_UNMARSHAL(data)
    assert ours[:2] == theirs[:2] == (len(data), channel)
    assert _fields(ours[2]) == _fields(theirs[2])
    assert type(ours[2]) is type(theirs[2])


@settings(max_examples=300, deadline=None)
@given(props=properties, size=st.integers(0, 2**40), channel=channel_number)
def test_content_header_as_pamqp(props: spec.Basic.Properties, size: int, channel: int) -> None:
    _both_ways(ContentHeader(body_size=size, properties=props), channel)


def test_headers_coded_again_from_the_cache_as_pamqp() -> None:
    # The same table twice (the second from the cache), and values equal but of other
    # types (1 and True hash alike), and ones never cached (a nested table).
    tables: list[dict[str, Any]] = [
        {"x-botline-gateway": "gw-1"},
        {"x-botline-gateway": "gw-1"},
        {"a": 1},
        {"a": True},
        {"a": 1},
        {"b": {"c": 2}},
        {"b": {"c": 2}},
    ]
    for headers in tables:
        _both_ways(ContentHeader(body_size=1, properties=spec.Basic.Properties(headers=headers)), 1)


@settings(max_examples=100, deadline=None)
@given(value=st.binary(min_size=1, max_size=3000), channel=channel_number)
def test_content_body_as_pamqp(value: bytes, channel: int) -> None:
    _both_ways(ContentBody(value), channel)


@settings(max_examples=200, deadline=None)
@given(
    exchange=exchange_name,
    routing_key=short,
    mandatory=st.booleans(),
    immediate=st.booleans(),
    channel=channel_number,
)
def test_publish_as_pamqp(
    exchange: str, routing_key: str, mandatory: bool, immediate: bool, channel: int
) -> None:
    frame = spec.Basic.Publish(
        exchange=exchange, routing_key=routing_key, mandatory=mandatory, immediate=immediate
    )
    _both_ways(frame, channel)


@settings(max_examples=200, deadline=None)
@given(
    props=properties,
    body=st.binary(max_size=300),
    max_content=st.integers(1, 400),
    exchange=exchange_name,
    routing_key=short,
    mandatory=st.booleans(),
    channel=channel_number,
)
def test_publish_frames_as_aiormq_writes_them(
    props: spec.Basic.Properties,
    body: bytes,
    max_content: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    channel: int,
) -> None:
    # aiormq's basic_publish: the method, the header, the body cut at max_content_size.
    frames: list[pamqp.frame.FrameTypes] = [
        spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(body_size=len(body), properties=props),
    ]
    frames += [ContentBody(body[at : at + max_content]) for at in range(0, len(body), max_content)]
    theirs = b"".join(_PAMQP_MARSHAL(frame, channel) for frame in frames)
    ours = amqp_frames.publish_frames(
        channel,
        body,
        props,
        exchange=exchange,
        routing_key=routing_key,
        mandatory=mandatory,
        max_content=max_content,
    )
    assert ours == theirs


@settings(max_examples=200, deadline=None)
@given(
    consumer_tag=short,
    delivery_tag=st.integers(0, 2**63 - 1),
    redelivered=st.booleans(),
    exchange=exchange_name,
    routing_key=short,
    multiple=st.booleans(),
    requeue=st.booleans(),
)
def test_deliver_and_confirms_as_pamqp(
    consumer_tag: str,
    delivery_tag: int,
    redelivered: bool,
    exchange: str,
    routing_key: str,
    multiple: bool,
    requeue: bool,
) -> None:
    deliver = spec.Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
    _both_ways(deliver, 1)
    _both_ways(spec.Basic.Ack(delivery_tag, multiple), 1)
    _both_ways(spec.Basic.Nack(delivery_tag, multiple, requeue), 1)


@pytest.mark.parametrize(
    "frame",
    [
        spec.Basic.ConsumeOk("ctag"),
        spec.Queue.DeclareOk("q", 3, 1),
        spec.Channel.Close(406, "PRECONDITION_FAILED", 50, 10),
        spec.Basic.Return(312, "NO_ROUTE", "ex", "rk"),
        spec.Basic.Reject(7, requeue=True),
        Heartbeat(),
    ],
    ids=lambda frame: type(frame).__name__,
)
def test_other_frames_are_pamqps(frame: pamqp.frame.FrameTypes) -> None:
    _both_ways(frame, 0 if isinstance(frame, Heartbeat) else 5)


def test_a_header_of_a_wider_flag_word_goes_to_pamqp() -> None:
    # A continuation bit in the first flag word: not ours to read; pamqp decides.
    data = _PAMQP_MARSHAL(ContentHeader(body_size=3), 1)
    wide = bytearray(data)
    wide[7 + 13] |= 1  # the low bit of the flag word
    with pytest.raises(pamqp.exceptions.UnmarshalingException):
        _PAMQP_UNMARSHAL(bytes(wide))
    with pytest.raises(pamqp.exceptions.UnmarshalingException):
        amqp_frames.unmarshal(bytes(wide))


def test_a_truncated_deliver_is_an_unmarshaling_error() -> None:
    data = _PAMQP_MARSHAL(spec.Basic.Deliver("ctag", 1, False, "ex", "rk"), 1)
    cut = data[:-6] + b"\xce"
    cut = cut[:3] + (len(cut) - 8).to_bytes(4, "big") + cut[7:]
    with pytest.raises(pamqp.exceptions.UnmarshalingException):
        amqp_frames.unmarshal(cut)


def _stream(*chunks: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


def _message_frames() -> list[bytes]:
    props = spec.Basic.Properties(content_type="application/json", correlation_id="job-1")
    return [
        _PAMQP_MARSHAL(spec.Basic.Deliver("ctag", 9, False, "", "q"), 1),
        _PAMQP_MARSHAL(ContentHeader(body_size=7, properties=props), 1),
        _PAMQP_MARSHAL(ContentBody(b'{"a":1}'), 1),
        _PAMQP_MARSHAL(Heartbeat(), 0),
    ]


def _splits(data: bytes) -> Iterator[list[bytes]]:
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]


async def test_reader_gives_every_frame_however_the_bytes_arrive() -> None:
    frames = _message_frames()
    expected = [_fields(_PAMQP_UNMARSHAL(frame)[2]) for frame in frames]
    for chunks in _splits(b"".join(frames)):
        reader = amqp_frames.FrameReader(_stream(*chunks))
        got = [_fields(frame) async for _, _, frame in reader]
        assert got == expected


async def test_reader_errors_like_aiormqs() -> None:
    whole = b"".join(_message_frames())
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        async for _ in amqp_frames.FrameReader(_stream(whole[:-3])):
            pass
    broken = bytearray(whole)
    broken[len(_message_frames()[0]) - 1] = 0  # the first frame's end octet
    with pytest.raises(InvalidFrameError):
        await amqp_frames.FrameReader(_stream(bytes(broken))).get_frame()
    with pytest.raises(ProtocolSyntaxError):
        await amqp_frames.FrameReader(_stream(b"AMQP\x00\x00\x09\x01")).get_frame()


@pytest.fixture
def installed() -> Iterator[None]:
    amqp_frames.install()
    try:
        yield
    finally:
        amqp_frames.uninstall()


@pytest.mark.integration
@pytest.mark.usefixtures("installed")
async def test_aiormq_on_our_frames_against_rabbitmq(monkeypatch: pytest.MonkeyPatch) -> None:
    # Confirms, properties with headers, a body over several frames, acks: all through
    # FrameReader and marshal, checked against what was sent.
    coded: dict[str, int] = {"marshal": 0, "unmarshal": 0}

    def counted(name: str, code: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            coded[name] += 1
            return code(*args)

        return call

    assert pamqp.frame.marshal is amqp_frames.marshal
    monkeypatch.setattr(pamqp.frame, "marshal", counted("marshal", amqp_frames.marshal))
    monkeypatch.setattr(amqp_frames, "unmarshal", counted("unmarshal", amqp_frames.unmarshal))
    async with asyncio.timeout(30):
        connection = await aiormq.connect(CommonSettings().amqp_urls[0])
        try:
            channel = await connection.channel(publisher_confirms=True)
            declared = await channel.queue_declare(exclusive=True, auto_delete=True)
            queue = declared.queue
            assert queue is not None
            frame_max = connection.connection_tune.frame_max
            bodies = [b"", b"x", b'{"text":"tok"}' * 10, bytes(range(256)) * (frame_max // 100)]
            got: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()
            await channel.basic_consume(queue, got.put)
            for i, body in enumerate(bodies):
                props = spec.Basic.Properties(
                    content_type="application/json",
                    delivery_mode=1,
                    correlation_id=f"job-{i}",
                    headers={"x-botline-attempt": i, "x-botline-gateway": "gw-1"},
                    expiration="60000",
                    priority=3,
                )
                confirm = await channel.basic_publish(body, routing_key=queue, properties=props)
                assert isinstance(confirm, spec.Basic.Ack)
            for i, body in enumerate(bodies):
                message = await got.get()
                assert message.body == body
                header = message.header.properties
                assert header.correlation_id == f"job-{i}"
                assert header.headers == {"x-botline-attempt": i, "x-botline-gateway": "gw-1"}
                assert (header.expiration, header.priority) == ("60000", 3)
                assert message.delivery_tag is not None
                await channel.basic_ack(message.delivery_tag)
            # Every message acked: a passive declare sees none left.
            left = await channel.queue_declare(queue, passive=True)
            assert left.message_count == 0
            # 4 publishes of 3+ frames, 4 acks; 4 deliveries of 3+ frames, 4 confirms.
            assert coded["marshal"] >= 16
            assert coded["unmarshal"] >= 16
        finally:
            await connection.close()


@pytest.fixture
async def amqp_channel() -> AsyncIterator[tuple[aio_pika.abc.AbstractChannel, str]]:
    """A channel of a connection of its own, and an exclusive queue on it."""
    connection = await aio_pika.connect(CommonSettings().amqp_urls[0], timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=False)
        # Not auto-deleted: it outlives a cancelled consumer (exclusive: not the connection).
        queue = await channel.declare_queue(exclusive=True)
        yield channel, queue.name
    finally:
        await connection.close()


async def _send(channel: aio_pika.abc.AbstractChannel, queue: str, bodies: list[bytes]) -> None:
    for i, body in enumerate(bodies):
        await publish(channel, body, routing_key=queue, message_id=f"m-{i}", correlation_id=str(i))


def _bodies(frame_max: int) -> list[bytes]:
    # Empty, small, and one over several body frames.
    return (
        [b"", b"x"] + [b'{"i":%d}' % i for i in range(50)] + [bytes(range(256)) * (frame_max // 90)]
    )


@pytest.mark.integration
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("kind", ["function", "coroutine"])
async def test_consume_hands_every_delivery_over_in_order(
    amqp_channel: tuple[aio_pika.abc.AbstractChannel, str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    channel, queue = amqp_channel
    raw = cast(aiormq.Channel, await channel.get_underlay_channel())
    # aiormq's own delivery path must not be taken for these.
    through_queue: list[object] = []

    async def by_aiormq(self: aiormq.Channel, frame: spec.Basic.Deliver) -> None:
        through_queue.append(frame)

    monkeypatch.setattr(aiormq.Channel, "_on_deliver_frame", by_aiormq)
    got: list[aiormq.abc.DeliveredMessage] = []
    tasks: list[asyncio.Task[object] | None] = []
    all_in = asyncio.Event()
    bodies = _bodies(raw.connection.connection_tune.frame_max)

    def take(message: aiormq.abc.DeliveredMessage) -> None:
        got.append(message)
        tasks.append(asyncio.current_task())
        if len(got) == len(bodies):
            all_in.set()

    async def take_later(message: aiormq.abc.DeliveredMessage) -> None:
        take(message)

    tag = await consume(channel, queue, take if kind == "function" else take_later, no_ack=True)
    await _send(channel, queue, bodies)
    async with asyncio.timeout(20):
        await all_in.wait()
    assert [message.body for message in got] == bodies
    assert [message.header.properties.correlation_id for message in got] == [
        str(i) for i in range(len(bodies))
    ]
    assert {message.delivery.consumer_tag for message in got} == {tag}  # type: ignore[union-attr]
    assert through_queue == []
    if kind == "function":
        # Called by the connection's reader, not in a task per message.
        assert len({id(task) for task in tasks}) == 1
    else:
        assert len({id(task) for task in tasks}) == len(bodies)


@pytest.mark.integration
@pytest.mark.usefixtures("installed")
async def test_consume_stops_at_cancel_and_a_closed_channel_cancels_the_consumer(
    amqp_channel: tuple[aio_pika.abc.AbstractChannel, str],
) -> None:
    channel, queue = amqp_channel
    raw = cast(aiormq.Channel, await channel.get_underlay_channel())
    holding = asyncio.Event()
    got: list[bytes] = []
    cancelled: list[bytes] = []
    stopped = asyncio.Event()

    async def hold(message: aiormq.abc.DeliveredMessage) -> None:
        got.append(message.body)
        holding.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(message.body)
            stopped.set()
            raise

    tag = await consume(channel, queue, hold)  # acks owed: the message stays unacked
    await _send(channel, queue, [b"first"])
    async with asyncio.timeout(10):
        await holding.wait()
    await raw.basic_cancel(tag)
    await _send(channel, queue, [b"after cancel"])
    # The broker takes a channel's commands in order: the get sees the message enqueued,
    # and the cancelled consumer did not get it.
    left = await raw.basic_get(queue, no_ack=True)
    assert left.body == b"after cancel"
    assert got == [b"first"]
    # As aiormq's own consumer tasks: closing the channel cancels the consumer.
    await channel.close()
    async with asyncio.timeout(10):
        await stopped.wait()
    assert cancelled == [b"first"]


async def test_a_frame_out_of_place_drops_the_message_and_goes_on() -> None:
    forwarded: list[object] = []

    class Frames:
        async def put(self, item: tuple[int, object]) -> None:
            forwarded.append(item[1])

    class Channel:
        frames = Frames()

    got: list[aiormq.abc.DeliveredMessage] = []
    deliveries = amqp_frames.Deliveries.of(cast(aiormq.Channel, Channel()))
    deliveries.add("ours", got.append)
    header = ContentHeader(body_size=2)
    ours = spec.Basic.Deliver("ours", 1, False, "", "q")
    stray = spec.Basic.Ack(3)
    for frame in (ours, stray, spec.Basic.Deliver("theirs", 2, False, "", "q"), ours, header):
        await deliveries((1, frame))
    await deliveries((1, ContentBody(b"o")))
    await deliveries((1, ContentBody(b"k")))
    assert [message.body for message in got] == [b"ok"]
    assert [type(frame).__name__ for frame in forwarded] == ["Ack", "Deliver"]


@pytest.mark.integration
@pytest.mark.usefixtures("installed")
async def test_confirmed_publishes_each_get_their_own_answer() -> None:
    # Many at once through a write queue of 10: every ack, nack and return must reach
    # the publish it belongs to (the delivery tag taken in the order frames are queued).
    connection = await aio_pika.connect(CommonSettings().amqp_urls[0], timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        room = await channel.declare_queue(exclusive=True)
        full = await channel.declare_queue(
            exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        routes = {"ok": room.name, "nack": full.name, "return": f"nowhere-{id(channel)}"}
        plan = [("ok", "nack", "return")[i % 3] for i in range(300)]

        async def one(i: int, route: str) -> str:
            try:
                await publish(
                    channel,
                    b"%d" % i,
                    routing_key=routes[route],
                    message_id=f"m-{i}",
                    mandatory=True,
                )
            except aiormq.exceptions.PublishError:  # a DeliveryError too: first
                return "return"
            except aiormq.exceptions.DeliveryError:
                return "nack"
            return "ok"

        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(*(one(i, route) for i, route in enumerate(plan)))
        assert outcomes == plan
        raw = cast(aiormq.Channel, await channel.get_underlay_channel())
        assert raw.confirmations == {}
        assert raw.message_id_delivery_tag == {}
        kept = await channel.declare_queue(room.name, passive=True)
        assert kept.declaration_result.message_count == plan.count("ok")
    finally:
        await connection.close()


async def _refusing(
    channel: aio_pika.abc.AbstractChannel, method: str, monkeypatch: pytest.MonkeyPatch
) -> aiormq.Channel:
    """The channel's aiormq channel, ``method`` of it failing the test if called."""
    raw = cast(aiormq.Channel, await channel.get_underlay_channel())

    async def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{method} was called")

    monkeypatch.setattr(raw, method, refuse)
    return raw


@pytest.mark.integration
@pytest.mark.usefixtures("installed")
async def test_a_waiting_publish_returns_once_drained_without_basic_publish(
    amqp_channel: tuple[aio_pika.abc.AbstractChannel, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    channel, queue = amqp_channel
    raw = await _refusing(channel, "basic_publish", monkeypatch)
    async with asyncio.timeout(10):
        for i in range(20):
            await publish(channel, b"%d" % i, routing_key=queue, message_id=f"m-{i}", wait=True)
        # Written and drained: the broker has them, in order.
        got = [await raw.basic_get(queue, no_ack=True) for _ in range(20)]
    assert [message.body for message in got] == [b"%d" % i for i in range(20)]


async def test_a_failing_consumer_is_logged_by_its_error_type_only() -> None:
    class Frames:
        async def put(self, item: tuple[int, object]) -> None:
            raise AssertionError("a delivery of ours went to the queue")

    class Channel:
        frames = Frames()

    def fail(message: aiormq.abc.DeliveredMessage) -> None:
        raise ValueError(f"cannot read {message.body!r}")

    deliveries = amqp_frames.Deliveries.of(cast(aiormq.Channel, Channel()))
    deliveries.add("ours", fail)
    with structlog.testing.capture_logs() as logs:
        for frame in (
            spec.Basic.Deliver("ours", 1, False, "", "q"),
            ContentHeader(body_size=6),
            ContentBody(b"secret"),
        ):
            await deliveries((1, frame))
    assert logs == [{"event": "amqp.consumer_failed", "error": "ValueError", "log_level": "error"}]


def _item(payload: bytes, **kwargs: Any) -> aiormq.abc.ChannelFrame:
    return aiormq.abc.ChannelFrame(payload=payload, should_close=False, **kwargs)


async def test_the_write_queue_merges_waiting_frames_within_its_bounds() -> None:
    queue = amqp_frames.WriteQueue(maxsize=3)
    loop = asyncio.get_running_loop()
    queue.put_nowait(_item(b"a"))
    queue.put_nowait(_item(b"b"))  # joins "a": one write
    first, second, gone = loop.create_future(), loop.create_future(), loop.create_future()
    queue.put_nowait(_item(b"c", drain_future=first))  # joins too, its waiter with it
    queue.put_nowait(_item(b"d"))  # behind a frame with a waiter: joins all the same
    queue.put_nowait(_item(b"e", drain_future=second))  # a second waiter joins
    gone.cancel()  # a waiter that gave up is not carried
    queue.put_nowait(_item(b"f", drain_future=gone))
    queue.put_nowait(_item(b"x" * amqp_frames.MERGED_MAX))  # too big to join: its own item
    queue.put_nowait(_item(b"y" * amqp_frames.MERGED_MAX))  # and again
    with pytest.raises(asyncio.QueueFull):  # still bounded by items, merged or not
        queue.put_nowait(_item(b"z" * amqp_frames.MERGED_MAX))
    closing = aiormq.abc.ChannelFrame(payload=b"close", should_close=True)
    taken = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [t.payload for t in taken] == [
        b"abcdef",
        b"x" * amqp_frames.MERGED_MAX,
        b"y" * amqp_frames.MERGED_MAX,
    ]
    assert taken[0].should_drain
    assert taken[1].drain_future is None
    # The writer drains the socket after the merged item (ChannelFrame.drain): both waiters go.
    assert not first.done()
    assert not second.done()
    taken[0].drain()
    await asyncio.sleep(0)  # its done callbacks run on the loop's next step
    assert first.done()
    assert second.done()
    for _ in taken:
        queue.task_done()
    await asyncio.wait_for(queue.join(), 1)  # one unfinished item per item, not per put
    queue.put_nowait(_item(b"g"))
    queue.put_nowait(closing)  # a close is never merged, nor merged into
    queue.put_nowait(_item(b"h"))
    assert [queue.get_nowait().payload for _ in range(3)] == [b"g", b"close", b"h"]


@pytest.mark.integration
@pytest.mark.usefixtures("installed")
async def test_publishes_queued_together_leave_in_one_write_in_order(
    amqp_channel: tuple[aio_pika.abc.AbstractChannel, str],
) -> None:
    channel, queue = amqp_channel
    raw = cast(aiormq.Channel, await channel.get_underlay_channel())
    writes = raw.connection.write_queue
    assert isinstance(writes, amqp_frames.WriteQueue)
    # Queued in one step of the loop (publish's own path): the writer has not run.
    for i in range(30):
        message = Outgoing(b"%d" % i, spec.Basic.Properties(message_id=f"m{i}"), "", queue)
        assert publish_now(raw, message)
    assert writes.qsize() == 1
    async with asyncio.timeout(10):
        got = [await raw.basic_get(queue, no_ack=True) for _ in range(30)]
    assert [message.body for message in got] == [b"%d" % i for i in range(30)]


@pytest.mark.integration
@pytest.mark.usefixtures("installed")
async def test_acks_settle_deliveries_without_basic_ack_in_the_write_of_what_came_before(
    amqp_channel: tuple[aio_pika.abc.AbstractChannel, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    channel, queue = amqp_channel
    raw = await _refusing(channel, "basic_ack", monkeypatch)
    # ack_delivery refuses once a close has begun by aiormq's own flag for it.
    assert isinstance(getattr(raw, "_Channel__close_event", None), asyncio.Event)
    async with asyncio.timeout(10):
        await _send(channel, queue, [b"a", b"b", b"c"])
        taken = [await raw.basic_get(queue, no_ack=False) for _ in range(3)]
        tags = [cast(int, cast(spec.Basic.GetOk, m.delivery).delivery_tag) for m in taken]
        # An event and the ack behind it, queued in one step of a task (as a job's end
        # and its ack are): the writer has not run in between, one item, one write.
        writes = raw.connection.write_queue
        written: list[bytes] = []
        take = writes.get_nowait

        def record() -> aiormq.abc.ChannelFrame:
            item: aiormq.abc.ChannelFrame = take()
            written.append(item.payload)
            return item

        monkeypatch.setattr(writes, "get_nowait", record)
        reply = Outgoing(b"end", spec.Basic.Properties(message_id="end"), "", queue)
        assert publish_now(raw, reply)
        await ack_delivery(raw, tags[0])
        ack = amqp_frames.ack_frame(raw.number, tags[0])
        assert len(written) == 1
        assert written[0].endswith(ack)
        assert b"end" in written[0]
        await ack_delivery(raw, tags[2])
        # The channel goes with the second unacked: only it comes back (the queue is
        # the connection's), beside the event published ahead of the first ack.
        await channel.close()
        assert raw.is_closed
        with pytest.raises(ChannelInvalidStateError):
            await ack_delivery(raw, tags[1])
        other = await raw.connection.channel()
        left = [await other.basic_get(queue, no_ack=True) for _ in range(2)]
        assert sorted(message.body for message in left) == [b"b", b"end"]
        assert isinstance((await other.basic_get(queue, no_ack=True)).delivery, spec.Basic.GetEmpty)
