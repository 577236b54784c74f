"""pytest fixtures for private servers that tests may kill, freeze and restart.

Registered from tests/conftest.py (``pytest_plugins``). Redis starts in ~50 ms and a Sentinel
group in ~2 s, so those are per test. A RabbitMQ node takes 6-15 s here, so it is started once
per test module; the per-test fixture hands out that node running and thawed, restarting it if
an earlier test of the module killed it. Tests isolate on it by namespace, as on the shared
broker. All fixtures are synchronous, so they serve sync and async tests alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.private_servers import (
    PrivateRabbit,
    PrivateRabbitCluster,
    PrivateRedis,
    RedisSentinelGroup,
    run_blocking,
    start_all_blocking,
)


def _revive(*nodes: PrivateRabbit) -> None:
    """Thaw frozen nodes and restart killed ones (concurrently): each test gets them up."""
    for node in nodes:
        if node.frozen:
            node.thaw()
    dead = [node for node in nodes if not node.running]
    if dead:
        start_all_blocking(*dead)


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """A running private redis-server of this test's own; killed afterwards."""
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    try:
        server.start_blocking()
        yield server
    finally:
        server.close()


@pytest.fixture
def private_sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelGroup]:
    """A master, a replica and three Sentinels, ready to fail over; all killed afterwards."""
    group = RedisSentinelGroup(tmp_path_factory.mktemp("sentinels"))
    try:
        group.start_blocking()
        yield group
    finally:
        group.close()


@pytest.fixture(scope="module")
def rabbit_node_for_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbit]:
    """One private RabbitMQ node for the whole test module (use ``private_rabbit``)."""
    node = PrivateRabbit(tmp_path_factory.mktemp("rabbit"))
    try:
        node.start_blocking()
        yield node
    finally:
        node.close()


@pytest.fixture
def private_rabbit(rabbit_node_for_module: PrivateRabbit) -> PrivateRabbit:
    """The module's private RabbitMQ node, running and thawed when the test starts."""
    _revive(rabbit_node_for_module)
    return rabbit_node_for_module


@pytest.fixture(scope="module")
def rabbit_pair_for_module(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[PrivateRabbit, PrivateRabbit]]:
    """Two independent (not clustered) private nodes, started concurrently, per module."""
    nodes = (
        PrivateRabbit(tmp_path_factory.mktemp("rabbit-a")),
        PrivateRabbit(tmp_path_factory.mktemp("rabbit-b")),
    )
    try:
        start_all_blocking(*nodes)
        yield nodes
    finally:
        for node in nodes:
            node.close()


@pytest.fixture
def private_rabbit_pair(
    rabbit_pair_for_module: tuple[PrivateRabbit, PrivateRabbit],
) -> tuple[PrivateRabbit, PrivateRabbit]:
    """The module's two independent nodes, both running and thawed when the test starts."""
    _revive(*rabbit_pair_for_module)
    return rabbit_pair_for_module


@pytest.fixture(scope="module")
def rabbit_cluster_for_module(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrivateRabbitCluster]:
    """A two-node private RabbitMQ cluster for the whole module (use the per-test fixture)."""
    cluster = PrivateRabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        cluster.start_blocking()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def private_rabbit_cluster(rabbit_cluster_for_module: PrivateRabbitCluster) -> PrivateRabbitCluster:
    """The module's cluster with every node running, thawed and joined at test start."""
    _revive(*rabbit_cluster_for_module.nodes)
    run_blocking(rabbit_cluster_for_module.wait_joined())
    return rabbit_cluster_for_module
