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

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    def dump(self) -> bytes:
        """The message as JSON bytes."""
        return self.model_dump_json().encode()


class ChatMessage(BaseModel):
    """One message of a conversation.

    ``content`` is a string, a list of content parts (OpenAI's multi-part
    messages) or None (an assistant message that only calls tools). Other
    OpenAI message fields (``tool_calls``, ``tool_call_id``, ``name``) are
    kept as they came and passed to the model unchanged.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        """The message's text, whatever the shape of its content."""
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "".join(
            str(part.get("text", "")) for part in self.content if part.get("type") == "text"
        )

    def upstream(self) -> dict[str, Any]:
        """The message as an OpenAI-compatible server takes it."""
        return self.model_dump(exclude_none=True) | {"content": self.content}


class Usage(BaseModel):
    """Token counts of one answer."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion."""
        return self.prompt_tokens + self.completion_tokens


class EndpointRef(BaseModel):
    """One entry of a bot's ordered endpoint list.

    Tiers are tried in ascending order; within a tier the entries are tried
    in a random order drawn by ``weight`` (so traffic splits by weight), the
    others after it as fallbacks. A tier left out is the entry's position in
    the list, so a plain list is a plain order of fallbacks.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(min_length=1, max_length=200)
    weight: int = Field(1, ge=1, le=1000)
    tier: int | None = Field(None, ge=0, le=1000)


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
    # The first endpoint to try; ``endpoints`` (added in v1, optional) is the
    # whole ordered list, tiers resolved. A job without it names one endpoint.
    endpoint: str
    model: str
    # System prompt first, then the request's history, already trimmed.
    messages: list[ChatMessage]
    temperature: float
    top_p: float
    max_tokens: int
    # Whether the caller streams: a whole answer needs no early first delta.
    stream: bool = True
    # OpenAI parameters passed to the model as they are (stop, seed, tools, ...).
    params: dict[str, Any] = Field(default_factory=dict)
    endpoints: list[EndpointRef] = Field(default_factory=list)
    # Epoch ms until which the job may wait in the queue (added in v1,
    # optional): its gateway then refuses it 503 overloaded. A worker that
    # takes a job carrying it says so at once (a beat), so its gateway knows
    # the job left the queue.
    wait_until_ms: int | None = None
    # Copies of this job may be queued (a low job re-published at a higher
    # priority as it ages, shared/priority.py): the first worker to claim it
    # (``Names.taken_job``) runs it, the others drop their copy. Such a job's
    # worker says at once that it took it (a beat), like ``wait_until_ms``.
    once: bool = False

    def endpoint_list(self) -> list[EndpointRef]:
        """The endpoints to try, tiers resolved (a job from an older gateway: its one endpoint)."""
        return self.endpoints or [EndpointRef(name=self.endpoint, tier=0)]


class DeltaEvent(_Wire):
    """A piece of the answer; several tokens, coalesced by the worker.

    Carries either text, or tool-call chunks: each item of ``tool_calls`` is
    one upstream chunk's ``delta.tool_calls``, exactly as the model sent it.
    """

    type: Literal["chat.delta"] = "chat.delta"
    v: Literal[1] = 1
    job_id: str
    attempt: int
    seq: int
    text: str = ""
    tool_calls: list[list[dict[str, Any]]] = Field(default_factory=list)
    # The endpoint that answered: set on an attempt's first delta (added in v1).
    endpoint: str = ""


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
    # The endpoint that answered (added in v1).
    endpoint: str = ""


class ErrorEvent(_Wire):
    """The job failed; ``code`` is one of :mod:`shared.errors`' codes."""

    type: Literal["chat.error"] = "chat.error"
    v: Literal[1] = 1
    job_id: str
    attempt: int
    seq: int
    code: str
    message: str


class BeatEvent(_Wire):
    """A sign of life of a whole answer being worked on; carries nothing.

    Sent every few hundred milliseconds while a whole answer runs (a stream's
    deltas do the same job), so that a job whose gateway is gone finds out
    at once: the beat finds no reply queue and bounces back to the workers.
    Gateways drop it unread (by its AMQP ``type``); it takes no ``seq``.
    """

    type: Literal["chat.beat"] = "chat.beat"
    v: Literal[1] = 1
    job_id: str
    attempt: int


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
