"""deploy/docker-compose.cluster.yml's Redis, for real: its five services (a primary, a replica,
three sentinels) started as local ``redis-server`` processes from the shipped configuration
files, with the Compose file's own entrypoint script and command line, and the worker's own
Redis client configured from the Compose file's worker environment.

Substituted, and nothing else: each listening port (a free one on loopback), ``bind``, the data
folder (``/data``, a temporary folder per service, as each has a volume of its own), the
configuration's mount point, the service names (``localhost``: it exercises
``resolve-hostnames`` and ``announce-hostnames`` as container names would), and the image's
entrypoint wrapper (``docker-entrypoint.sh``: it drops root, and adds ``--protected-mode no``,
which changes nothing for servers with a password). The passwords come in through the Compose
variables REDIS_PASSWORD and REDIS_SENTINEL_PASSWORD. Not covered: the image itself (its Redis
version, its entrypoint), Docker's DNS, a failover (tests/cluster/ rehearses one).

Needs ``redis-server`` and ``redis-cli`` (Debian: ``apt-get install redis-server``); about 8 s, 5 of
them Redis 7's ``repl-diskless-sync-delay`` before the replica's first sync.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.sentinel_group import PRIMARY_PASSWORD, SENTINEL_PASSWORD, SentinelGroup
from tests.deploy.cluster_files import (
    REDIS_CONFIG_TARGET,
    REDIS_SENTINELS,
    REDIS_SERVERS,
    cluster_compose,
    mounted_file,
)
from tests.integration.conftest import wait_until
from worker.connections.redis import open_redis
from worker.settings import Settings

SERVICE = "verloop"  # the name sentinel.conf monitors the primary under
COMPOSE_VARIABLES = {
    "REDIS_PASSWORD": PRIMARY_PASSWORD,
    "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
}
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)
_HOST = "localhost"


def _replace(text: str, pattern: str, replacement: str) -> str:
    """``text`` with every match of ``pattern`` (one at least) replaced."""
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count, f"{pattern!r} is not in the shipped file: the test no longer matches it"
    return new


class ComposeRedis(SentinelGroup):
    """The Compose file's Redis services as processes on loopback. Ports, the password-aware
    clients (:meth:`server`, :meth:`sentinel`) and the killing are SentinelGroup's; what is
    started, and how, comes from the Compose file."""

    def __init__(self, binary: str, workdir: Path) -> None:
        super().__init__(binary, workdir, replicas=1, sentinels=3)
        self.compose = cluster_compose(COMPOSE_VARIABLES)
        self.services: dict[str, dict[str, Any]] = self.compose["services"]
        self.port_of = {
            "redis-primary": self.ports["primary"],
            "redis-replica": self.ports["replica"],
            **dict(zip(REDIS_SENTINELS, self.sentinel_ports, strict=True)),
        }

    def data(self, name: str) -> Path:
        return self.workdir / name / "data"

    def _config(self, name: str) -> Path:
        """The service's shipped configuration with its port, bind address, data folder and
        the other services' names substituted, where the Compose file mounts it."""
        text = mounted_file(self.services[name], REDIS_CONFIG_TARGET).read_text(encoding="utf-8")
        text = _replace(text, r"^port \d+$", f"port {self.port_of[name]}")
        text = _replace(text, r"^dir /data$", f"dir {self.data(name)}")
        if name in REDIS_SERVERS:
            text = _replace(text, r"^bind .*$", "bind 127.0.0.1 -::1")
            text = _replace(text, r"^replica-announce-ip .*$", f"replica-announce-ip {_HOST}")
        if name != "redis-primary":
            primary = f"{_HOST} {self.port_of['redis-primary']}"
            text = _replace(text, r"\bredis-primary 6379\b", primary)
        path = self.workdir / name / "etc" / "redis.conf"
        path.parent.mkdir(parents=True)
        path.write_text(text, encoding="utf-8")
        self.data(name).mkdir(parents=True)
        return path

    def launch(self, name: str) -> None:
        """Start service ``name`` as Compose would: its entrypoint script, with its command."""
        service = self.services[name]
        shell, flag, script, arg0 = service["entrypoint"]
        assert (shell, flag) == ("sh", "-c")
        for container_path, local in (
            (REDIS_CONFIG_TARGET, str(self._config(name))),
            ("/data/", f"{self.data(name)}/"),
            ("docker-entrypoint.sh ", ""),
        ):
            assert container_path in script, f"{container_path} is not in the entrypoint"
            script = script.replace(container_path, local)
        arguments = [_HOST if value in self.services else value for value in service["command"]]
        log = self.data(name) / "redis.log"
        environment = {
            **os.environ,
            "PATH": f"{Path(self.binary).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.procs[self.port_of[name]] = subprocess.Popen(
            [shell, flag, script, arg0, *arguments, "--logfile", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.data(name),
            env=environment,
        )
        wait_until(lambda: self._answers(name), timeout=10)

    def _answers(self, name: str) -> bool:
        port = self.port_of[name]
        client = self.sentinel(port) if name in REDIS_SENTINELS else self.server(port)
        try:
            with client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def healthcheck(self, name: str) -> subprocess.CompletedProcess[str]:
        """The service's Compose healthcheck, run against its process."""
        kind, command = self.services[name]["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        port = self.port_of[name]
        command = (
            command.replace("-p 26379", f"-p {port}")
            if name in REDIS_SENTINELS
            else command.replace("redis-cli ", f"redis-cli -p {port} ")
        )
        environment = {**os.environ, **self.services[name]["environment"]}
        return subprocess.run(
            ["sh", "-c", command], env=environment, capture_output=True, text=True, timeout=10
        )


@pytest.fixture
def compose_redis(tmp_path: Path) -> Any:
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed: apt-get install redis-server")
    group = ComposeRedis(binary, tmp_path)
    try:
        yield group
    finally:
        group.stop()


def _replica_is_linked(group: ComposeRedis) -> bool:
    with group.server(group.port_of["redis-replica"]) as client:
        return client.info("replication").get("master_link_status") == "up"


def _sentinels_agree(group: ComposeRedis) -> bool:
    for name in REDIS_SENTINELS:
        with group.sentinel(group.port_of[name]) as client:
            state = client.sentinel_master(SERVICE)
        if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
            return False
    return True


def _worker_settings(group: ComposeRedis, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Compose worker's settings, read from the environment as in its container, with the
    sentinels' names and ports substituted."""
    environment = dict(group.services["worker"]["environment"])
    environment["REDIS_SENTINELS"] = ",".join(
        f"{_HOST}:{group.port_of[name]}" for name in REDIS_SENTINELS
    )
    for name in (*SETTING_NAMES, "VERLOOP_WORKER_ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    return Settings.load()


def test_compose_redis_replicates_and_the_sentinels_see_primary_and_replica(
    compose_redis: ComposeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = compose_redis
    primary, replica = group.port_of["redis-primary"], group.port_of["redis-replica"]

    group.launch("redis-primary")
    with group.server(primary) as client:
        # min-replicas-to-write 1: no replica connected, no write.
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            client.set("deploy-check", "1")
        assert client.config_get("min-replicas-*") == {
            "min-replicas-to-write": "1",
            "min-replicas-max-lag": "10",
        }
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}

    group.launch("redis-replica")
    # Redis 7 waits repl-diskless-sync-delay (5 s) for more replicas before the first sync.
    wait_until(lambda: _replica_is_linked(group), timeout=20)
    with group.server(primary) as client:
        assert client.set("deploy-check", "1")
        assert client.execute_command("WAIT", 1, 2000) == 1

    for name in REDIS_SENTINELS:
        group.launch(name)
    wait_until(lambda: _sentinels_agree(group), timeout=20)

    for name in REDIS_SENTINELS:
        with group.sentinel(group.port_of[name]) as client:
            master = client.sentinel_master(SERVICE)
            replicas = client.sentinel_slaves(SERVICE)
            others = client.sentinel_sentinels(SERVICE)
        # announce-hostnames: the servers and the sentinels are handed out by name.
        assert (master["ip"], master["port"]) == (_HOST, primary)
        assert [(r["ip"], r["port"]) for r in replicas] == [(_HOST, replica)]
        assert {(s["ip"], s["port"]) for s in others} == {
            (_HOST, group.port_of[other]) for other in REDIS_SENTINELS if other != name
        }
        # Sentinel wrote what it learnt into the copy in its data folder, not the shipped file.
        rewritten = (group.data(name) / "redis.conf").read_text(encoding="utf-8")
        assert f"sentinel known-replica {SERVICE} {_HOST} {replica}" in rewritten

    for name in (*REDIS_SERVERS, *REDIS_SENTINELS):
        result = group.healthcheck(name)
        assert result.returncode == 0, f"{name}'s healthcheck failed: {result.stderr}"

    # The worker's own client, set up from the Compose worker's environment, finds the primary
    # through the sentinels, and a replica confirms its write (LEDGER_DURABILITY=replica).
    settings = _worker_settings(group, monkeypatch)
    assert settings.ledger_durability == "replica"
    client = open_redis(settings)
    try:
        client.set("deploy-check", "worker")
        assert client.execute_command("WAIT", 1, 2000) == 1
    finally:
        client.close()
    with group.server(replica) as replica_client:
        assert replica_client.get("deploy-check") == b"worker"


def test_a_sentinel_without_its_password_is_refused(compose_redis: ComposeRedis) -> None:
    """The sentinels take REDIS_SENTINEL_PASSWORD from the Compose file's command line."""
    group = compose_redis
    group.launch("redis-primary")
    group.launch(REDIS_SENTINELS[0])
    port = group.port_of[REDIS_SENTINELS[0]]
    with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
        connection.sendall(b"PING\r\n")
        assert connection.recv(100).startswith(b"-NOAUTH")
    with group.sentinel(port) as client:
        assert client.ping()
    result = group.healthcheck(REDIS_SENTINELS[0])
    assert result.returncode != 0  # one sentinel alone cannot agree on a failover
