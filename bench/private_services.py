"""A RabbitMQ node and a Redis server of the soak benchmark's own, which it may restart.

The machine's RabbitMQ and Redis are shared with other developers and CI: they are never
stopped or restarted. The soak starts its own instead, on free ports, with their data in a
temporary directory:

* :class:`PrivateRedis`: ``redis-server`` with AOF persistence (``appendfsync everysec``), as
  the README asks of a deployment: a restart keeps the ledger, the campaign and the outbox.
* :class:`PrivateRabbit`: a RabbitMQ node of its own (``RABBITMQ_NODENAME=soak-<pid>``, its own
  ports, Erlang cookie, data and log directories, no plugins); restarted with ``stop_app`` /
  ``start_app``: every connection is closed, durable queues and persistent jobs stay, and
  unacknowledged jobs are requeued, as on a broker restart.
* :class:`SharedRabbit`: the fallback when no private node can be started: vhost
  ``verloop-bench-soak`` on the shared broker, "restarted" by closing every connection of that
  vhost (and only that vhost) for the outage. Unacknowledged jobs are requeued as on a restart,
  but queues and the broker itself stay up: a weaker test, and the output says so.

Each child is started through ``setpriv --pdeathsig TERM`` when available, so it is stopped
even if the benchmark is killed; otherwise :meth:`stop` (called in ``finally``) stops it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Protocol

import pika
import pika.exceptions
import redis

from bench.common import BenchError, free_port, set_deploy_policies

#: The vhost of the soak on whichever broker it uses (never the regular bench's).
SOAK_VHOST = "verloop-bench-soak"
_GUEST = "guest"
_STOP_TIMEOUT_S = 60


def _die_with_us(command: list[str]) -> list[str]:
    """``command`` wrapped so the kernel sends it SIGTERM when this process dies."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """SIGTERM ``proc``'s process group (its own session), wait, then SIGKILL it."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class Broker(Protocol):
    """What the soak needs of a RabbitMQ: where it is, how to restart it, what it is."""

    amqp_url: str
    description: str

    def restart(self, down_s: float) -> None: ...

    def stop(self) -> None: ...


# --- Redis ---------------------------------------------------------------------------------------
class PrivateRedis:
    """``redis-server`` on a free port, data (AOF) in ``workdir``; see the module docstring."""

    def __init__(self, workdir: Path, log: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server is not on PATH: the soak starts and restarts its own")
        self.binary = binary
        self.workdir = workdir
        self.log = log
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(self.log),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            _die_with_us(command),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            deadline = time.monotonic() + 60  # loading a large AOF takes a moment
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(f"redis-server exited with {self.proc.returncode}; {self.log}")
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise BenchError(f"redis-server did not answer within 60 s; see {self.log}")
                time.sleep(0.1)
        finally:
            client.close()

    def restart(self, down_s: float) -> None:
        """Stop (SIGTERM: the AOF is flushed), stay down ``down_s``, start again."""
        _stop(self.proc)
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


# --- RabbitMQ ------------------------------------------------------------------------------------
def _rabbit_script(name: str) -> str | None:
    # Debian's /usr/sbin scripts switch to the rabbitmq user (and its cookie) when run as root;
    # the scripts they call take our environment as it is.
    direct = Path("/usr/lib/rabbitmq/bin") / name
    return str(direct) if direct.exists() else shutil.which(name)


class PrivateRabbit:
    """A RabbitMQ node of our own; see the module docstring."""

    description = "a private RabbitMQ node, restarted with rabbitmqctl stop_app/start_app"

    def __init__(self, workdir: Path, log: Path) -> None:
        server, ctl = _rabbit_script("rabbitmq-server"), _rabbit_script("rabbitmqctl")
        if server is None or ctl is None:
            raise BenchError("rabbitmq-server/rabbitmqctl not found")
        self.server, self.ctl_path = server, ctl
        self.workdir = workdir
        self.log = log
        self.port, self.dist_port = free_port(), free_port()
        self.node = f"soak-{os.getpid()}@localhost"
        self.amqp_url = f"amqp://{_GUEST}:{_GUEST}@127.0.0.1:{self.port}/{SOAK_VHOST}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = self._environment()

    def _environment(self) -> dict[str, str]:
        home = self.workdir
        (home / "enabled_plugins").write_text("[].\n")
        # The machine's /etc/rabbitmq files name the shared node and its port: ours are here.
        (home / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (home / "rabbitmq-env.conf").write_text(
            "ERL_EPMD_ADDRESS=127.0.0.1\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        cookie = home / ".erlang.cookie"  # a cookie of our own: no CLI of the shared node fits
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        own = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return own | {
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(home / "rabbitmq.pid"),
        }

    def ctl(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <our node> ARGS``; raises :class:`BenchError` if it fails."""
        command = [self.ctl_path, "-q", "-n", self.node, *args]
        try:
            done = subprocess.run(
                command, env=self.env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"rabbitmqctl {args[0]} took over {timeout_s:g} s") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BenchError(f"rabbitmqctl {args[0]} failed: {detail[0]}")
        return done

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                _die_with_us([self.server]),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._await_startup(deadline=time.monotonic() + 180)
            self.ctl("add_vhost", SOAK_VHOST)
            self.ctl("set_permissions", "-p", SOAK_VHOST, _GUEST, ".*", ".*", ".*")
            set_deploy_policies(self.ctl_path, SOAK_VHOST, node=self.node, env=self.env)
        except BaseException:
            self.stop()
            raise

    def _await_startup(self, deadline: float) -> None:
        # await_startup fails at once while the node has not registered with epmd yet.
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise BenchError(f"the private RabbitMQ node exited; see {self.log}")
            try:
                self.ctl("await_startup", "--timeout", "30", timeout_s=60)
                return
            except BenchError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def restart(self, down_s: float) -> None:
        self.ctl("stop_app")
        time.sleep(down_s)
        self.ctl("start_app")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(BenchError):
                self.ctl("stop", timeout_s=_STOP_TIMEOUT_S)
        _stop(self.proc)
        self.proc = None


class SharedRabbit:
    """The fallback: our vhost on the shared broker; see the module docstring."""

    description = (
        "NOT a restart: no private RabbitMQ node could be started, so the shared broker's "
        f"connections to vhost {SOAK_VHOST} were closed for the outage instead"
    )

    def __init__(self, queues: list[str]) -> None:
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            raise BenchError("rabbitmqctl not found")
        self.ctl_path = ctl
        self.queues = queues
        self.amqp_url = f"amqp://{_GUEST}:{_GUEST}@127.0.0.1:5672/{SOAK_VHOST}"

    def start(self) -> None:
        subprocess.run([self.ctl_path, "-q", "add_vhost", SOAK_VHOST], capture_output=True)
        subprocess.run(
            [self.ctl_path, "-q", "set_permissions", "-p", SOAK_VHOST, _GUEST, ".*", ".*", ".*"],
            capture_output=True,
            check=True,
        )
        set_deploy_policies(self.ctl_path, SOAK_VHOST)
        self._delete_queues()

    def restart(self, down_s: float) -> None:
        # Clients reconnect at once: keep closing their connections for the whole outage.
        end = time.monotonic() + down_s
        while time.monotonic() < end:
            subprocess.run(
                [
                    self.ctl_path, "-q", "close_all_connections", "--vhost", SOAK_VHOST,
                    "soak benchmark: simulated broker restart",
                ],
                capture_output=True,
                check=True,
            )  # fmt: skip
            time.sleep(1)

    def stop(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            self._delete_queues()

    def _delete_queues(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = connection.channel()
            for queue in self.queues:
                channel.queue_delete(queue)
        finally:
            connection.close()
