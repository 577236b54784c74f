"""A bot's ordered endpoints through every way in: admin API, command line, stored records, wire."""

from __future__ import annotations

from collections import Counter
from random import Random

import orjson
import pytest
from redis.asyncio import Redis

from services.worker.routing import plan
from shared.records import Bot
from shared.wire import ChatJob, DeltaEvent, EndpointRef
from tests.support.fake_openai import Script
from tests.support.stack import Stack, run_cli
from tests.test_admin_api import TOKEN, call

pytestmark = pytest.mark.integration


@pytest.fixture
async def admin(bare_stack: Stack) -> Stack:
    await bare_stack.add_worker()
    # A deadline shorter than the Retry-After below: that caller is refused at once.
    await bare_stack.add_gateway(admin_tokens=[TOKEN], request_deadline_s=5)
    return bare_stack


async def test_admin_api_takes_an_ordered_list_or_one_endpoint(admin: Stack) -> None:
    listed = [{"name": "primary"}, {"name": "backup", "weight": 1}]
    status, bot = await call(admin, "POST", "/bots", {"name": "ha", "endpoints": listed})
    assert status == 201, bot
    assert bot["endpoint"] == "primary"
    assert [(e["name"], e["weight"], e["tier"]) for e in bot["endpoints"]] == [
        ("primary", 1, None),
        ("backup", 1, None),
    ]
    status, single = await call(admin, "POST", "/bots", {"name": "one", "endpoint": "fake"})
    assert status == 201
    assert [e["name"] for e in single["endpoints"]] == ["fake"]
    status, default = await call(admin, "POST", "/bots", {"name": "default"})
    assert (status, default["endpoint"]) == (201, "echo")
    # PATCH the same endpoint (the admin page sends every field back): the list stays.
    status, patched = await call(
        admin, "PATCH", f"/bots/{bot['id']}", {"endpoint": "primary", "system_prompt": "hi"}
    )
    assert (status, [e["name"] for e in patched["endpoints"]]) == (200, ["primary", "backup"])
    # PATCH another endpoint: the list becomes it; PATCH a list: endpoint follows its first.
    status, patched = await call(admin, "PATCH", f"/bots/{bot['id']}", {"endpoint": "fake"})
    assert (status, [e["name"] for e in patched["endpoints"]]) == (200, ["fake"])
    status, patched = await call(
        admin, "PATCH", f"/bots/{single['id']}", {"endpoints": [{"name": "b"}, {"name": "c"}]}
    )
    assert (status, patched["endpoint"]) == (200, "b")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"endpoints": []}, "endpoints"),
        ({"endpoints": [{"name": "a", "weight": 0}]}, "endpoints[0].weight"),
        ({"endpoints": [{"name": "a", "colour": "red"}]}, "endpoints[0].colour"),
        ({"endpoints": [{"name": "a"}] * 17}, "endpoints"),
        ({"endpoint": "b", "endpoints": [{"name": "a"}]}, None),
    ],
)
async def test_admin_api_refuses_bad_endpoint_lists(
    admin: Stack, body: dict[str, object], param: str | None
) -> None:
    status, answer = await call(admin, "POST", "/bots", {"name": "x"} | body)
    assert (status, answer["error"]["code"]) == (400, "invalid_request")
    if param is not None:
        assert answer["error"]["param"] == param


async def test_admin_api_shows_each_endpoints_fleet_state(admin: Stack) -> None:
    admin.upstream.script(Script(status=429, retry_after=30))
    _, key = await admin.bot_and_key(endpoint="fake", model="fake-model")
    status, body, _ = await admin.chat(key, {"messages": [{"role": "user", "content": "hi"}]})
    assert (status, body["error"]["code"]) == (503, "upstream_unavailable")
    status, states = await call(admin, "GET", "/endpoints")
    assert status == 200
    by_name = {s["name"]: s for s in states}
    assert set(by_name) == {"echo", "echo-slow", "fake"}
    assert by_name["fake"]["state"] == "paused"
    assert 25_000 < by_name["fake"]["paused_ms"] <= 30_000
    assert by_name["echo"]["state"] == "closed"


async def test_cli_creates_a_bot_with_ordered_weighted_endpoints(
    namespace: str, redis: Redis
) -> None:
    # ``redis``: the bot the CLI stores is deleted with the namespace's keys afterwards.
    out, _ = await run_cli(
        namespace, "bots", "create", "--name", "ha", "--endpoint", "a:3:0", "--endpoint", "b:1:0",
        "--endpoint", "c",
    )  # fmt: skip
    bot = orjson.loads(out)
    assert bot["endpoint"] == "a"
    assert [(e["name"], e["weight"], e["tier"]) for e in bot["endpoints"]] == [
        ("a", 3, 0),
        ("b", 1, 0),
        ("c", 1, None),
    ]
    out, _ = await run_cli(namespace, "bots", "list")
    assert "endpoint=a,b,c" in out
    _, err = await run_cli(
        namespace, "bots", "create", "--name", "x", "--endpoint", "a:x", ok=False
    )
    assert "NAME[:WEIGHT[:TIER]]" in err


def test_a_bot_stored_before_endpoint_lists_reads_as_a_list_of_one() -> None:
    old = {"id": "bot_0123456789abcdef", "name": "old", "endpoint": "deepseek", "model": "m"}
    bot = Bot.model_validate_json(orjson.dumps(old))
    assert [ref.name for ref in bot.endpoints] == ["deepseek"]
    assert [(r.name, r.tier) for r in bot.endpoint_plan()] == [("deepseek", 0)]


def test_wire_fields_are_additive() -> None:
    job = {
        "job_id": "j",
        "request_id": "r",
        "reply_to": "q",
        "deadline_ms": 1,
        "endpoint": "deepseek",
        "model": "m",
        "messages": [],
        "temperature": 0.7,
        "top_p": 0.7,
        "max_tokens": 5,
    }
    # A job from an older gateway: its one endpoint.
    assert [r.name for r in ChatJob.model_validate(job).endpoint_list()] == ["deepseek"]
    # An event from an older worker: no endpoint, and a newer one's is ignored by old readers.
    assert DeltaEvent.model_validate({"job_id": "j", "attempt": 1, "seq": 0}).endpoint == ""


def test_plan_keeps_tier_order_and_splits_a_tier_by_weight() -> None:
    refs = [
        EndpointRef(name="a", weight=3, tier=0),
        EndpointRef(name="b", weight=1, tier=0),
        EndpointRef(name="c", tier=1),
    ]
    rng = Random(7)
    firsts: Counter[str] = Counter()
    for _ in range(4000):
        order = plan(refs, rng)
        assert sorted(order[:2]) == ["a", "b"]
        assert order[2] == "c"
        firsts[order[0]] += 1
    assert 0.7 < firsts["a"] / 4000 < 0.8  # 3 : 1
    # Without tiers the list's order is the order.
    assert plan([EndpointRef(name=n) for n in "xyz"]) == ["x", "y", "z"]
