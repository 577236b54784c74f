"""One chat job, from publish to its terminal event: the part both surfaces share.

A :class:`ChatRun` publishes the job, then fences the events that come back:
only one attempt is relayed, its ``seq`` must have no gaps, and the worker
must not fall silent. What differs between the seed's format and OpenAI's is
only how the results are rendered, which the surfaces do.

A worker that dies before the caller saw anything is invisible: RabbitMQ
redelivers the job, the next attempt's events replace the first's. Once text
has reached a streaming caller it cannot be taken back, so a new attempt
then ends the stream with exactly one ``worker_lost`` error.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog

from services.gateway.job_client import (
    DeadJob,
    Inbox,
    Incoming,
    Interrupted,
    JobClient,
    LostConnection,
    Started,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.slots import Slots
from shared import tokens
from shared.clock import now_ms
from shared.errors import (
    BackendUnavailable,
    BotlineError,
    DeadlineExceeded,
    JobFailed,
    Overloaded,
    WorkerLost,
    error_from_code,
)
from shared.priority import AGED_LEVELS, class_of
from shared.wire import ChatJob, DeltaEvent, EndEvent, ErrorEvent, Usage

# The model endpoint that answered, on both surfaces' responses.
ENDPOINT_HEADER = "x-botline-endpoint"


log = structlog.get_logger("botline.gateway.chat_run")


def new_job_id() -> str:
    """A job id, shaped like OpenAI's completion ids."""
    return "chatcmpl-" + secrets.token_urlsafe(18)


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer."""

    text: str
    finish_reason: str
    usage: Usage
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def merge_tool_calls(chunks: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Whole tool calls from streamed fragments, the way OpenAI's clients join them."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for part in chunk:
            call = calls.setdefault(
                int(part.get("index", 0)),
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if part.get("id"):
                call["id"] = part["id"]
            if part.get("type"):
                call["type"] = part["type"]
            function = part.get("function") or {}
            for name in ("name", "arguments"):
                if function.get(name):
                    call["function"][name] += function[name]
    return [calls[i] for i in sorted(calls)]


class ChatRun:
    """Runs one job; use as ``async with ChatRun(...) as run`` then ``complete()`` or ``stream()``.

    Leaving the block before the terminal event (the caller went away, a
    timeout, an error) cancels the job on the workers.
    """

    # One per request in flight: slots instead of an instance dict (1.6 KiB -> 0.3 KiB
    # for this many attributes on Python 3.11, measured with tracemalloc).
    __slots__ = (
        "_aging",
        "_aging_s",
        "_attempt",
        "_began",
        "_client",
        "_deadline",
        "_deadline_s",
        "_done",
        "_event_timeout_s",
        "_in_flight",
        "_interrupt",
        "_lowered",
        "_metrics",
        "_next_age",
        "_on_first_token",
        "_prompt_estimate",
        "_published",
        "_queue",
        "_queued",
        "_sent",
        "_seq",
        "_slot",
        "_slots",
        "_wait_until",
        "endpoint",
        "job",
        "priority",
        "usage",
    )

    def __init__(
        self,
        job_client: JobClient,
        job: ChatJob,
        *,
        deadline_s: float,
        event_timeout_s: float,
        prompt_estimate: int | None = None,
        metrics: GatewayMetrics | None = None,
        on_first_token: Callable[[], None] | None = None,
        priority: int | None = None,
        aging_s: float | None = None,
        slots: Slots | None = None,
        lowered: bool = False,
    ):
        self.job = job
        # The job's message priority on the queue (shared/priority.py).
        self.priority = priority
        self._metrics = metrics
        # Called once, when a stream's first piece is handed to the caller.
        self._on_first_token = on_first_token
        self._published = 0.0
        self._in_flight = False
        # This gateway's slots (services/gateway/slots.py): a lowered job (its
        # key over its share) may be held there before it is published.
        self._slots = slots
        self._lowered = lowered
        self._slot = False
        self._client = job_client
        self._deadline = asyncio.get_running_loop().time() + deadline_s
        self._deadline_s = deadline_s
        self._event_timeout_s = event_timeout_s
        self._queue: Inbox | None = None
        self._attempt: int | None = None
        self._seq = 0
        self._done = False
        # An error the gateway ends the run with before its queue exists.
        self._interrupt: BotlineError | None = None
        self._queued = False
        # Whether a worker took the job from the queue (its first beat or event).
        self._began = False
        # A job with copies allowed (``ChatJob.once``) is published again a
        # class higher each ``aging_s`` it waits: aging, so a low job is not
        # starved by a stream of higher ones (shared/priority.py).
        self._aging = list(AGED_LEVELS) if job.once and aging_s else []
        self._next_age = (
            asyncio.get_running_loop().time() + aging_s if self._aging and aging_s else None
        )
        self._aging_s = aging_s or 0.0
        # Until when (loop time) the job may wait in the queue; None: its deadline.
        self._wait_until = (
            None
            if job.wait_until_ms is None
            else asyncio.get_running_loop().time() + (job.wait_until_ms - now_ms()) / 1000
        )
        # The answer's usage, once its end event arrived.
        self.usage: Usage | None = None
        # What the relayed attempt sent before its end: charged if none comes.
        self._sent: list[str] = []
        self._prompt_estimate = prompt_estimate
        # The model endpoint that answered (``x-botline-endpoint``), once known.
        self.endpoint = ""

    @property
    def prompt_estimate(self) -> int:
        """The estimated tokens of the job's prompt (computed once, on first use)."""
        if self._prompt_estimate is None:
            self._prompt_estimate = tokens.estimate_prompt(self.job.messages)
        return self._prompt_estimate

    def charge(self) -> Usage:
        """What the request costs, however it ended.

        The answer's own usage once its end event came. Otherwise (the caller
        hung up, a failure mid-answer) what the model had sent for it: the
        prompt's estimate plus the estimate of the text received (for a
        stream, the text relayed to the caller), and nothing if no text came.
        """
        if self.usage is not None:
            return self.usage
        if not self._sent:
            return Usage()
        return Usage(
            prompt_tokens=self.prompt_estimate,
            completion_tokens=tokens.estimate("".join(self._sent)),
        )

    def interrupt(self, error: BotlineError) -> None:
        """End the run with ``error`` after the events already received (its key was revoked).

        A stream that started ends with one error event; a whole answer, or a
        stream not started, raises it. Leaving the run then cancels the job.
        """
        if self._queue is None:
            self._interrupt = self._interrupt or error
        elif not self._done:
            self._queue.put_nowait(Interrupted(error))

    async def __aenter__(self) -> ChatRun:
        self._queue = self._client.register(self.job.job_id)
        if self._interrupt is not None:
            self._queue.put_nowait(Interrupted(self._interrupt))
        # A wait in the gateway for a slot is a wait in the queue, for the metrics too.
        self._published = time.perf_counter()
        try:
            if self._slots is not None:
                await self._take_slot(self._slots)
            await self._client.submit(self.job, priority=self.priority)
        except BaseException:
            self._client.forget(self.job.job_id)
            self._give_slot()
            raise
        if self._metrics is not None:
            self._metrics.jobs_in_flight.inc()
            self._in_flight = True
        self._queued = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.forget(self.job.job_id)
        if not self._done:
            self._client.cancel(self.job.job_id)
        self._give_slot()
        if self._in_flight and self._metrics is not None:
            self._metrics.jobs_in_flight.dec()
            self._in_flight = False

    async def _take_slot(self, slots: Slots) -> None:
        """Take a slot; a lowered job may wait for one, within the bounds of its wait in the queue.

        Nothing is published meanwhile: a timeout gives the error the queue
        would have given, a revoked key its error, a caller who left is gone.
        """
        assert self._queue is not None
        held = slots.take(self._lowered, self.priority or 0)
        if held is None:
            self._slot = True
            return
        if self._metrics is not None:
            self._metrics.fair_share.labels("held").inc()
        loop = asyncio.get_running_loop()
        until = min(self._deadline, self._wait_until or self._deadline)
        # Before the publish, only the gateway's own events can come: Interrupted, LOST.
        event = asyncio.ensure_future(self._queue.get())
        try:
            await asyncio.wait(
                (held, event),
                timeout=max(until - loop.time(), 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            self._slot = slots.leave(held)
            came = event.result() if event.done() and not event.cancelled() else None
            event.cancel()
        if isinstance(came, Interrupted):
            raise came.error
        if isinstance(came, LostConnection):
            raise BackendUnavailable("the connection to the job queue was lost")
        if came is not None:  # pragma: no cover -- nothing else comes before the publish
            self._queue.put_nowait(came)
        if not self._slot:
            raise self._timed_out_waiting()

    def _give_slot(self) -> None:
        if self._slot and self._slots is not None:
            self._slot = False
            self._slots.give()

    def _timed_out_waiting(self) -> BotlineError:
        """The error of a job still waiting for a worker at the end of its wait."""
        if self._wait_until is not None and self._wait_until < self._deadline:
            # Every worker stayed busy for the job's share of the deadline.
            client = self._client
            error = Overloaded("every worker is busy; try again later")
            error.retry_after = client.drain.retry_after(
                client.waiting, self._deadline - self._wait_until
            )
            return error
        return DeadlineExceeded(f"no answer within {self._deadline_s:g} s")

    @property
    def abandoned(self) -> bool:
        """Whether the job was queued but its end never came back: nobody waits for it now."""
        return self._queued and not self._done

    async def _next(self) -> Incoming:
        assert self._queue is not None, "use ChatRun as an async context manager"
        while self._next_age is not None and not self._began:
            # Waiting in the queue: until the next aging step, then publish a copy.
            loop = asyncio.get_running_loop()
            if self._next_age >= min(self._deadline, self._wait_until or self._deadline):
                break  # the job's wait ends first
            pause = self._next_age - loop.time()
            if pause > 0:
                try:
                    return await self._queue.get(pause)
                except TimeoutError:
                    pass
            await self._age()
        return await self._wait_next()

    async def _age(self) -> None:
        """Publish the waiting job again, one class higher (the first copy taken runs)."""
        level = self._aging.pop(0)
        self._next_age = asyncio.get_running_loop().time() + self._aging_s if self._aging else None
        try:
            await self._client.submit(self.job, priority=level)
        except BotlineError as exc:
            log.info("job.aging_failed", code=exc.code)  # the first copy still waits
            return
        log.info("job.aged", priority=level)
        if self._metrics is not None:
            self._metrics.jobs_aged.inc()

    async def _wait_next(self) -> Incoming:
        assert self._queue is not None
        if not self._queue.empty():
            # Already here (a worker's first event comes with its start): no timer.
            return await self._queue.get()
        remaining = self._deadline - asyncio.get_running_loop().time()
        # Before the first event the job may be waiting in the queue: only the
        # deadline applies. After it, a silent worker is a stuck worker.
        started = self._attempt is not None
        wait = min(remaining, self._event_timeout_s) if started else remaining
        queued = not self._began and self._wait_until is not None
        if queued:
            assert self._wait_until is not None
            wait = min(wait, self._wait_until - asyncio.get_running_loop().time())
        try:
            return await self._queue.get(max(wait, 0.0))
        except TimeoutError:
            if queued and wait < remaining:
                raise self._timed_out_waiting() from None
            if started and wait < remaining:
                raise DeadlineExceeded(
                    f"the worker sent nothing for {self._event_timeout_s:g} s"
                ) from None
            raise DeadlineExceeded(f"no answer within {self._deadline_s:g} s") from None

    async def _events(self, restartable: bool) -> AsyncGenerator[DeltaEvent | EndEvent, None]:
        """The relayed attempt's deltas and end; raises the job's error, if any."""
        relayed = False
        while True:
            event = await self._next()
            if isinstance(event, Interrupted):
                raise event.error
            if isinstance(event, DeadJob):
                self._done = True
                raise JobFailed("the job failed on several workers and was given up")
            if isinstance(event, LostConnection):
                raise BackendUnavailable("the connection to the job queue was lost")
            if isinstance(event, Started):
                if not self._began and self._metrics is not None:
                    # A worker's first word on this job: the end of its wait in the queue.
                    waited = time.perf_counter() - self._published
                    self._metrics.queued(class_of(self.priority), waited)
                self._began = True
                continue
            if self._attempt is None or event.attempt > self._attempt:
                if relayed and not restartable:
                    raise WorkerLost("the worker answering this request was lost")
                self._attempt, self._seq = event.attempt, 0
                self._sent.clear()  # the caller is sent the new attempt's answer instead
            elif event.attempt < self._attempt:
                continue  # a late event of an attempt we gave up on
            if event.seq != self._seq:
                raise WorkerLost(f"events out of order (expected {self._seq}, got {event.seq})")
            self._seq += 1
            if not isinstance(event, ErrorEvent) and event.endpoint:
                self._answered_by(event.endpoint)
            if isinstance(event, DeltaEvent):
                if not relayed and not restartable:
                    self._first_token()
                relayed = True
                self._note_sent(event)
                yield event
                del event  # not held while the next one is awaited
                continue
            self._done = True
            if isinstance(event, EndEvent):
                self.usage = event.usage
                if not relayed and not restartable:
                    self._first_token()  # a one-piece answer: its text comes with its end
                yield event
                return
            raise error_from_code(event.code, event.message)

    def _note_sent(self, event: DeltaEvent) -> None:
        # Only kept, not counted: most answers end with the worker's own usage.
        if event.text:
            self._sent.append(event.text)
        for chunk in event.tool_calls:
            for part in chunk:
                function = part.get("function") or {}
                for name in ("name", "arguments"):
                    if isinstance(function.get(name), str):
                        self._sent.append(" " + function[name])

    def _first_token(self) -> None:
        if self._on_first_token is not None:
            self._on_first_token()
            self._on_first_token = None

    def _answered_by(self, endpoint: str) -> None:
        if endpoint != self.endpoint:
            self.endpoint = endpoint
            # On the request's one log line too.
            structlog.contextvars.bind_contextvars(endpoint=endpoint)

    def headers(self) -> dict[str, str]:
        """Response headers about the run: the endpoint that answered."""
        return {ENDPOINT_HEADER: self.endpoint} if self.endpoint else {}

    async def complete(self) -> Answer:
        """Wait for the whole answer. A retried job restarts it unseen."""
        parts: list[str] = []
        tool_chunks: list[list[dict[str, Any]]] = []
        attempt = None
        # Closed here, not left to the garbage collector: a generator dropped
        # unfinished is closed by a task the loop is woken for from "another
        # thread" (uvloop's finalizer hook), a task and two system calls a request.
        async with contextlib.aclosing(self._events(restartable=True)) as events:
            async for event in events:
                if event.attempt != attempt:
                    parts.clear()
                    tool_chunks.clear()
                    attempt = event.attempt
                parts.append(event.text)
                if isinstance(event, DeltaEvent):
                    tool_chunks += event.tool_calls
                else:
                    return Answer(
                        "".join(parts),
                        event.finish_reason,
                        event.usage,
                        merge_tool_calls(tool_chunks),
                    )
        raise WorkerLost("the answer ended without an end event")  # pragma: no cover

    def stream(self) -> AsyncGenerator[DeltaEvent | EndEvent, None]:
        """The answer as it comes; the last item is the :class:`EndEvent`."""
        return self._events(restartable=False)
