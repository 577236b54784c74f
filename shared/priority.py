"""Job priorities on the jobs queue: a key's or bot's class, and its fair share.

The jobs queue is a RabbitMQ priority queue (classic queues only): the
gateway publishes each job with a message priority, and the broker hands the
highest waiting one to the next free worker. Two things set it:

- the class (``high``, ``normal``, ``low``), from the key, else its bot;
- the fair share (services/gateway/fair_share.py): a key holding more than
  its share of the fleet's job slots has its extra jobs published one step
  lower, so any other key's job of the same class goes ahead of them.

So the order is: high, high over share, normal, normal over share, low, low
over share. Level 0 is unused.
"""

from __future__ import annotations

from typing import Final, Literal

Priority = Literal["high", "normal", "low"]

PRIORITIES: Final[tuple[Priority, ...]] = ("high", "normal", "low")
# The queue's x-max-priority: RabbitMQ keeps one sub-queue per level, so few.
MAX_PRIORITY: Final = 6
_LEVEL: Final[dict[Priority, int]] = {"high": 6, "normal": 4, "low": 2}


def message_priority(priority: Priority, over_share: bool) -> int:
    """The AMQP priority of a job of this class, one step lower over its key's share."""
    return _LEVEL[priority] - (1 if over_share else 0)


def class_of(level: int | None) -> Priority:
    """The class a message's priority belongs to (a message without one: normal)."""
    if level is None:
        return "normal"
    if level >= _LEVEL["high"] - 1:
        return "high"
    if level >= _LEVEL["normal"] - 1:
        return "normal"
    return "low"


# A low job's copies as it ages (services/gateway/chat_run.py): normal, then high.
AGED_LEVELS: Final = (message_priority("normal", False), message_priority("high", False))
