"""What a caller is told of an upstream's error, and what the worker may log of it."""

from __future__ import annotations

import pytest

from services.worker.endpoints import caller_message, mask_secrets


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("Incorrect API key provided: sk-proj-abcd****wxyz.", "Incorrect API key provided: ***."),
        ("sent Authorization: Bearer abc.def-ghi today", "sent Authorization: *** today"),
        ("key bl-AbCdEf0123456789_xyz is bad", "key *** is bad"),
        ("token 0123456789abcdef0123456789abcdef here", "token *** here"),
        ("session aB3dE5fG7hJ9kL1mN3pQ5rS7 ended", "session *** ended"),
        # Model names, hosts and ordinary words stay readable.
        ("The model gpt-4o-mini-2024-07-18 does not exist", None),
        ("internal error at host 10.0.0.5: connection refused", None),
    ],
)
def test_key_like_text_is_masked(text: str, masked: str | None) -> None:
    assert mask_secrets(text) == (masked or text)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "the model endpoint refused the request (400)"),
        (401, "the model endpoint refused the request (401)"),
        (403, "the model endpoint refused the request (403)"),
        (429, "the model endpoint is rate limiting botline (429)"),
        (500, "the model endpoint failed (500)"),
        (503, "the model endpoint failed (503)"),
    ],
)
def test_callers_read_the_status_class_in_our_words(status: int, message: str) -> None:
    assert caller_message(status) == message
