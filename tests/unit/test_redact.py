"""Log redaction (issue 10, item 5): library log lines become our JSON events, masked."""

from __future__ import annotations

import datetime
import io
import logging

import orjson
import structlog
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared import keys
from shared.logging import UtcStamp, configure_logging, freeze_logging
from shared.redact import _mask, redact, redact_event


def test_key_like_words_are_masked() -> None:
    key = keys.generate()
    assert key not in redact(f"Invalid HTTP header: b'Authorization: Bearer {key}\\x01'")
    assert key[:12] not in redact(f"cut short: {key[:12]}")
    assert "sk-proj-abcd" not in redact("Incorrect API key provided: sk-proj-abcd****wxyz")
    assert "hunter22" not in redact("password=hunter22")
    assert "Zm9vOmJhcg" not in redact("Authorization: Basic Zm9vOmJhcg==")
    # Ordinary words stay.
    for text in ("job.finished tokens=12", "the token was fine", "key_id=key_0123abcd"):
        assert redact(text) == text


def test_aiohttp_and_asyncio_records_are_json_events_without_the_key() -> None:
    out = io.StringIO()
    key = keys.generate()
    try:
        configure_logging("info", "json", stream=out)
        try:
            raise ValueError(f"Invalid HTTP header: b'Authorization: Bearer {key}\\x01'")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request from %s", key)
        logging.getLogger("asyncio").error("Task exception: %s", f"Bearer {key}")
        structlog.get_logger().warning("mine", note=f"got {key}")
    finally:
        configure_logging()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"].split()[0] for line in lines] == ["Error", "Task", "mine"]
    assert lines[0]["logger"] == "aiohttp.server"
    assert "ValueError" in lines[0]["exception"]  # the traceback is kept, inside the event
    assert key not in out.getvalue()
    assert key[3:15] not in out.getvalue()


def test_the_quick_path_masks_what_the_patterns_mask() -> None:
    # redact() skips the patterns for text without a candidate word: whatever the
    # case and wherever the word sits, its answer is the patterns' answer.
    key = keys.generate()
    texts = [
        f"AUTHORIZATION: BEARER {key}",
        f"Proxy-Authorization = Basic {key[3:]}",
        f"X-API-KEY: {key[3:]}",
        "Api_Key='abcd1234'",
        "SECRET: s3cr3t-value",
        "PassWord=hunter22",
        "ToKeN: abcdefgh",
        f"trailing {key}",
        # Not ASCII: the patterns alone decide.
        f"\u00fcn\u00efc\u00f6d\u00e9 \u017fecret=abcdefgh {key}",
        "job.finished",
        "chatcmpl-abc123def456",
    ]
    for text in texts:
        assert redact(text) == _mask(text), text
    assert key not in redact(f"\u00fcn\u00efc {key}")


# Text made of the pieces the patterns look for, in any case, among other characters.
_PIECES = st.sampled_from(
    [
        *("bl-", "sk-", "authorization", "proxy-", "bearer ", "basic ", "api", "-", "_"),
        *("key", "token", "secret", "password", ": ", "=", "'", '"', " ", "abcd1234"),
        *("\u017f", "\u00fc"),
    ]
)


@settings(max_examples=400)
@example("bearer abcd")
@example("basic abcd")
@example("apikey=abcd")
@example("x-api-key: abcd")
@example("token: abcd")
@example("secret=abcd")
@example("password=abcd")
@example("authorization: x")
@example("bl-abcd")
@example("sk-abcd")
@given(st.lists(st.one_of(_PIECES, _PIECES, _PIECES, st.text(max_size=3)), max_size=8).map("".join))
def test_the_quick_path_answers_as_the_patterns_do_for_any_text(text: str) -> None:
    variants = (text, text.upper(), text.title())
    for variant in variants:
        assert redact(variant) == _mask(variant), variant


def test_an_event_is_masked_field_by_field_whatever_the_quick_scan() -> None:
    # redact_event scans all string values at once before masking each: its answer
    # is every value's own redact(), for events with and without anything to mask.
    key = keys.generate()
    values: list[object] = [
        "job.finished",
        "chatcmpl-abc123def456",
        f"Bearer {key}",
        "b",  # "b" + "l-..." in the next value must not matter
        "l-abcdefgh",
        "\u00fcn\u00efc\u00f6d\u00e9",
        12,
        None,
        "password=hunter22",
    ]
    for start in range(len(values)):
        for end in range(start + 1, len(values) + 1):
            event = {f"f{i}": value for i, value in enumerate(values[start:end])}
            expected = {
                name: redact(value) if isinstance(value, str) else value
                for name, value in event.items()
            }
            assert redact_event(None, "info", dict(event)) == expected


@given(st.floats(min_value=0, max_value=4102444800, allow_nan=False))
def test_the_timestamp_is_what_structlogs_iso_stamper_writes(now: float) -> None:
    expected = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat().replace("+00:00", "Z")
    stamp = UtcStamp()
    assert stamp.format(now) == expected
    assert stamp.format(now) == expected  # and again, from its cached second


def test_frozen_loggers_still_carry_each_lines_context() -> None:
    out = io.StringIO()
    try:
        configure_logging("info", "json", stream=out)
        freeze_logging()
        log = structlog.get_logger("botline.test")
        for request_id in ("req_a", "req_b"):
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(request_id=request_id)
            log.info("http.request", status=200, note=f"Bearer {keys.generate()}")
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.configure(cache_logger_on_first_use=False)
        configure_logging()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["req_a", "req_b"]
    assert all(line["note"] == "Bearer [redacted]" for line in lines)
    assert all(line["timestamp"].endswith("Z") for line in lines)
