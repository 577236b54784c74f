"""The worker's Prometheus metrics: every series defined once, served on the probe port.

Like the gateway's, a registry per worker (tests run several in one
process). Labels: the endpoint (only names this worker is configured with;
a job naming any other counts as ``unknown``), an outcome or error code, an
upstream status, a direction -- all bounded. Never a key or key id, and no
bot id either: a job carries its bot's settings, not its id (bot labels,
``BOTLINE_METRICS_BOT_LABELS``, are the gateway's).

Instrumented in :mod:`services.worker.worker` (jobs, upstream calls, tokens,
redeliveries, dead letters); the event loop's lag by
:func:`shared.loop.watch_lag`, a task the worker owns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from shared.endpoint_state import EndpointState
from shared.wire import Usage

if TYPE_CHECKING:
    from services.worker.routing import SchedulerCounts

# From 5 ms (a cached answer nearby) to 2 min (a long answer, the request deadline).
UPSTREAM_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
UNKNOWN = "unknown"
# An endpoint's states as the fleet sees them (shared/endpoint_state.py).
ENDPOINT_STATES = ("closed", "open", "half_open", "probing", "paused")
# Why a job is dead-lettered (the worker's Disposition reasons).
DEAD_REASONS = ("delivery_limit", "invalid")


class WorkerMetrics:
    """One worker's series, in its own registry."""

    def __init__(self, endpoints: list[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.endpoints = frozenset(endpoints)
        reg = self.registry
        self.jobs = Counter(
            "botline_worker_jobs",
            "Jobs ended, by endpoint and outcome (done, an error code, cancelled, dropped)",
            ("endpoint", "outcome"),
            registry=reg,
        )
        self.jobs_in_flight = Gauge(
            "botline_worker_jobs_in_flight",
            "Jobs this worker is running, by endpoint",
            ("endpoint",),
            registry=reg,
        )
        self.upstream_duration = Histogram(
            "botline_upstream_duration_seconds",
            "Time a model endpoint took to give its whole answer (or fail)",
            ("endpoint",),
            buckets=UPSTREAM_BUCKETS,
            registry=reg,
        )
        self.upstream_ttft = Histogram(
            "botline_upstream_time_to_first_token_seconds",
            "Streams: time from the call to the endpoint to its first piece sent on",
            ("endpoint",),
            buckets=UPSTREAM_BUCKETS,
            registry=reg,
        )
        self.upstream_errors = Counter(
            "botline_upstream_errors",
            "Failed calls to a model endpoint, by its HTTP status or the failure "
            "(timeout, connection, malformed, stream)",
            ("endpoint", "status"),
            registry=reg,
        )
        self.tokens = Counter(
            "botline_tokens",
            "Tokens of finished answers, by endpoint and direction (prompt, completion)",
            ("endpoint", "direction"),
            registry=reg,
        )
        self.redeliveries = Counter(
            "botline_worker_redeliveries",
            "Jobs received again after their worker died holding them",
            registry=reg,
        )
        self.dead_letters = Counter(
            "botline_worker_dead_letters",
            "Jobs given up and dead-lettered (reason: delivery_limit, invalid)",
            ("reason",),
            registry=reg,
        )
        self.loop_lag = Gauge(
            "botline_event_loop_lag_seconds",
            "How late the event loop ran a timer, last measured (a busy worker's lag grows)",
            registry=reg,
        )
        # The scheduler (services/worker/routing.py): the fleet's view of each
        # endpoint, read from Redis when scraped, and this worker's counters.
        self.endpoint_state = Gauge(
            "botline_endpoint_state",
            "1 for each endpoint's state as the whole fleet sees it (closed, open, "
            "half_open, probing, paused), 0 for the others",
            ("endpoint", "state"),
            registry=reg,
        )
        self.endpoint_cooldown = Gauge(
            "botline_endpoint_cooldown_remaining_seconds",
            "Until an endpoint's cooldown ends (0: not cooling down)",
            ("endpoint",),
            registry=reg,
        )
        self.endpoint_paused = Gauge(
            "botline_endpoint_paused_remaining_seconds",
            "Until an endpoint's pause for the provider's Retry-After ends",
            ("endpoint",),
            registry=reg,
        )
        self.endpoint_fleet_in_flight = Gauge(
            "botline_endpoint_fleet_in_flight",
            "Calls holding an endpoint's declared fleet capacity (every worker's)",
            ("endpoint",),
            registry=reg,
        )
        self._counts: Callable[[], SchedulerCounts] | None = None
        self._states: Callable[[], Awaitable[list[EndpointState]]] | None = None
        reg.register(_SchedulerCollector(self))
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        for name in self.endpoints:
            # Present from the start, so a dashboard shows 0 rather than nothing.
            self.jobs_in_flight.labels(name)
        self.redeliveries.inc(0)
        self._series: dict[str, EndpointSeries] = {}
        for reason in DEAD_REASONS:
            self.dead_letters.labels(reason)

    def endpoint(self, name: str) -> str:
        """The label for an endpoint name from a job: only known names, else ``unknown``."""
        return name if name in self.endpoints else UNKNOWN

    def of(self, endpoint: str) -> EndpointSeries:
        """An endpoint's series, resolved once (``labels()`` is the costly part)."""
        series = self._series.get(endpoint)
        if series is None:
            series = self._series[endpoint] = EndpointSeries(self, endpoint)
        return series

    def watch_scheduler(
        self,
        counts: Callable[[], SchedulerCounts],
        states: Callable[[], Awaitable[list[EndpointState]]],
    ) -> None:
        """Serve the router's counters and the fleet's endpoint states too."""
        self._counts, self._states = counts, states

    def scheduler_counts(self) -> SchedulerCounts | None:
        """The router's counters now, if a router is watched."""
        return self._counts() if self._counts is not None else None

    async def refresh(self) -> None:
        """Read what a scrape needs from Redis: the endpoints' states (one pipelined read)."""
        if self._states is None:
            return
        for state in await self._states():
            for name in ENDPOINT_STATES:
                self.endpoint_state.labels(state.name, name).set(int(state.state == name))
            self.endpoint_cooldown.labels(state.name).set(state.cooldown_ms / 1000)
            self.endpoint_paused.labels(state.name).set(state.paused_ms / 1000)
            self.endpoint_fleet_in_flight.labels(state.name).set(state.in_flight)

    def render(self) -> bytes:
        """The exposition text of every series."""
        return generate_latest(self.registry)


class _SchedulerCollector:
    """The router's own counters, read at each scrape (they live in the router)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        counts = self._metrics.scheduler_counts()
        if counts is None:
            return
        calls = CounterMetricFamily(
            "botline_endpoint_calls",
            "This worker's scheduling of calls per endpoint (answered, failed, fallback, refused)",
            labels=("endpoint", "outcome"),
        )
        for (endpoint, outcome), n in sorted(counts.calls.items()):
            calls.add_metric((endpoint, outcome), n)
        yield calls
        yield CounterMetricFamily(
            "botline_budget_waits",
            "Places in line this worker took for an endpoint's declared capacity",
            value=counts.budget_waits,
        )
        yield CounterMetricFamily(
            "botline_budget_wait_seconds",
            "Seconds this worker's jobs waited for declared capacity",
            value=counts.budget_wait_s,
        )
        yield CounterMetricFamily(
            "botline_budget_refusals",
            "Jobs refused declared capacity (the wait would pass their deadline)",
            value=counts.budget_refusals,
        )
        yield CounterMetricFamily(
            "botline_cooldowns_opened",
            "Cooldowns this worker's failures opened for the whole fleet",
            value=counts.cooldowns_opened,
        )
        yield CounterMetricFamily(
            "botline_scheduler_redis_errors",
            "Redis calls of the scheduler that failed (the worker then fails open)",
            value=counts.redis_errors,
        )


class EndpointSeries:
    """One endpoint's children of the per-endpoint series, for the per-job hot path."""

    def __init__(self, metrics: WorkerMetrics, endpoint: str) -> None:
        self._metrics = metrics
        self.endpoint = endpoint
        self.in_flight = metrics.jobs_in_flight.labels(endpoint)
        self.duration = metrics.upstream_duration.labels(endpoint)
        self.ttft = metrics.upstream_ttft.labels(endpoint)
        self.prompt_tokens = metrics.tokens.labels(endpoint, "prompt")
        self.completion_tokens = metrics.tokens.labels(endpoint, "completion")
        self._outcomes: dict[str, Counter] = {}

    def job(self, outcome: str) -> None:
        """Count one job's end."""
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = self._metrics.jobs.labels(self.endpoint, outcome)
        counter.inc()

    def used(self, usage: Usage) -> None:
        """Count a finished answer's tokens."""
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.completion_tokens.inc(usage.completion_tokens)
