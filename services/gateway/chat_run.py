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
import secrets
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog

from services.gateway.job_client import DeadJob, Incoming, JobClient
from shared.errors import DeadlineExceeded, JobFailed, WorkerLost, error_from_code
from shared.wire import ChatJob, DeltaEvent, EndEvent, ErrorEvent, Usage

# The model endpoint that answered, on both surfaces' responses.
ENDPOINT_HEADER = "x-botline-endpoint"


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

    def __init__(
        self, job_client: JobClient, job: ChatJob, *, deadline_s: float, event_timeout_s: float
    ):
        self.job = job
        self._client = job_client
        self._deadline = asyncio.get_running_loop().time() + deadline_s
        self._deadline_s = deadline_s
        self._event_timeout_s = event_timeout_s
        self._queue: asyncio.Queue[Incoming] | None = None
        self._attempt: int | None = None
        self._seq = 0
        self._done = False
        # The answer's usage, once its end event arrived.
        self.usage: Usage | None = None
        # The model endpoint that answered (``x-botline-endpoint``), once known.
        self.endpoint = ""

    async def __aenter__(self) -> ChatRun:
        self._queue = self._client.register(self.job.job_id)
        try:
            await self._client.submit(self.job)
        except BaseException:
            self._client.forget(self.job.job_id)
            raise
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

    async def _next(self) -> Incoming:
        assert self._queue is not None, "use ChatRun as an async context manager"
        remaining = self._deadline - asyncio.get_running_loop().time()
        # Before the first event the job may be waiting in the queue: only the
        # deadline applies. After it, a silent worker is a stuck worker.
        started = self._attempt is not None
        wait = min(remaining, self._event_timeout_s) if started else remaining
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                return await self._queue.get()
        except TimeoutError:
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
            if isinstance(event, DeadJob):
                self._done = True
                raise JobFailed("the job failed on several workers and was given up")
            if self._attempt is None or event.attempt > self._attempt:
                if relayed and not restartable:
                    raise WorkerLost("the worker answering this request was lost")
                self._attempt, self._seq = event.attempt, 0
            elif event.attempt < self._attempt:
                continue  # a late event of an attempt we gave up on
            if event.seq != self._seq:
                raise WorkerLost(f"events out of order (expected {self._seq}, got {event.seq})")
            self._seq += 1
            if not isinstance(event, ErrorEvent) and event.endpoint:
                self._answered_by(event.endpoint)
            if isinstance(event, DeltaEvent):
                relayed = True
                yield event
                continue
            self._done = True
            if isinstance(event, EndEvent):
                self.usage = event.usage
                yield event
                return
            raise error_from_code(event.code, event.message)

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
        async for event in self._events(restartable=True):
            if event.attempt != attempt:
                parts.clear()
                tool_chunks.clear()
                attempt = event.attempt
            parts.append(event.text)
            if isinstance(event, DeltaEvent):
                tool_chunks += event.tool_calls
            else:
                return Answer(
                    "".join(parts), event.finish_reason, event.usage, merge_tool_calls(tool_chunks)
                )
        raise WorkerLost("the answer ended without an end event")  # pragma: no cover

    def stream(self) -> AsyncGenerator[DeltaEvent | EndEvent, None]:
        """The answer as it comes; the last item is the :class:`EndEvent`."""
        return self._events(restartable=False)
