"""Validation of OpenAI-format bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.gateway.job_builder import ChatInput
from services.gateway.openai_request import parse_openai_request
from shared.errors import InvalidRequest, UnsupportedParameter
from shared.records import Bot

USER = {"role": "user", "content": "hi"}
PART_AND = {"type": "text", "text": "and "}
PART_NOW = {"type": "text", "text": "now?"}


BOT = Bot(id="bot_1", name="b", endpoint="echo", model="m", max_history_messages=100)


def parse(**body: Any) -> ChatInput:
    return parse_openai_request(orjson.dumps({"model": "m", "messages": [USER]} | body), BOT)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 3}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_what_cannot_be_served_is_refused_by_name(body: dict[str, Any], param: str) -> None:
    with pytest.raises(UnsupportedParameter) as caught:
        parse(**body)
    assert caught.value.param == param
    assert caught.value.status == 400


def test_n_of_one_and_text_modality_are_fine() -> None:
    assert parse(n=1, modalities=["text"]).messages[0].text == "hi"


def test_messages_keep_their_openai_fields() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    chat = parse(
        messages=[
            USER,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "user", "content": [PART_AND, PART_NOW]},
        ]
    )
    upstream = [m.upstream() for m in chat.messages]
    assert upstream[1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert upstream[2] == {"role": "tool", "tool_call_id": "c1", "content": "42"}
    assert chat.messages[3].text == "and now?"


@pytest.mark.parametrize(
    "message",
    [
        {"role": "tool", "content": "42"},
        {"role": "user", "content": None},
        {"role": "assistant", "content": None},
        {"role": "robot", "content": "x"},
    ],
)
def test_malformed_messages_are_400(message: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(messages=[message])
    assert caught.value.param is not None
    assert caught.value.param.startswith("messages[0]")


def test_parameters_and_options() -> None:
    chat = parse(
        stream=True,
        stream_options={"include_usage": True},
        max_completion_tokens=7,
        seed=1,
        stop="x",
        tools=[{"type": "function", "function": {"name": "f"}}],
        unknown_field=1,
    )
    assert chat.stream
    assert chat.include_usage
    assert chat.max_tokens == 7
    assert chat.params == {
        "seed": 1,
        "stop": "x",
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }


IMAGE = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
FILE = {"type": "file", "file": {"file_id": "file-1"}}


@pytest.mark.parametrize(("part", "kind"), [(IMAGE, "image"), (AUDIO, "audio"), (FILE, "file")])
def test_non_text_parts_need_the_bots_leave(part: dict[str, Any], kind: str) -> None:
    messages = [USER, USER, {"role": "user", "content": [PART_AND, part]}]
    body = orjson.dumps({"messages": messages})
    with pytest.raises(InvalidRequest) as caught:
        parse_openai_request(body, BOT)
    assert caught.value.param == "messages[2].content[1].type"
    assert caught.value.status == 400
    # Named by its index in the body, even when earlier messages are not kept.
    short = BOT.model_copy(update={"max_history_messages": 1})
    with pytest.raises(InvalidRequest) as caught:
        parse_openai_request(body, short)
    assert caught.value.param == "messages[2].content[1].type"
    allowed = BOT.model_copy(update={"allowed_content": [kind]})
    sent = parse_openai_request(body, allowed).messages[-1].upstream()
    assert sent == {"role": "user", "content": [PART_AND, part]}
    others = BOT.model_copy(
        update={"allowed_content": [k for k in ("image", "audio", "file") if k != kind]}
    )
    with pytest.raises(InvalidRequest):
        parse_openai_request(body, others)


def test_unknown_part_types_are_refused_text_and_refusal_pass() -> None:
    odd = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}
    with pytest.raises(InvalidRequest) as caught:
        parse(messages=[odd])
    assert caught.value.param == "messages[0].content[0].type"
    refusal = {"type": "refusal", "refusal": "no"}
    chat = parse(messages=[USER, {"role": "assistant", "content": [refusal]}, USER])
    assert chat.messages[1].content == [refusal]


def test_message_fields_outside_openais_schema_are_dropped() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "system", "content": "be brief", "name": "ops", "internal_url": "http://x"},
        {"role": "user", "content": "hi", "name": "ann", "tool_call_id": "c0", "cache": 1},
        {"role": "assistant", "content": None, "tool_calls": [call], "priority": "high"},
        {"role": "tool", "tool_call_id": "c1", "content": "42", "name": "f"},
    ]
    upstream = [m.upstream() for m in parse(messages=messages).messages]
    assert upstream == [
        {"role": "system", "content": "be brief", "name": "ops"},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    # An assistant message whose only other field is not OpenAI's has nothing to say.
    with pytest.raises(InvalidRequest) as caught:
        parse(messages=[{"role": "assistant", "content": None, "priority": "high"}])
    assert caught.value.param == "messages[0]"
