"""Wire messages for unit tests that need one but not its details."""

from __future__ import annotations

from shared.wire import ChatJob, ChatMessage

# A job for the echo endpoint with one short message; ``model_copy(update=...)`` for others.
JOB = ChatJob(
    job_id="j1",
    request_id="r",
    reply_to="q",
    deadline_ms=0,
    endpoint="echo",
    model="m",
    messages=[ChatMessage(role="user", content="x")],
    temperature=0.5,
    top_p=0.5,
    max_tokens=10,
)
