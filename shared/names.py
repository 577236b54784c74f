"""Every queue, exchange and Redis key name, defined once.

All names hang off a *namespace* (setting `BOTLINE_NAMESPACE`, default
``botline``), so that several stacks -- or many tests running in parallel --
can share one Redis and one RabbitMQ without seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Names:
    """The names of one namespace's queues, exchanges and Redis keys."""

    namespace: str

    # --- RabbitMQ -------------------------------------------------------
    @property
    def jobs_queue(self) -> str:
        """Classic queue every worker consumes chat jobs from."""
        return f"{self.namespace}.jobs"

    @property
    def suspect_queue(self) -> str:
        """Classic queue of jobs whose worker died holding them, run one at a time per worker."""
        return f"{self.namespace}.jobs.suspect"

    @property
    def dead_exchange(self) -> str:
        """Headers exchange that receives jobs which failed too many deliveries."""
        return f"{self.namespace}.jobs.dlx"

    @property
    def dead_queue(self) -> str:
        """Where dead jobs are kept (bounded) for an operator to look at."""
        return f"{self.namespace}.jobs.dead"

    @property
    def control_exchange(self) -> str:
        """Fanout exchange for cancellations, bound by one queue per worker."""
        return f"{self.namespace}.control"

    @property
    def reply_exchange(self) -> str:
        """Direct exchange workers publish events to, keyed by reply queue name."""
        return f"{self.namespace}.replies"

    @property
    def unroutable_exchange(self) -> str:
        """Alternate exchange of the replies: events whose gateway is gone reach every worker."""
        return f"{self.namespace}.replies.unroutable"

    def reply_queue(self, gateway_id: str) -> str:
        """The exclusive queue one gateway process receives its events on."""
        return f"{self.namespace}.reply.{gateway_id}"

    def control_queue(self, worker_id: str) -> str:
        """The exclusive queue one worker process receives cancellations on."""
        return f"{self.namespace}.control.{worker_id}"

    # --- Redis ----------------------------------------------------------
    def bot(self, bot_id: str) -> str:
        """A bot's settings (JSON)."""
        return f"{self.namespace}:bot:{bot_id}"

    @property
    def bot_prefix(self) -> str:
        """Prefix of `bot()`; the key lookup script appends a bot id to it."""
        return f"{self.namespace}:bot:"

    @property
    def bots(self) -> str:
        """Set of all bot ids."""
        return f"{self.namespace}:bots"

    def bot_keys(self, bot_id: str) -> str:
        """Set of the key ids of one bot."""
        return f"{self.namespace}:bot:{bot_id}:keys"

    def key(self, key_hash: str) -> str:
        """A key's record (JSON), addressed by the SHA-256 of the key."""
        return f"{self.namespace}:key:{key_hash}"

    def key_id(self, key_id: str) -> str:
        """Maps a key id (what people manage keys by) to the key's hash."""
        return f"{self.namespace}:keyid:{key_id}"

    @property
    def key_last_used(self) -> str:
        """Hash: key id -> last use, epoch milliseconds."""
        return f"{self.namespace}:key_last_used"

    def rate(self, key_id: str, dimension: str) -> str:
        """A key's rate limiter state (``rpm``, ``tpm``: GCRA arrival time)."""
        return f"{self.namespace}:rl:{key_id}:{dimension}"

    def leases(self, key_id: str) -> str:
        """Sorted set of a key's requests in flight: lease id -> expiry (ms)."""
        return f"{self.namespace}:rl:{key_id}:leases"

    def key_usage(self, key_id: str) -> str:
        """Hash of a key's usage counters."""
        return f"{self.namespace}:usage:key:{key_id}"

    def bot_usage(self, bot_id: str) -> str:
        """Hash of a bot's usage counters."""
        return f"{self.namespace}:usage:bot:{bot_id}"

    def worker(self, worker_id: str) -> str:
        """A live worker's heartbeat (JSON), expiring unless renewed."""
        return f"{self.namespace}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        """Set of the ids of workers that sent a heartbeat (pruned when theirs expired)."""
        return f"{self.namespace}:workers"

    def usage_batch(self, batch_id: str) -> str:
        """Marks a usage batch as applied, so that a retried flush is not counted twice."""
        return f"{self.namespace}:usage_batch:{batch_id}"

    def taken_job(self, job_id: str) -> str:
        """Set by the worker that runs a job of which copies may be queued (``ChatJob.once``)."""
        return f"{self.namespace}:taken:{job_id}"

    def closed_job(self, job_id: str) -> str:
        """Set (with the job's remaining deadline as TTL) once its gateway stopped waiting for it.

        Workers read it only before running a job again (a redelivery): nobody
        waits for that answer any more.
        """
        return f"{self.namespace}:closed:{job_id}"

    def endpoint_health(self, endpoint: str) -> str:
        """Hash: a model endpoint's fleet-wide state (failures, cooldown, probe, pause)."""
        return f"{self.namespace}:endpoint:{endpoint}"

    def endpoint_budget(self, endpoint: str, dimension: str) -> str:
        """Sorted set of a model endpoint's fleet-wide budget (``rpm``, ``tpm``, ``inflight``)."""
        return f"{self.namespace}:endpoint:{endpoint}:{dimension}"

    @property
    def endpoints(self) -> str:
        """Set of the model endpoint names the workers know (for the admin API)."""
        return f"{self.namespace}:endpoints"

    @property
    def invalidate_channel(self) -> str:
        """Pub/sub channel on which key and bot changes reach every gateway."""
        return f"{self.namespace}:invalidate"

    @property
    def all_redis_keys(self) -> str:
        """A SCAN pattern matching every Redis key of this namespace."""
        return f"{self.namespace}:*"
