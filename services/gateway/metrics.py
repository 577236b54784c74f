"""The gateway's Prometheus metrics: every series defined once (served by :mod:`health`).

Each application has its own :class:`~prometheus_client.CollectorRegistry`
(not the library's global one), so that several gateways in one process --
as in the tests -- count apart. Labels are bounded on purpose: a surface, a
status, an error code, a limit, a backend. No key, no key id, ever; the bot
id only when ``BOTLINE_METRICS_BOT_LABELS=true`` (one series per bot: fine
for tens of bots, ruinous for thousands -- what broke LiteLLM's ``/metrics``).

Instrumented where the thing happens: the edge middleware (requests and
their duration), :mod:`chat_run` (time to first token, queue wait, jobs in
flight), :mod:`sse` (streams open), :mod:`key_cache` (lookups),
:mod:`limits` (refusals), the readiness checks (backends up, refreshed on
every scrape) and :func:`shared.loop.watch_lag` (the event loop's lag).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# Latency buckets from 1 ms (an answer from cache) to 2 min (the request deadline).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip

# Key cache results (``botline_key_cache_lookups_total{result}``).
HIT, MISS, JOINED, MALFORMED, FAILED = "hit", "miss", "joined", "malformed", "error"


def surface_of(path: str) -> str:
    """The surface a path belongs to: a small fixed set, whatever the caller sent."""
    if path == "/v1/chat/completions":
        return "seed"
    if path.startswith("/openai/"):
        return "openai"
    if path.startswith("/admin"):
        return "admin"
    if path in ("/livez", "/readyz", "/metrics"):
        return "probe"
    return "other"


class GatewayMetrics:
    """One gateway's series, in its own registry."""

    def __init__(self, *, bot_labels: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.bot_labels = bot_labels
        reg = self.registry
        bot = ("bot",) if bot_labels else ()
        self.requests = Counter(
            "botline_requests",
            "HTTP requests answered, by surface, status and error code (none: no error; "
            "a stream that failed after it started counts its error's code with status 200)",
            ("surface", "status", "code", *bot),
            registry=reg,
        )
        self.request_duration = Histogram(
            "botline_request_duration_seconds",
            "Time from a request's arrival to its last byte (a stream: its whole length)",
            ("surface", "stream"),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.fair_share = Counter(
            "botline_fair_share_jobs",
            "Jobs of a key over its fair share of the fleet: queued a priority step lower "
            "(lowered), refused because the key also held its part of the queue (refused), "
            "or held in the gateway while only the reserve of slots was free (held)",
            ("action",),
            registry=reg,
        )
        self.jobs_aged = Counter(
            "botline_jobs_aged",
            "Low jobs published again a class higher after waiting PRIORITY_AGING_S",
            registry=reg,
        )
        self.queue_wait_by_priority = Histogram(
            "botline_queue_wait_by_priority_seconds",
            "Time from a job's publish to its first event, by the job's priority class",
            ("priority",),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "botline_time_to_first_token_seconds",
            "Streams: time from the request's arrival to its first piece of answer",
            ("surface", *bot),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            "botline_queue_wait_seconds",
            "Time from a job's publish to the first event of a worker on it",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.streams_open = Gauge(
            "botline_streams_open", "Event streams being written to callers", registry=reg
        )
        self.jobs_in_flight = Gauge(
            "botline_jobs_in_flight",
            "Jobs this gateway has published and not yet seen end",
            registry=reg,
        )
        self.key_lookups = Counter(
            "botline_key_cache_lookups",
            "API key checks: hit (cache), miss (Redis), joined (another request's lookup), "
            "malformed (refused without Redis), error (Redis failed)",
            ("result",),
            registry=reg,
        )
        self.limit_refusals = Counter(
            "botline_limit_refusals",
            "Requests refused by a key's limit (requests, tokens, concurrency)",
            ("limit",),
            registry=reg,
        )
        self.backend_up = Gauge(
            "botline_backend_up",
            "1 when the backend answers (redis, amqp, key_invalidations), as of the last "
            "scrape or readiness check",
            ("backend",),
            registry=reg,
        )
        self.loop_lag = Gauge(
            "botline_event_loop_lag_seconds",
            "How late the event loop ran a timer, last measured (a busy gateway's lag grows)",
            registry=reg,
        )
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        # Children resolved once, kept by their label values: ``labels()`` costs
        # several microseconds (validation, a lock), a dict lookup a tenth of that.
        # Bounded like the labels: surfaces x statuses x codes (x bots if asked).
        self._ttft: dict[tuple[str, str], Histogram] = {}
        self._queue_wait: dict[str, Histogram] = {}
        self._children: dict[tuple[str, int, str | None, bool, str], tuple[Counter, Histogram]] = {}
        self._lookup = {
            result: self.key_lookups.labels(result) for result in (HIT, MISS, JOINED, MALFORMED)
        }
        self._lookup[FAILED] = self.key_lookups.labels(FAILED)

    def key_lookup(self, result: str) -> None:
        """Count one API key check."""
        self._lookup[result].inc()

    def request(
        self,
        surface: str,
        status: int,
        code: str | None,
        stream: bool,
        seconds: float,
        bot_id: str | None,
    ) -> None:
        """Count one answered request and its duration."""
        bot = (bot_id or "") if self.bot_labels else ""
        key = (surface, status, code, stream, bot)
        children = self._children.get(key)
        if children is None:
            labels = [surface, str(status), code or "none"]
            if self.bot_labels:
                labels.append(bot)
            children = (
                self.requests.labels(*labels),
                self.request_duration.labels(surface, "true" if stream else "false"),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def queued(self, priority_class: str, seconds: float) -> None:
        """A job's wait in the queue, until a worker's first word on it."""
        self.queue_wait.observe(seconds)
        child = self._queue_wait.get(priority_class)
        if child is None:
            child = self._queue_wait[priority_class] = self.queue_wait_by_priority.labels(
                priority_class
            )
        child.observe(seconds)

    def first_token(self, surface: str, seconds: float, bot_id: str) -> None:
        """A stream's time to its first piece."""
        key = (surface, bot_id if self.bot_labels else "")
        child = self._ttft.get(key)
        if child is None:
            child = self._ttft[key] = self.ttft.labels(*key[: 2 if self.bot_labels else 1])
        child.observe(seconds)

    def render(self) -> bytes:
        """The exposition text of every series."""
        return generate_latest(self.registry)
