"""Validation of OpenAI-format bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.gateway.job_builder import ChatInput
from services.gateway.openai_request import parse_openai_request
from shared.errors import InvalidRequest, UnsupportedParameter

USER = {"role": "user", "content": "hi"}
PART_AND = {"type": "text", "text": "and "}
PART_NOW = {"type": "text", "text": "now?"}


def parse(**body: Any) -> ChatInput:
    return parse_openai_request(orjson.dumps({"model": "m", "messages": [USER]} | body))


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
