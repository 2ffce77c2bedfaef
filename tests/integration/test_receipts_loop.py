"""The whole loop, every part real: a campaign sent by a worker to the simulator, whose signed
status webhooks (duplicated, out of order) go through the receiver process and RabbitMQ to the
status actor, and end up in ``campaign status``'s funnel; a forged webhook publishes nothing; a
131048 status pauses that number's campaign sends."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import (
    Simulator,
    free_port,
    queue_depth,
    wait_until,
    worker_env,
)
from worker.campaigns.store import CampaignRef, CampaignStore
from worker.connections.redis import open_redis
from worker.receipts.models import STATUS_QUEUE
from worker.runtime.app import WorkerApp
from worker.settings import Settings

pytestmark = pytest.mark.integration

SECRET = "loop-test-app-secret"
CLI = [sys.executable, "-m", "worker.commands.main"]


class Receiver:
    """``verloop-worker webhooks`` as a process of its own."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/webhooks/whatsapp"
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [*CLI, "webhooks"],
            env=env
            | {
                "WEBHOOK_APP_SECRET": SECRET,
                "WEBHOOK_BIND": "127.0.0.1",
                "WEBHOOK_PORT": str(self.port),
                "WEBHOOK_METRICS_PORT": "0",
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._listening, timeout=20)

    def _listening(self) -> bool:
        assert self.proc.poll() is None, "the receiver exited"
        try:
            httpx.get(self.url, timeout=0.5)
        except httpx.TransportError:
            return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self._log.close()


@pytest.fixture
def cli_env(simulator: Simulator) -> dict[str, str]:
    """The environment of the CLI and the receiver, aimed at the test services."""
    return worker_env(simulator)


@pytest.fixture
def receiver(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Receiver]:
    running = Receiver(cli_env, tmp_path / "receiver.log")
    yield running
    running.stop()


def _statuses(simulator: Simulator, receiver: Receiver, **shares: Any) -> None:
    answer = simulator.http.put(
        "/admin/statuses",
        json={
            "url": receiver.url,
            "app_secret": SECRET,
            "delay_min_s": 0.01,
            "delay_max_s": 0.2,
            **shares,
        },
    )
    answer.raise_for_status()


def _start_campaign(
    env: dict[str, str], tmp_path: Path, campaign: str, recipients: int, phone: str
) -> None:
    rows = tmp_path / f"{campaign}.csv"
    rows.write_text("to\n" + "".join(f"+91987650{n:04d}\n" for n in range(recipients)))
    done = subprocess.run(
        [
            *CLI,
            "campaign",
            "start",
            str(rows),
            "--campaign-id",
            campaign,
            "--client-id",
            "acme",
            "--phone-id",
            phone,
            "--template",
            "spring_sale",
            "--language",
            "en",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _funnel(env: dict[str, str], campaign: str) -> dict[str, Any]:
    done = subprocess.run(
        [*CLI, "campaign", "status", campaign, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(json.loads(done.stdout)["funnel"])


def test_every_status_of_a_campaign_reaches_its_funnel_duplicated_and_out_of_order(
    simulator: Simulator,
    receiver: Receiver,
    start_worker: Callable[..., WorkerApp],
    cli_env: dict[str, str],
    tmp_path: Path,
) -> None:
    _statuses(
        simulator,
        receiver,
        failed=0.2,
        failure_codes={"131026": 1.0},
        delivered=1.0,
        read=0.5,
        duplicate=0.5,
        reorder=1.0,
        seed=15,
    )
    start_worker()
    _start_campaign(cli_env, tmp_path, "loop", 40, "phone-1")
    wait_until(
        lambda: (
            simulator.stats()["statuses"]["pending"] == 0
            and simulator.stats()["statuses"]["posted"] > 0
        ),
        timeout=60,
    )
    best = simulator.stats()["statuses"]["best"]
    expected = {
        "sent": 40,
        "delivered": best.get("delivered", 0) + best.get("read", 0),
        "read": best.get("read", 0),
        "failed": best.get("failed", 0),
    }
    assert expected["failed"] > 0
    assert expected["read"] > 0

    def arrived() -> dict[str, Any] | None:
        funnel = _funnel(cli_env, "loop")
        got = {k: funnel[k] for k in expected}
        return funnel if got == expected else None

    funnel = wait_until(arrived, timeout=60, interval=0.5)
    assert funnel["awaiting_status"] == 0
    assert [(c["code"], c["count"]) for c in funnel["failed_by_code"]] == [
        ("131026", expected["failed"])
    ]
    assert simulator.stats()["statuses"]["dropped"] == 0


def test_a_forged_webhook_publishes_nothing(receiver: Receiver, make_settings: Any) -> None:
    body = json.dumps({"object": "whatsapp_business_account", "entry": []}).encode()
    answer = httpx.post(
        receiver.url,
        content=body,
        headers={"X-Hub-Signature-256": "sha256=" + "0" * 64, "Content-Type": "application/json"},
    )
    assert answer.status_code == 401
    assert SECRET not in answer.text
    assert queue_depth(STATUS_QUEUE) == 0


def test_a_131048_status_pauses_the_numbers_campaign_sends(
    simulator: Simulator,
    receiver: Receiver,
    start_worker: Callable[..., WorkerApp],
    make_settings: Callable[..., Settings],
    cli_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """The send was accepted; WhatsApp then reports 131048 (spam rate limit): the number's next
    campaign sends wait (quality pause), its transactional sends do not."""
    _statuses(simulator, receiver, failed=1.0, failure_codes={"131048": 1.0}, seed=1)
    start_worker()
    _start_campaign(cli_env, tmp_path, "first", 1, "phone-7")
    wait_until(lambda: _funnel(cli_env, "first")["failed"] == 1, timeout=60, interval=0.5)
    sent = simulator.stats()["requests"].get("send_message", 0)
    _start_campaign(cli_env, tmp_path, "second", 3, "phone-7")
    cache = open_redis(make_settings())
    store = CampaignStore(cache)
    ref = CampaignRef("acme", "second")

    def deferred() -> bool:
        return int(store.get(ref).fields.get("enqueued", 0)) == 3

    wait_until(deferred, timeout=30)
    time.sleep(2)  # time enough to send them, were the number not paused
    assert simulator.stats()["requests"].get("send_message", 0) == sent
    assert store.get(ref).count("sent") == 0
    cache.close()
