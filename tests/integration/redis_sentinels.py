"""The failover tests' Redis: a primary, its replicas and three sentinels on loopback
(:class:`bench.sentinel_group.SentinelGroup`, which the ``durable_ledger`` benchmark starts
too), as a context manager that fails the test when ``redis-server`` is missing."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.sentinel_group import (
    DOWN_AFTER_MS,
    PRIMARY_PASSWORD,
    SENTINEL_PASSWORD,
    SERVICE,
    SentinelGroup,
)

__all__ = [
    "DOWN_AFTER_MS",
    "PRIMARY_PASSWORD",
    "SENTINEL_PASSWORD",
    "SERVICE",
    "SentinelGroup",
    "sentinel_group",
]


@contextlib.contextmanager
def sentinel_group(workdir: Path, replicas: int = 1) -> Iterator[SentinelGroup]:
    """A started group, every process of it killed afterwards whatever happened."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; this test starts its own primary and sentinels")
    workdir.mkdir(parents=True, exist_ok=True)
    processes = SentinelGroup(binary, workdir, replicas)
    try:
        processes.start()
        yield processes
    finally:
        processes.stop()
