"""What one job produces: its events on their way to the gateway, and the count of outcomes."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractChannel

from services.worker.endpoints import Finish
from shared.amqp import publish
from shared.errors import BotlineError
from shared.wire import BeatEvent, ChatJob, DeltaEvent, EndEvent, ErrorEvent, Usage


class JobEvents:
    """Publishes one attempt's events with a gap-free ``seq``."""

    def __init__(
        self,
        channel: AbstractChannel,
        exchange: str,
        job: ChatJob,
        attempt: int,
        on_first_delta: Callable[[], None] | None = None,
        on_terminal: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._channel = channel
        self._exchange = exchange
        self._job = job
        self._attempt = attempt
        self._seq = 0
        # Called as the first delta leaves (a stream's first token, for the metrics).
        self._on_first_delta = on_first_delta
        # Awaited once the terminal event (end or error) is queued: the job's ack
        # (Worker._call), so it leaves in the same write, ahead of the bookkeeping.
        self._on_terminal = on_terminal
        # Whether the terminal event went out: nothing of this attempt follows it.
        self.ended = False
        # The answer's usage, once its end was sent.
        self.usage: Usage | None = None
        # The endpoint that answered, once known: on the first delta and the end.
        self.endpoint = ""

    async def _send(self, event: DeltaEvent | EndEvent | ErrorEvent) -> None:
        job = self._job
        self._seq += 1
        # No mandatory flag: an event whose gateway is gone goes to the replies'
        # alternate exchange, which brings it back to the workers to stop the job.
        # No event waits for the socket (a first delta must not queue behind other
        # streams' writes); the job's ack, queued right behind its last event and
        # written with it, does, as backpressure: a worker whose broker stops
        # reading stops finishing, and taking, jobs (Worker._call).
        await publish(
            self._channel,
            event.dump(),
            exchange=self._exchange,
            routing_key=job.reply_to,
            message_id=f"{job.job_id}.{self._attempt}.{event.seq}",
            correlation_id=job.job_id,
            message_type=event.type,
        )

    async def beat(self) -> None:
        """A sign of life, outside the ``seq``: bounces back if the gateway is gone."""
        job = self._job
        beat = BeatEvent(job_id=job.job_id, attempt=self._attempt)
        await publish(
            self._channel,
            beat.dump(),
            exchange=self._exchange,
            routing_key=job.reply_to,
            message_id=None,
            correlation_id=job.job_id,
            message_type=beat.type,
        )

    def answered_by(self, endpoint: str) -> None:
        """Name the endpoint that answered on the events still to come."""
        self.endpoint = endpoint

    async def delta(self, text: str, tool_calls: list[list[dict[str, Any]]]) -> None:
        """A piece of the answer (text and/or tool-call fragments)."""
        job = self._job
        if self._on_first_delta is not None:
            self._on_first_delta()
            self._on_first_delta = None
        await self._send(
            DeltaEvent(
                job_id=job.job_id,
                attempt=self._attempt,
                seq=self._seq,
                text=text,
                tool_calls=tool_calls,
                endpoint=self.endpoint if self._seq == 0 else "",
            )
        )

    async def end(self, text: str, finish: Finish) -> None:
        """The last piece, with the finish reason and usage."""
        job = self._job
        self.usage = finish.usage
        self.ended = True
        await self._send(
            EndEvent(
                job_id=job.job_id,
                attempt=self._attempt,
                seq=self._seq,
                text=text,
                finish_reason=finish.finish_reason,
                usage=finish.usage,
                endpoint=self.endpoint,
            )
        )
        await self._terminal()

    async def error(self, error: BotlineError) -> None:
        """The job's one terminal error; nothing once its end or an error went out (the
        deadline may pass as the ack behind its end waits for the socket)."""
        if self.ended:
            return
        self.ended = True
        job = self._job
        await self._send(
            ErrorEvent(
                job_id=job.job_id,
                attempt=self._attempt,
                seq=self._seq,
                code=error.code,
                message=error.message,
            )
        )
        await self._terminal()

    async def _terminal(self) -> None:
        on_terminal, self._on_terminal = self._on_terminal, None
        if on_terminal is not None:
            await on_terminal()


class JobStats:
    """Counts of jobs by outcome (``done``, ``dropped``, error codes); awaitable."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        # Those waiting for a count to change (tests, mostly): a job that ends
        # with nobody waiting costs a dict update, no lock.
        self._waiters: set[asyncio.Future[None]] = set()

    async def add(self, outcome: str) -> None:
        """Count one job."""
        self.counts[outcome] += 1
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()

    async def wait_for(self, outcome: str, count: int, timeout_s: float = 10.0) -> None:
        """Until ``count`` jobs ended with ``outcome``."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            while self.counts[outcome] < count:
                waiter = loop.create_future()
                self._waiters.add(waiter)
                try:
                    await waiter
                finally:
                    self._waiters.discard(waiter)

    @property
    def total(self) -> int:
        """Jobs handled, whatever their outcome."""
        return sum(self.counts.values())
