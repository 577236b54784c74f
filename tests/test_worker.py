"""The worker: what reaches the model, cancellation, deadlines, sharing, draining."""

from __future__ import annotations

import asyncio
import signal

import pytest
import structlog.testing

from tests.support.client import auth, chat, sse_events, stream_chat
from tests.support.fake_openai import Script
from tests.support.stack import ProcessFactory, Stack

pytestmark = pytest.mark.integration


def conversation(n: int) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": f"message {i}"} for i in range(n)]


async def test_bot_settings_reach_the_model(stack: Stack) -> None:
    _, key = await stack.bot_and_key(
        endpoint="fake",
        model="big-model-7",
        system_prompt="You are a pirate.",
        max_history_messages=3,
        max_reply_tokens=50,
        temperature=0.3,
        top_p=0.9,
    )
    body = {"messages": conversation(7), "max_tokens": 500, "model": "gpt-4"}
    status, _, _ = await chat(stack.http, stack.url, key, body)
    assert status == 200
    sent = stack.upstream.requests[-1].body
    assert sent["model"] == "big-model-7"
    assert sent["messages"] == [
        {"role": "system", "content": "You are a pirate."},
        *conversation(7)[-3:],
    ]
    assert sent["max_tokens"] == 50  # capped by the bot
    assert (sent["temperature"], sent["top_p"]) == (0.3, 0.9)
    assert sent["stream"] is False  # a whole answer is asked for whole
    assert "stream_options" not in sent

    body = {"messages": conversation(1), "max_tokens": 20, "temperature": 1.5, "top_p": 0.1}
    await chat(stack.http, stack.url, key, body)
    sent = stack.upstream.requests[-1].body
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (20, 1.5, 0.1)

    # A stream is streamed from the model, with usage asked for.
    events = await stream_chat(stack.http, stack.url, key, {"messages": conversation(1)})
    assert events
    sent = stack.upstream.requests[-1].body
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


async def test_max_tokens_stops_the_answer(stack: Stack) -> None:
    _, key = await stack.bot_and_key(max_reply_tokens=3)
    status, body, _ = await chat(
        stack.http, stack.url, key, {"messages": [{"role": "user", "content": "a b c d e f"}]}
    )
    assert status == 200
    assert body["choices"]["message"]["content"] == "a b c "
    assert body["finishReason"] == "length"
    assert body["usage"]["completionTokens"] == 3


async def test_usage_is_counted_when_the_model_reports_none(stack: Stack) -> None:
    stack.upstream.script(Script(tokens=["one ", "two ", "three"], include_usage=False))
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    status, body, _ = await chat(stack.http, stack.url, key, {"messages": conversation(1)})
    assert status == 200
    assert body["usage"]["completionTokens"] == 3
    assert body["usage"]["promptTokens"] > 0


async def test_upstream_error_is_502_with_its_message(stack: Stack) -> None:
    stack.upstream.script(Script(status=500))
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    status, body, _ = await chat(stack.http, stack.url, key, {"messages": conversation(1)})
    assert (status, body["error"]["code"]) == (502, "upstream_error")
    assert "500" in body["error"]["message"]


async def test_upstream_words_stay_with_the_worker(stack: Stack) -> None:
    """The caller reads the status class in our words; the worker logs the rest, masked."""
    leak = "Incorrect API key provided: sk-proj-abcd****wxyz. Call ops at db-7.internal"
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    ask = {"messages": conversation(1)}
    with structlog.testing.capture_logs() as logs:
        stack.upstream.script(Script(status=401, error_message=leak))
        status, body, _ = await chat(stack.http, stack.url, key, ask)
        assert (status, body["error"]["code"]) == (502, "upstream_error")
        assert body["error"]["message"] == "the model endpoint refused the request (401)"
        stack.upstream.script(Script(status=429, error_message=leak))
        status, body, _ = await chat(stack.http, stack.url, key, ask | {"stream": True})
        assert (status, body["error"]["code"]) == (502, "upstream_error")
        assert body["error"]["message"] == "the model endpoint is rate limiting botline (429)"
    logged = [e for e in logs if e["event"] == "upstream.refused"]
    assert [e["status"] for e in logged] == [401, 429]
    assert logged[0]["upstream_message"] == (
        "Incorrect API key provided: ***. Call ops at db-7.internal"
    )


async def test_unknown_endpoint_is_a_clear_error(stack: Stack) -> None:
    _, key = await stack.bot_and_key(endpoint="nowhere")
    status, body, _ = await chat(stack.http, stack.url, key, {"messages": conversation(1)})
    assert (status, body["error"]["code"]) == (502, "unknown_endpoint")


async def test_upstream_failing_mid_stream_ends_with_one_error_event(stack: Stack) -> None:
    script = Script(tokens=["a ", "b ", "c"], hold_after=1)
    stack.upstream.script(script)
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    async with stack.http.post(
        f"{stack.url}/v1/chat/completions",
        json={"stream": True, "messages": conversation(1)},
        headers=auth(key),
    ) as resp:
        events = sse_events(resp)
        assert (await anext(events))["status"] == "START"  # type: ignore[index]
        await stack.upstream.close()  # the model server dies mid-answer
        rest = [e async for e in events]
    assert [e["status"] for e in rest if isinstance(e, dict)] == ["ERROR"]
    assert rest[0]["error"]["code"] == "upstream_error"  # type: ignore[index]


async def test_caller_going_away_closes_the_model_connection(stack: Stack) -> None:
    script = Script(tokens=["a ", "b ", "c"], hold_after=1)
    stack.upstream.script(script)
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    resp = await stack.http.post(
        f"{stack.url}/v1/chat/completions",
        json={"stream": True, "messages": conversation(1)},
        headers=auth(key),
    )
    first = await anext(sse_events(resp))
    assert first["status"] == "START"  # type: ignore[index]
    resp.close()  # the caller hangs up
    recorded = stack.upstream.requests[-1]
    async with asyncio.timeout(10):
        await recorded.disconnected.wait()
    assert not recorded.finished.is_set()


async def test_whole_answer_caller_going_away_also_cancels(stack: Stack) -> None:
    stack.upstream.script(Script(tokens=["a ", "b"], hold_after=1))
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    task = asyncio.create_task(chat(stack.http, stack.url, key, {"messages": conversation(1)}))
    recorded = await stack.upstream.wait_request(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(10):
        await recorded.disconnected.wait()


async def test_job_past_its_deadline_is_dropped_without_a_model_call(bare_stack: Stack) -> None:
    await bare_stack.add_gateway(request_deadline_s=0.3)
    _, key = await bare_stack.bot_and_key(endpoint="fake", model="m")
    status, body, _ = await chat(
        bare_stack.http, bare_stack.url, key, {"messages": conversation(1)}
    )
    assert (status, body["error"]["code"]) == (504, "deadline_exceeded")
    worker = await bare_stack.add_worker()
    # The broker dropped the expired job (its deadline is its AMQP expiration)
    # or the worker does; either way a later job, answered, went after it.
    _, echo_key = await bare_stack.bot_and_key()
    patient = await bare_stack.add_gateway()
    status, _, _ = await chat(bare_stack.http, patient, echo_key, {"messages": conversation(1)})
    assert status == 200
    assert bare_stack.upstream.requests == []
    assert worker.stats.counts["done"] == 1


async def test_two_workers_share_the_load(bare_stack: Stack) -> None:
    first = await bare_stack.add_worker()
    second = await bare_stack.add_worker()
    await bare_stack.add_gateway()
    _, key = await bare_stack.bot_and_key(endpoint="echo-slow")
    ask = {"messages": [{"role": "user", "content": "one two three"}]}
    results = await asyncio.gather(
        *(chat(bare_stack.http, bare_stack.url, key, ask) for _ in range(20))
    )
    assert all(status == 200 for status, _, _ in results)
    for worker in (first, second):  # after a stop, the counts are final
        await worker.stop()
        bare_stack.workers.remove(worker)
    done = (first.stats.counts["done"], second.stats.counts["done"])
    assert sum(done) == 20
    assert min(done) >= 5, done


async def test_sigterm_drains_running_jobs_then_exits(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    await bare_stack.add_gateway()
    _, key = await bare_stack.bot_and_key(endpoint="echo-slow")
    worker = await processes("worker")
    words = " ".join(f"w{i}" for i in range(20))
    async with bare_stack.http.post(
        f"{bare_stack.url}/v1/chat/completions",
        json={"stream": True, "messages": [{"role": "user", "content": words}]},
        headers=auth(key),
    ) as resp:
        events = sse_events(resp)
        assert (await anext(events))["status"] == "START"  # type: ignore[index]
        worker.signal(signal.SIGTERM)
        rest = [e async for e in events]
    assert [e["status"] for e in rest if isinstance(e, dict)][-1] == "END"
    assert await worker.wait() == 0


async def test_many_concurrent_streams(stack: Stack) -> None:
    _, key = await stack.bot_and_key(endpoint="echo-slow")
    ask = {"messages": [{"role": "user", "content": "alpha beta gamma delta"}]}
    results = await asyncio.gather(
        *(stream_chat(stack.http, stack.url, key, ask) for _ in range(50))
    )
    for events in results:
        text = "".join(e["choices"]["delta"]["content"] for e in events if isinstance(e, dict))
        assert text == "alpha beta gamma delta"
