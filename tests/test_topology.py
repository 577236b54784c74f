"""A queue declared with other arguments (an upgrade, a mismatched setting) fails at once."""

from __future__ import annotations

import time

import aio_pika
import pytest

from shared.amqp import TopologyMismatch
from tests.support.stack import AMQP_URL, Stack

pytestmark = pytest.mark.integration


async def test_a_jobs_queue_with_other_arguments_fails_the_start_at_once(
    bare_stack: Stack,
) -> None:
    # What an older version left behind: the jobs queue with other arguments.
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            f"{bare_stack.namespace}.jobs", durable=True, arguments={"x-max-length": 7}
        )
    started = time.monotonic()
    with pytest.raises(TopologyMismatch, match="delete the queue"):
        await bare_stack.add_worker()
    # Not after the 30 s startup timeout of a broker that cannot be reached.
    assert time.monotonic() - started < 5
