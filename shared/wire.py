"""What travels between gateway and worker: versioned pydantic messages, JSON on the wire.

Every message has a ``type`` and a version ``v``. Within a version changes are
additive only (readers ignore fields they do not know), so a gateway and a
worker one release apart still understand each other. A job never carries an
API key or an upstream secret.

Events from worker to gateway carry ``job_id``, ``attempt`` (1 + the number of
earlier deliveries of the job) and ``seq`` (0, 1, 2, ... within one attempt, no
gaps). The gateway relays only one attempt and checks the sequence.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    def dump(self) -> bytes:
        """The message as JSON bytes."""
        return self.model_dump_json().encode()


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class Usage(BaseModel):
    """Token counts of one answer."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion."""
        return self.prompt_tokens + self.completion_tokens


class ChatJob(_Wire):
    """A chat request, resolved against its bot, for any worker to answer."""

    type: Literal["chat.job"] = "chat.job"
    v: Literal[1] = 1
    job_id: str
    request_id: str
    # The queue of the gateway process that holds the caller's connection.
    reply_to: str
    # Epoch milliseconds after which nobody waits for the answer.
    deadline_ms: int
    endpoint: str
    model: str
    # System prompt first, then the request's history, already trimmed.
    messages: list[ChatMessage]
    temperature: float
    top_p: float
    max_tokens: int


class DeltaEvent(_Wire):
    """A piece of the answer; several tokens, coalesced by the worker."""

    type: Literal["chat.delta"] = "chat.delta"
    v: Literal[1] = 1
    job_id: str
    attempt: int
    seq: int
    text: str


class EndEvent(_Wire):
    """The answer is complete; carries its last piece (may be empty) and usage."""

    type: Literal["chat.end"] = "chat.end"
    v: Literal[1] = 1
    job_id: str
    attempt: int
    seq: int
    text: str = ""
    finish_reason: str = "stop"
    usage: Usage


class ErrorEvent(_Wire):
    """The job failed; ``code`` is one of :mod:`shared.errors`' codes."""

    type: Literal["chat.error"] = "chat.error"
    v: Literal[1] = 1
    job_id: str
    attempt: int
    seq: int
    code: str
    message: str


class CancelJob(_Wire):
    """Stop working on a job: its caller went away or its deadline passed."""

    type: Literal["chat.cancel"] = "chat.cancel"
    v: Literal[1] = 1
    job_id: str


Event = Annotated[DeltaEvent | EndEvent | ErrorEvent, Field(discriminator="type")]
_EVENT = TypeAdapter[DeltaEvent | EndEvent | ErrorEvent](Event)


def decode_event(body: bytes) -> DeltaEvent | EndEvent | ErrorEvent:
    """Parse an event; raises ``pydantic.ValidationError`` on anything else."""
    return _EVENT.validate_json(body)
