"""Rehearsal: the Redis primary is SIGKILLed mid-campaign and a replica promoted.

A primary, two replicas and three sentinels on loopback (tests/integration/redis_sentinels.py);
the worker and ``campaign start`` reach the primary through the sentinels
(``REDIS_SENTINELS``), with ``LEDGER_DURABILITY=replica``. Two replicas, as the README advises
for ``replica``: after the promotion one is left to confirm the ledger's records. A third of the
way through the campaign the primary is killed. Until the sentinels promote a replica no primary
answers, and the limiter and the ledger hold their sends (fail-closed): the jobs are deferred
through the delay queue, not lost; then sending resumes on the new primary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.rehearsal import rehearse
from tests.integration.conftest import AMQP_URL, Simulator, wait_until
from tests.integration.redis_sentinels import (
    PRIMARY_PASSWORD,
    SENTINEL_PASSWORD,
    sentinel_group,
)


@pytest.mark.timeout(600)
def test_the_redis_primary_is_killed_mid_campaign_and_a_replica_promoted(
    simulator: Simulator, tmp_path: Path
) -> None:
    with sentinel_group(tmp_path / "redis", replicas=2) as group:
        env = group.worker_env() | {"LEDGER_DURABILITY": "replica"}
        old = group.ports["primary"]
        promoted: list[int | None] = []

        def kill_the_primary() -> None:
            group.kill(old)
            promoted.append(wait_until(group.primary_port, timeout=30, interval=0.1))

        figures = rehearse("redis-primary", simulator, tmp_path, env, AMQP_URL, kill_the_primary)
        print(f"  promoted        port {promoted[0]} (primary was {old})", flush=True)
    figures.assert_targets()
    assert promoted[0] != old
    logs = (tmp_path / "worker.log").read_text(encoding="utf-8")
    assert "sends held: Redis unreachable" in logs  # fail-closed while no primary answered
    assert PRIMARY_PASSWORD not in logs
    assert SENTINEL_PASSWORD not in logs
