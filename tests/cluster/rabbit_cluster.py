"""A 3-node RabbitMQ cluster on loopback, for the rehearsals of tests/cluster/.

Each node is a real ``rabbitmq-server`` with its own node name (``verloop-c1-<tag>@localhost``),
AMQP and distribution ports (free ones, on 127.0.0.1), and data, log and plugin folders in a
temporary folder. None of them reads the machine's configuration: their own ``rabbitmq.conf``,
``rabbitmq-env.conf`` and enabled-plugins file (an empty list: no management or prometheus
listener) stand in for /etc/rabbitmq's, and a private ``HOME`` holds the cluster's Erlang
cookie, so the machine's node, its cookie and its ports are never touched.

The nodes boot in parallel (a node takes 10-20 s on two cores), then the second and third join
the first (``stop_app``, ``join_cluster``, ``start_app``). :meth:`RabbitCluster.stop` kills
every process of every node (each node runs in a process group of its own) and removes the
folder; use :func:`running_cluster` so that happens whatever the test did.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

#: Where Debian's and Ubuntu's package keep the real scripts: /usr/sbin/rabbitmq-server there
#: is a wrapper that switches to the rabbitmq user, dropping the environment set here.
PACKAGE_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
USER, PASSWORD = "guest", "guest"
#: How long a node may take to boot (or to start its app after joining) on a busy machine.
BOOT_TIMEOUT_S = 180


def _scripts_dir() -> Path:
    """The folder of the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts."""
    if (PACKAGE_SCRIPTS / "rabbitmq-server").exists():
        return PACKAGE_SCRIPTS
    found = shutil.which("rabbitmq-server")
    if found is None:
        pytest.fail(
            "rabbitmq-server is not installed (apt-get install rabbitmq-server): the cluster "
            "rehearsals start three RabbitMQ nodes of their own"
        )
    return Path(found).resolve().parent


@dataclass
class Node:
    """One node of the cluster and its process."""

    name: str
    amqp_port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def short(self) -> str:
        """``verloop-c1``: the name without the run's tag and host, for printing."""
        return self.name.rsplit("-", 1)[0]

    def url(self, vhost: str) -> str:
        return f"amqp://{USER}:{PASSWORD}@127.0.0.1:{self.amqp_port}/{vhost}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RabbitCluster:
    """Three nodes, started and joined by :meth:`start`."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.scripts = _scripts_dir()
        self.workdir = workdir
        self.home = workdir / "home"
        tag = secrets.token_hex(3)
        self.nodes = [
            Node(f"verloop-c{n}-{tag}@localhost", free_port(), free_port(), workdir / f"c{n}")
            for n in range(1, size + 1)
        ]

    # --- processes ------------------------------------------------------------------------------
    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home),
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.amqp_port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(self.workdir / "advanced.config"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
                RABBITMQ_PLUGINS_EXPAND_DIR=str(node.base / "plugins"),
                RABBITMQ_MNESIA_BASE=str(node.base / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.base / "log"),
                RABBITMQ_PID_FILE=str(node.base / "pid"),
                # Distribution on loopback only, and one scheduler: three nodes share 2 cores.
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                    "-kernel inet_dist_use_interface {127,0,0,1} +S 1:1 +sbwt none"
                ),
            )
        return env

    def _write_files(self) -> None:
        self.home.mkdir(parents=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20), encoding="ascii")
        cookie.chmod(0o400)
        (self.workdir / "rabbitmq-env.conf").write_text("", encoding="ascii")
        (self.workdir / "enabled_plugins").write_text("[].\n", encoding="ascii")
        (self.workdir / "rabbitmq.conf").write_text(
            "loopback_users = none\nlog.console = false\nlog.file.level = info\n",
            encoding="ascii",
        )
        for node in self.nodes:
            node.base.mkdir()

    def _spawn(self, node: Node) -> None:
        with (node.base / "stdout.log").open("ab") as log:
            node.proc = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")],
                env=self._env(node),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killed whole, helpers too
            )

    def ctl(self, node: Node, *args: str, timeout: float = 120) -> str:
        """``rabbitmqctl -n NODE ARGS``; fails the test with its output if it fails."""
        done = subprocess.run(
            [str(self.scripts / "rabbitmqctl"), "-q", "-n", node.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {node.name} {' '.join(args)} failed ({done.returncode}): "
                f"{done.stdout.strip()} {done.stderr.strip()}\n{self.log_tail(node)}"
            )
        return done.stdout

    def log_tail(self, node: Node, lines: int = 15) -> str:
        """The end of a node's logs, for a failure's message."""
        texts = []
        for path in [*sorted(node.base.glob("log/*.log")), node.base / "stdout.log"]:
            if path.exists():
                tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
                texts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(texts)

    def start(self) -> None:
        """Boot the nodes in parallel, wait for each, and join them to the first."""
        self._write_files()
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            self._await_startup(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
        # start_app returns once the node's app runs; the two may start together.
        starting = [
            subprocess.Popen(
                [str(self.scripts / "rabbitmqctl"), "-q", "-n", node.name, "start_app"],
                env=self._env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for node in self.nodes[1:]
        ]
        for proc in starting:
            proc.wait(timeout=BOOT_TIMEOUT_S)
        for node in self.nodes[1:]:
            self._await_startup(node)
        running = self.running_nodes(first)
        if running != {n.name for n in self.nodes}:
            raise RuntimeError(f"the cluster did not form: {first.name} sees {sorted(running)}")

    def _await_startup(self, node: Node) -> None:
        if not node.alive:
            raise RuntimeError(f"node {node.name} exited at boot\n{self.log_tail(node)}")
        # `wait PIDFILE` first waits for the node to write its pid (await_startup gives up on a
        # node not registered with epmd yet), then for its app to run.
        pid_file, limit = str(node.base / "pid"), str(BOOT_TIMEOUT_S)
        self.ctl(node, "wait", pid_file, "--timeout", limit, timeout=BOOT_TIMEOUT_S + 10)

    def running_nodes(self, asked: Node) -> set[str]:
        """The running nodes of the cluster, as ``asked`` sees them."""
        status = json.loads(self.ctl(asked, "cluster_status", "--formatter", "json"))
        return set(status["running_nodes"])

    def kill(self, node: Node) -> None:
        """SIGKILL the node's whole process group: no goodbye to its clients or its peers."""
        if node.proc is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=30)

    def stop(self) -> None:
        for node in self.nodes:
            self.kill(node)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- what the tests need ----------------------------------------------------------------------
    def amqp_url(self, vhost: str, order: list[Node] | None = None) -> str:
        """AMQP_URL listing the nodes (in ``order``), comma-separated."""
        return ",".join(node.url(vhost) for node in (order or self.nodes))

    def add_vhost(self, vhost: str) -> None:
        first = self.nodes[0]
        self.ctl(first, "add_vhost", vhost)
        self.ctl(first, "set_permissions", "-p", vhost, USER, ".*", ".*", ".*")

    def connections(self) -> dict[str, int]:
        """AMQP connections per node name. ``list_connections`` on any node lists the whole
        cluster's; a connection's name ends with the port it reached, which says whose it is."""
        alive = next(n for n in self.nodes if n.alive)
        listed = json.loads(self.ctl(alive, "list_connections", "name", "--formatter", "json"))
        return {
            node.name: sum(1 for row in listed if row["name"].endswith(f":{node.amqp_port}"))
            for node in self.nodes
        }

    def queue_leaders(self, vhost: str) -> dict[str, str]:
        """Queue name -> the node leading it (quorum queues) or holding it (classic)."""
        listed = self.ctl(
            next(n for n in self.nodes if n.alive),
            "list_queues", "-p", vhost, "name", "leader", "--formatter", "json",
        )  # fmt: skip
        return {row["name"]: row["leader"] for row in json.loads(listed)}


@contextmanager
def running_cluster(workdir: Path) -> Iterator[RabbitCluster]:
    """A started cluster, stopped and removed afterwards whatever happened."""
    cluster = RabbitCluster(workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
