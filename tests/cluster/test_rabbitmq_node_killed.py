"""Rehearsal: the RabbitMQ node a worker is connected to is SIGKILLed mid-campaign.

Three nodes on loopback (tests/cluster/rabbit_cluster.py), ``QUEUE_TYPE=quorum``, and an
``AMQP_URL`` listing them with the second node first: the worker and ``campaign start`` connect
there, and the quorum queues they declare are led from there. A third of the way through the
campaign that node is killed (its whole process group, no goodbye): the worker's connections
move to the other two nodes, the queues elect new leaders, jobs the dead node had delivered and
not seen acknowledged come back, and the idempotency ledger keeps them from being sent again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.rabbit_cluster import running_cluster
from tests.cluster.rehearsal import rehearse
from tests.integration.conftest import Simulator, wait_until
from worker.jobs.models import CAMPAIGN_QUEUE

VHOST = "verloop-rehearsal"


@pytest.mark.timeout(600)
def test_the_node_a_worker_is_connected_to_is_killed_mid_campaign(
    simulator: Simulator, tmp_path: Path
) -> None:
    with running_cluster(tmp_path / "rabbit") as cluster:
        cluster.add_vhost(VHOST)
        first, second, third = cluster.nodes
        url = cluster.amqp_url(VHOST, order=[second, third, first])
        seen: dict[str, object] = {}

        def kill_the_connected_node() -> None:
            held = cluster.connections()
            connected = [node for node in cluster.nodes if held[node.name]]
            seen.update(held=held, leaders=cluster.queue_leaders(VHOST))
            # Everything went to the first node of the list that answered.
            assert [node.name for node in connected] == [second.name], held
            cluster.kill(second)
            seen["killed"] = second.name

            def reconnected() -> bool:
                now = cluster.connections()
                return now[second.name] == 0 and now[first.name] + now[third.name] > 0

            wait_until(reconnected, timeout=30, interval=1.0)
            seen["after"] = cluster.connections()

        figures = rehearse(
            "rabbitmq-node",
            simulator,
            tmp_path,
            {"AMQP_URL": url, "QUEUE_TYPE": "quorum"},
            url,
            kill_the_connected_node,
        )
        leaders = cluster.queue_leaders(VHOST)
        print(
            f"  connections     before the kill {seen['held']}, when back {seen['after']}\n"
            f"  {CAMPAIGN_QUEUE} led by {seen['leaders'][CAMPAIGN_QUEUE]} before the kill, "  # type: ignore[index]
            f"by {leaders[CAMPAIGN_QUEUE]} after",
            flush=True,
        )
    figures.assert_targets()
    assert leaders[CAMPAIGN_QUEUE] != second.name  # the queue lived on without the dead node
