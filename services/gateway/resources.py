"""The resources of one gateway process, and the keys handlers reach them and their request by.

Built once at startup (:mod:`services.gateway.app`) and stored on the
application under :data:`GATEWAY`; handlers read ``request.config_dict[GATEWAY]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from services.gateway.closed_jobs import ClosedJobs
from services.gateway.job_client import JobClient
from services.gateway.key_cache import KeyCache
from services.gateway.limits import Limiter
from services.gateway.settings import GatewaySettings
from services.gateway.usage import UsageBook
from shared.registry import Registry

REQUEST_ID = web.RequestKey("request_id", str)
# Rate-limit headers for the response, whichever way it ends.
RATE_HEADERS = web.RequestKey("rate_headers", dict[str, str])
# The code of the error that ended a stream after its 200 was sent, for the request's log line.
STREAM_ERROR = web.RequestKey("stream_error", str)


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
    closed_jobs: ClosedJobs


GATEWAY = web.AppKey("gateway", Gateway)
