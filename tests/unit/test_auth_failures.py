"""Authentication failures per client address: a fixed one-minute window."""

from __future__ import annotations

import pytest

from services.gateway.auth_failures import AuthFailures
from shared.errors import RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_past_the_threshold_an_address_waits_for_the_rest_of_its_minute() -> None:
    clock = Clock()
    failures = AuthFailures(3, clock=clock)
    for _ in range(3):
        failures.check("10.0.0.1")
        failures.failed("10.0.0.1")
    clock.now += 20
    with pytest.raises(RateLimited) as caught:
        failures.check("10.0.0.1")
    assert (caught.value.status, caught.value.code) == (429, "rate_limit_exceeded")
    assert caught.value.retry_after == 40
    failures.check("10.0.0.2")  # other addresses are not affected
    clock.now += 40
    failures.check("10.0.0.1")  # a new minute
    failures.failed("10.0.0.1")
    failures.check("10.0.0.1")


def test_zero_turns_it_off_and_addresses_are_bounded() -> None:
    off = AuthFailures(0)
    for _ in range(100):
        off.failed("10.0.0.1")
    off.check("10.0.0.1")
    bounded = AuthFailures(1, max_addresses=2)
    for address in ("a", "b", "c"):
        bounded.failed(address)
    bounded.check("a")  # forgotten: the oldest window went first
    with pytest.raises(RateLimited):
        bounded.check("c")
