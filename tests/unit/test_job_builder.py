"""Request validation and job building."""

from __future__ import annotations

import orjson
import pytest

from services.gateway.job_builder import build_job
from services.gateway.seed_api import parse_seed_request
from shared.errors import InvalidRequest
from shared.records import Bot


def bot(**fields: object) -> Bot:
    return Bot.model_validate(
        {"id": "bot_1", "name": "b", "endpoint": "echo", "model": "m"} | fields
    )


def parse(body: object) -> object:
    return parse_seed_request(orjson.dumps(body), bot())


def test_defaults_come_from_the_bot() -> None:
    request = parse_seed_request(b'{"messages":[{"role":"user","content":"hi"}]}', bot())
    job = build_job(request, bot(), job_id="j", request_id="r", reply_to="q", deadline_s=10)
    assert (job.temperature, job.top_p, job.max_tokens) == (0.7, 0.7, 2048)
    assert [m.role for m in job.messages] == ["user"]


def test_system_prompt_first_then_the_last_messages() -> None:
    messages = [{"role": "user", "content": str(i)} for i in range(12)]
    the_bot = bot(system_prompt="S", max_history_messages=3)
    request = parse_seed_request(orjson.dumps({"messages": messages}), the_bot)
    job = build_job(
        request,
        the_bot,
        job_id="j",
        request_id="r",
        reply_to="q",
        deadline_s=10,
    )
    assert [m.content for m in job.messages] == ["S", "9", "10", "11"]


def test_max_tokens_is_capped_by_the_bot() -> None:
    request = parse({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9999})
    job = build_job(
        request,  # type: ignore[arg-type]
        bot(max_reply_tokens=100),
        job_id="j",
        request_id="r",
        reply_to="q",
        deadline_s=10,
    )
    assert job.max_tokens == 100


def test_errors_name_the_field_without_echoing_it() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse({"messages": [{"role": "user", "content": ["s3cr3t"]}]})
    assert caught.value.param == "messages[0].content"
    assert "s3cr3t" not in caught.value.message


def test_integers_are_not_accepted_as_booleans_or_strings() -> None:
    with pytest.raises(InvalidRequest):
        parse({"messages": [{"role": "user", "content": "x"}], "stream": 1})
    with pytest.raises(InvalidRequest):
        parse({"messages": [{"role": "user", "content": 5}]})
