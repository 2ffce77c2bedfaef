"""A Redis that fails over, on loopback: a primary, its replicas and three sentinels, each a real
``redis-server`` process on a free port with its files in a folder of the caller's.

The failover tests (tests/integration/test_redis_sentinel.py, tests/cluster/) and the
``durable_ledger`` benchmark start one. Both Redis servers and the sentinels have passwords
(different ones), so a test can check that neither ever shows. The sentinels declare the primary
down after about a second (``down-after-milliseconds 1000``) and promote a replica a moment
later. With ``replicas=0`` and ``sentinels=0`` it is one plain server, started the same way.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from bench.common import free_port

SERVICE = "rehearsal"
#: The servers' and the sentinels' passwords: new ones each run, so that a test finding either in
#: any output finds a leak, not a coincidence.
PRIMARY_PASSWORD = "primary-" + secrets.token_hex(6)
SENTINEL_PASSWORD = "sentinel-" + secrets.token_hex(6)
#: The sentinels' opinion of a dead primary: subjectively down after this long.
DOWN_AFTER_MS = 1000


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)


class SentinelGroup:
    """The processes; :meth:`start` waits until the sentinels see the replicas and each other.

    ``ports`` names the servers as they started: ``primary``, ``replica`` (and ``replica-2``...
    with ``replicas`` > 1); which one is the primary now is :meth:`primary_port`'s answer.
    """

    def __init__(self, binary: str, workdir: Path, replicas: int = 1, sentinels: int = 3) -> None:
        self.binary = binary
        self.workdir = workdir
        self.replicas = replicas
        self.ports = {"primary": free_port()}
        for n in range(1, replicas + 1):
            self.ports["replica" if n == 1 else f"replica-{n}"] = free_port()
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def sentinels(self) -> str:
        """The REDIS_SENTINELS value for this group."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def worker_env(self) -> dict[str, str]:
        """The worker's settings that reach this group's primary through its sentinels
        (REDIS_URL carries the primary's password; its host is not used)."""
        return {
            "REDIS_URL": f"redis://:{PRIMARY_PASSWORD}@unused.invalid:1/0",
            "REDIS_SENTINELS": self.sentinels,
            "REDIS_SENTINEL_SERVICE": SERVICE,
            "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        }

    @property
    def pids(self) -> list[int]:
        """Every process of the group still running (servers and sentinels)."""
        return [proc.pid for proc in self.procs.values()]

    def _spawn(self, port: int, arguments: list[str]) -> None:
        log = self.workdir / f"{port}.log"
        self.procs[port] = subprocess.Popen(
            [*arguments, "--logfile", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
        )

    def _server(self, port: int, *extra: str) -> None:
        self._spawn(
            port,
            [
                self.binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--dbfilename", f"{port}.rdb",
                "--requirepass", PRIMARY_PASSWORD,
                "--masterauth", PRIMARY_PASSWORD,
                *extra,
            ],
        )  # fmt: skip

    def start(self) -> None:
        primary = self.ports["primary"]
        self._server(primary)
        for name, port in self.ports.items():
            if name != "primary":
                self._server(port, "--replicaof", "127.0.0.1", str(primary))
        for port in self.sentinel_ports:
            config = self.workdir / f"sentinel-{port}.conf"
            config.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        "bind 127.0.0.1",
                        f"dir {self.workdir}",
                        f"requirepass {SENTINEL_PASSWORD}",
                        f"sentinel sentinel-pass {SENTINEL_PASSWORD}",
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2",
                        f"sentinel auth-pass {SERVICE} {PRIMARY_PASSWORD}",
                        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                        f"sentinel failover-timeout {SERVICE} 4000",
                        f"sentinel parallel-syncs {SERVICE} 1",
                        "",
                    ]
                ),
                encoding="utf-8",
            )
            self._spawn(port, [self.binary, str(config), "--sentinel"])
        _wait(self._ready, 30, "the sentinels did not see the replicas and each other")

    def _ready(self) -> bool:
        try:
            with self.server(self.ports["primary"]) as client:
                client.ping()
            for port in self.sentinel_ports:
                with self.sentinel(port) as client:
                    state = client.sentinel_master(SERVICE)
                if state["num-slaves"] < self.replicas or state["num-other-sentinels"] < 2:
                    return False
            for name, port in self.ports.items():
                if name != "primary":
                    with self.server(port) as client:
                        if client.info("replication")["master_link_status"] != "up":
                            return False
        except redis.RedisError:
            return False
        return True

    @staticmethod
    def sentinel(port: int) -> redis.Redis:
        return redis.Redis(port=port, password=SENTINEL_PASSWORD, socket_timeout=1)

    @staticmethod
    def server(port: int) -> redis.Redis:
        return redis.Redis(port=port, password=PRIMARY_PASSWORD, socket_timeout=1)

    def primary_port(self) -> int | None:
        """Which of the two servers is a primary now (None: neither answers as one)."""
        for port in self.ports.values():
            with contextlib.suppress(redis.RedisError), self.server(port) as client:
                if client.info("replication")["role"] == "master":
                    return port
        return None

    def kill(self, port: int) -> None:
        """SIGKILL one process (no goodbye to its clients or its replica)."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)
