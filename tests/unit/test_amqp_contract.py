"""shared/amqp.py publishes through aiormq's concrete channel, not aio-pika's API: pin its shape."""

from __future__ import annotations

import inspect

import aiormq


def test_basic_publish_takes_what_shared_amqp_passes() -> None:
    parameters = inspect.signature(aiormq.Channel.basic_publish).parameters
    for name in ("body", "exchange", "routing_key", "properties", "mandatory", "wait"):
        assert name in parameters, f"aiormq.Channel.basic_publish lost {name!r}"
    for name in ("exchange", "routing_key", "properties", "mandatory", "wait"):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
