"""The bench's interleaved c=1 run (bench/paired.py): every target every cycle, its
blocks' p50s, and a target that fails counted, not hidden."""

from __future__ import annotations

from bench.load import Spec
from bench.paired import run
from tests.support.fake_openai import FakeOpenAI, Script


def _spec(url: str, *, warmup: int = 1) -> Spec:
    return Spec(
        url=url,
        headers={},
        body={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        stream=False,
        concurrency=1,
        requests=4,
        duration_s=0,
        warmup=warmup,
        expect_tokens=0,
        timeout_s=10,
    )


async def test_every_target_gets_a_block_in_every_cycle(upstream: FakeOpenAI) -> None:
    url = f"{upstream.base_url}/chat/completions"
    result = await run({"direct": _spec(url), "other": _spec(url)}, cycles=3, block=4)
    assert set(result["p50_ms"]) == {"direct", "other"}
    for p50s in result["p50_ms"].values():
        assert len(p50s) == 3
        assert all(p50 is not None and p50 > 0 for p50 in p50s)
    assert result["ok"] == {"direct": 12, "other": 12}
    assert result["errors"] == {"direct": {}, "other": {}}
    # One warm-up request each, then 3 cycles x 4 requests each.
    assert len(upstream.requests) == 2 * (1 + 12)


async def test_a_failing_target_is_counted_not_hidden(upstream: FakeOpenAI) -> None:
    url = f"{upstream.base_url}/chat/completions"
    for _ in range(2):
        upstream.script(Script(status=500))
    # No warm-up: the two failures land in the first block measured, the direct call's.
    result = await run({"direct": _spec(url, warmup=0)}, cycles=1, block=2)
    assert result["ok"] == {"direct": 0}
    assert result["errors"] == {"direct": {"http 500": 2}}
    assert result["p50_ms"] == {"direct": [None]}
