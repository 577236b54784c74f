"""Which endpoint answers a job: the bot's ordered list, fleet health and capacity, fallbacks.

A job names its bot's endpoints in tiers (``ChatJob.endpoint_list``). The
:class:`Router` tries them in tier order, within a tier in a random order
drawn by weight, and skips those the fleet knows are cooling down, paused by
a ``Retry-After`` or out of declared capacity (:mod:`cooldowns`,
:mod:`budget`). Until the first piece of the answer exists, a failed call
(no connection, no first byte in time, 429, 5xx) costs the caller nothing:
after a short backoff the next endpoint is tried. After it, a failure is
the stream's one ``ERROR`` event, as before (text already relayed cannot be
taken back).

When nothing can be called now, the job waits for the soonest endpoint --
a place in line for capacity, the end of a pause or a cooldown -- if that
leaves ``answer_reserve_s`` of its deadline; otherwise it is refused at once
with ``upstream_unavailable`` (or the last upstream error) instead of timing
out.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from services.worker.budget import Budget, Grant, Refusal
from services.worker.cooldowns import Cooldowns, Health, Verdict
from services.worker.endpoints import Finish, Model, Pace, Piece
from services.worker.settings import EndpointConfig, WorkerSettings
from shared import tokens
from shared.clock import now_ms
from shared.endpoint_state import EndpointState, endpoint_states
from shared.errors import UnknownEndpoint, UpstreamError, UpstreamUnavailable
from shared.tasks import idle
from shared.wire import ChatJob, EndpointRef

log = structlog.get_logger("botline.worker.routing")

_MAX_BACKOFF_S = 2.0
_PROBE_POLL_S = 0.25
_HEALTHY = Verdict(Health.CLOSED)


def redis_client(settings: WorkerSettings) -> Redis:
    """A Redis client that gives up fast: the fleet's endpoint state is advisory."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url.get_secret_value(),
        # One per job at most: a job makes one Redis call at a time.
        max_connections=max(8, settings.concurrency),
        timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=10,
    )
    return Redis.from_pool(pool)


def plan(refs: list[EndpointRef], rng: random.Random | None = None) -> list[str]:
    """Endpoint names in the order to try: tiers ascending, by weight within a tier.

    Within a tier the order is a weighted shuffle (each entry keyed by
    ``u ** (1 / weight)``), so an entry comes first in proportion to its
    weight and the others follow as fallbacks.
    """
    if len(refs) == 1:
        return [refs[0].name]  # most bots: nothing to order
    draw = rng or random
    tiers: dict[int, list[EndpointRef]] = {}
    for position, ref in enumerate(refs):
        tiers.setdefault(position if ref.tier is None else ref.tier, []).append(ref)
    order: list[str] = []
    for tier in sorted(tiers):
        group = sorted(tiers[tier], key=lambda ref: draw.random() ** (1 / ref.weight), reverse=True)
        order += [ref.name for ref in group if ref.name not in order]
    return order


@dataclass(frozen=True, slots=True)
class SchedulerCounts:
    """One worker's scheduling counters since it started (for the metrics)."""

    # (endpoint, outcome) -> calls; outcomes: answered, failed, fallback, refused.
    calls: dict[tuple[str, str], int]
    # Places in line taken for declared capacity, and the seconds waited in all.
    budget_waits: int
    budget_wait_s: float
    # Jobs refused capacity by the budget script (each refusal, not each job).
    budget_refusals: int
    # Cooldowns this worker's failures opened (or re-opened after a probe).
    cooldowns_opened: int
    # Redis calls that failed or timed out (the worker then fails open).
    redis_errors: int


@dataclass
class _Call:
    """An upstream call that produced its first piece: from here on, no fallback."""

    name: str
    pieces: AsyncGenerator[Piece, None]
    first: Piece
    grant: Grant | None


class Router:
    """Routes one worker's jobs over the endpoints, with the fleet's shared state."""

    def __init__(
        self,
        settings: WorkerSettings,
        models: dict[str, Model],
        configs: dict[str, EndpointConfig],
        redis: Redis | None = None,
    ) -> None:
        self._settings = settings
        self._models = models
        self._configs = configs
        # Per process: calls in flight at once to each endpoint.
        self._local = {
            name: asyncio.Semaphore(cfg.max_concurrency) for name, cfg in configs.items()
        }
        self.redis = redis if redis is not None else redis_client(settings)
        names = settings.names
        self._names = names
        self.cooldowns = Cooldowns(self.redis, names, settings.redis_timeout_s)
        self.budget = Budget(
            self.redis,
            names,
            window_s=settings.budget_window_s,
            margin_s=settings.budget_margin_s,
            timeout_s=settings.redis_timeout_s,
        )
        # For the metrics: calls by endpoint and outcome, fallbacks, refusals.
        self.stats: Counter[tuple[str, str]] = Counter()

    async def start(self) -> None:
        """Make the endpoints' names known to the admin API (best effort)."""
        try:
            async with asyncio.timeout(self._settings.redis_timeout_s):
                await self.redis.sadd(self._names.endpoints, *self._configs)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("endpoint.state_unavailable", error=type(exc).__name__)

    def counts(self) -> SchedulerCounts:
        """This worker's counters, for the metrics (see also :meth:`states`)."""
        budget, cooldowns = self.budget, self.cooldowns
        return SchedulerCounts(
            calls=dict(self.stats),
            budget_waits=budget.waits,
            budget_wait_s=budget.waited_s,
            budget_refusals=budget.refusals,
            cooldowns_opened=cooldowns.opened,
            redis_errors=budget.redis_errors + cooldowns.redis_errors,
        )

    async def states(self) -> list[EndpointState]:
        """This worker's endpoints as the fleet sees them (for the metrics); [] if Redis is out."""
        try:
            async with asyncio.timeout(self._settings.redis_timeout_s):
                return await endpoint_states(self.redis, self._names, sorted(self._configs))
        except (RedisError, OSError, TimeoutError):
            return []

    async def close(self) -> None:
        """Close the models and the Redis client."""
        for model in self._models.values():
            await model.close()
        await self.redis.aclose()

    async def stream(
        self, job: ChatJob, on_endpoint: Callable[[str], None], pace: Pace | None = None
    ) -> AsyncIterator[Piece]:
        """The job's answer from the first endpoint that gives a first piece.

        ``on_endpoint`` is told which endpoint answered before the first piece
        is yielded (it goes on the first event, and to the caller's header).
        ``pace`` goes to the model (see :meth:`Model.stream`).
        """
        call = await self._open(job, pace)
        on_endpoint(call.name)
        used: int | None = None
        try:
            if isinstance(call.first, Finish):
                used = call.first.usage.total_tokens
            yield call.first
            async for piece in call.pieces:
                if isinstance(piece, Finish):
                    used = piece.usage.total_tokens
                yield piece
        finally:
            await call.pieces.aclose()
            self._local[call.name].release()
            if call.grant is not None:
                await self.budget.settle(call.grant, self._configs[call.name], used)

    async def _open(self, job: ChatJob, pace: Pace | None) -> _Call:
        """Try the endpoints until one gives a first piece; wait or refuse when none can."""
        known = [ref for ref in job.endpoint_list() if ref.name in self._models]
        if not known:
            raise UnknownEndpoint(f"no model endpoint named {job.endpoint!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (job.deadline_ms - now_ms()) / 1000
        settings = self._settings
        failures = 0
        last: UpstreamError | None = None
        # Endpoints that failed this job are not called again for it; one that
        # answered 429 is, once its Retry-After has passed.
        failed: set[str] = set()
        while True:
            candidates = plan([ref for ref in known if ref.name not in failed])
            if not candidates:
                assert last is not None
                raise last
            room = deadline - loop.time() - settings.answer_reserve_s
            # Why each endpoint was skipped, and when it may be callable again.
            skipped: list[tuple[float, str, str]] = []
            for name in candidates:
                config = self._configs[name]
                verdict = self._fresh(name, config) or await self.cooldowns.check(name, config)
                if not verdict.usable:
                    # A probe's outcome is not announced: look again shortly.
                    wait = verdict.wait_s
                    if verdict.health is Health.PROBING:
                        wait = min(wait, _PROBE_POLL_S)
                    skipped.append((wait, name, verdict.health.value))
                    continue
                probe = verdict.health is Health.PROBE
                taken = (
                    await self._take(job, name, config, deadline, max_wait_s=0.0)
                    if config.budgeted
                    else None
                )
                if isinstance(taken, Refusal):
                    if probe:
                        await self.cooldowns.give_back_probe(name, config)
                    skipped.append((taken.wait_s, name, taken.reason))
                    continue
                try:
                    return await self._call(
                        job, name, config, probe, taken, pace, after_failure=failures > 0
                    )
                except UpstreamError as exc:
                    failures, last = await self._fall_back(name, exc, failures, failed, deadline)
            if not skipped:
                continue  # every endpoint was called and failed or paused: a new round
            wait_s, name, reason = min(skipped)
            if wait_s > room:
                self.stats[(name, "refused")] += 1
                log.info("job.refused", reasons=sorted({r for _, _, r in skipped}))
                if last is not None and not last.rate_limited:
                    raise last  # what went wrong says more than what is left
                raise UpstreamUnavailable(
                    "every endpoint of this bot is "
                    + ", ".join(sorted({_WHY.get(r, r) for _, _, r in skipped}))
                    + " for longer than the request can wait"
                )
            if reason in _BUDGET_REASONS:
                try:
                    call = await self._wait_in_line(
                        job, name, room, deadline, pace, after_failure=failures > 0
                    )
                except UpstreamError as exc:
                    failures, last = await self._fall_back(name, exc, failures, failed, deadline)
                else:
                    if call is not None:
                        return call
            else:
                # A pause, cooldown or probe that ends within the deadline.
                await idle(wait_s + random.uniform(0, 0.02))

    def _fresh(self, name: str, config: EndpointConfig) -> Verdict | None:
        """A healthy verdict known without a call, else None: the built-in echo model has
        no network to fail (no Redis call per job), and a recent check is trusted."""
        if config.kind == "echo":
            return _HEALTHY
        return self.cooldowns.fresh(name)

    async def _fall_back(
        self, name: str, exc: UpstreamError, failures: int, failed: set[str], deadline: float
    ) -> tuple[int, UpstreamError]:
        """After a failed call: raise if it is final, else back off before the next endpoint."""
        if not exc.retryable:
            raise exc
        failures += 1
        if not exc.rate_limited:
            failed.add(name)
        if failures >= self._settings.endpoint_attempts:
            raise exc
        self.stats[(name, "fallback")] += 1
        await self._backoff(failures, deadline)
        return failures, exc

    async def _wait_in_line(
        self,
        job: ChatJob,
        name: str,
        room: float,
        deadline: float,
        pace: Pace | None,
        *,
        after_failure: bool,
    ) -> _Call | None:
        """Reserve the endpoint's next capacity, sleep until then, call; None: look again."""
        config = self._configs[name]
        taken = await self._take(job, name, config, deadline, max_wait_s=room)
        if taken is None:  # not budgeted: nothing to wait in line for
            return None
        if isinstance(taken, Refusal):
            if taken.wait_s > room:
                # Others took the places in line meanwhile: refuse now, not at the deadline.
                self.stats[(name, "refused")] += 1
                log.info("job.refused", reasons=[taken.reason])
                raise UpstreamUnavailable(
                    f"every endpoint of this bot is {_WHY.get(taken.reason, taken.reason)}"
                    " for longer than the request can wait"
                )
            # In flight is full (it frees at no known time): look again soon.
            await asyncio.sleep(taken.wait_s + random.uniform(0, 0.01))
            return None
        if taken.delay_s:
            log.info("budget.wait", endpoint=name, ms=round(taken.delay_s * 1000))
            await asyncio.sleep(taken.delay_s)
        verdict = self._fresh(name, config) or await self.cooldowns.check(name, config)
        if not verdict.usable:
            await self.budget.settle(taken, config, 0)
            return None
        probe = verdict.health is Health.PROBE
        return await self._call(job, name, config, probe, taken, pace, after_failure=after_failure)

    async def _take(
        self,
        job: ChatJob,
        name: str,
        config: EndpointConfig,
        deadline: float,
        *,
        max_wait_s: float,
    ) -> Grant | Refusal | None:
        if not config.budgeted:
            return None
        lease_s = deadline - asyncio.get_running_loop().time() + 1.0
        estimate = tokens.estimate_prompt(job.messages) + job.max_tokens
        return await self.budget.take(
            name, config, tokens=estimate, lease_s=lease_s, max_wait_s=max_wait_s
        )

    async def _call(
        self,
        job: ChatJob,
        name: str,
        config: EndpointConfig,
        probe: bool,
        grant: Grant | None,
        pace: Pace | None,
        *,
        after_failure: bool,
    ) -> _Call:
        """Call one endpoint up to its first piece; a failure is recorded and raised.

        An answer is logged (``endpoint.answered``) when it says something the
        job's ``job.finished`` line does not: that a probe succeeded, or that this
        endpoint answered after a failure. An ordinary answer's endpoint is on
        that line, and a second line per job was ~4 % of a worker's CPU.
        """
        local = self._local[name]
        await local.acquire()
        pieces = aiter(self._models[name].stream(job, pace))
        assert isinstance(pieces, AsyncGenerator)
        # A stream's first piece is its first token; a whole answer's is all of
        # it, bounded by the endpoint's own timeout instead.
        first_byte_s = config.first_byte_timeout_s if job.stream else None
        try:
            try:
                if first_byte_s is None:
                    first = await anext(pieces)
                else:
                    async with asyncio.timeout(first_byte_s):
                        first = await anext(pieces)
            except TimeoutError:
                raise UpstreamError(
                    f"the model endpoint sent nothing for {config.first_byte_timeout_s:g} s",
                    retryable=True,
                ) from None
            except StopAsyncIteration:
                raise UpstreamError("the model endpoint sent an empty answer") from None
        except UpstreamError as exc:
            await pieces.aclose()
            local.release()
            if grant is not None:
                await self.budget.settle(grant, config, 0)
            await self._failed(name, config, probe, exc)
            raise
        except BaseException:
            await pieces.aclose()
            local.release()
            if grant is not None:
                await self.budget.settle(grant, config, None)
            if probe:
                await self.cooldowns.give_back_probe(name, config)
            raise
        if probe:
            await self.cooldowns.probe_succeeded(name, config)
        self.stats[(name, "answered")] += 1
        if probe or after_failure:
            log.info("endpoint.answered", endpoint=name, probe=probe)
        return _Call(name, pieces, first, grant)

    async def _failed(
        self, name: str, config: EndpointConfig, probe: bool, exc: UpstreamError
    ) -> None:
        """A failed call: a Retry-After pauses the endpoint, other failures count to a cooldown."""
        self.stats[(name, "failed")] += 1
        log.warning(
            "endpoint.failed",
            endpoint=name,
            error=exc.message,
            retryable=exc.retryable,
            retry_after_s=exc.retry_after_s,
            probe=probe,
        )
        if exc.rate_limited or exc.retry_after_s is not None:
            settings = self._settings
            pause = exc.retry_after_s if exc.retry_after_s is not None else settings.pause_default_s
            await self.cooldowns.pause(name, config, min(pause, settings.retry_after_max_s))
            if probe:
                # Busy is not down: let the next probe decide.
                await self.cooldowns.give_back_probe(name, config)
        if exc.retryable and not exc.rate_limited:
            await self.cooldowns.failed(name, config, probe=probe)

    async def _backoff(self, failures: int, deadline: float) -> None:
        base = self._settings.fallback_backoff_ms / 1000
        pause = min(base * 2 ** (failures - 1), _MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
        room = deadline - asyncio.get_running_loop().time()
        await asyncio.sleep(max(0.0, min(pause, room)))


_BUDGET_REASONS = frozenset({"rpm", "tpm", "max_in_flight"})
_WHY = {
    "open": "cooling down",
    "probing": "being probed after a cooldown",
    "paused": "paused by the provider (Retry-After)",
    "rpm": "over its requests per minute",
    "tpm": "over its tokens per minute",
    "max_in_flight": "at its calls in flight",
}
