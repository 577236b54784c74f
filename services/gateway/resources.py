"""The resources of one gateway process, and the keys handlers reach them and their request by.

Built once at startup (:mod:`services.gateway.app`) and stored on the
application under :data:`GATEWAY`; handlers reach it with :func:`gateway_of`.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from services.gateway.auth_failures import AuthFailures
from services.gateway.closed_jobs import ClosedJobs
from services.gateway.fair_share import FairShare
from services.gateway.inflight import InFlight
from services.gateway.job_client import JobClient
from services.gateway.key_cache import KeyCache
from services.gateway.limits import Limiter
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
from services.gateway.usage import UsageBook
from shared.registry import Registry

REQUEST_ID = web.RequestKey("request_id", str)
# Rate-limit headers for the response, whichever way it ends.
RATE_HEADERS = web.RequestKey("rate_headers", dict[str, str])
# When the edge took the request (``time.perf_counter()``).
STARTED = web.RequestKey("started", float)
# What the edge's metrics need to know of a chat request once it is over.
STREAM = web.RequestKey("stream", bool)
BOT_ID = web.RequestKey("bot_id", str)
# The code of the error that ended a stream after it started (its status stays 200).
STREAM_ERROR = web.RequestKey("stream_error", str)
# The response whose head went out (a stream, or a whole answer written before the
# request was settled): an error after that cannot be answered with another.
RESPONSE = web.RequestKey("response", web.StreamResponse)


@dataclass(slots=True)
class Gateway:
    """The resources of one gateway process."""

    settings: GatewaySettings
    redis: Redis
    registry: Registry
    keys: KeyCache
    job_client: JobClient
    limiter: Limiter
    usage: UsageBook
    inflight: InFlight
    auth_failures: AuthFailures
    metrics: GatewayMetrics
    closed_jobs: ClosedJobs
    fair_share: FairShare


GATEWAY = web.AppKey("gateway", Gateway)


def gateway_of(request: web.Request) -> Gateway:
    """The request's gateway resources.

    From the request's application: the gateway is one application without
    sub-applications, so this is what ``request.config_dict[GATEWAY]`` finds,
    without the chain of mappings that builds on every call.
    """
    return request.app[GATEWAY]
