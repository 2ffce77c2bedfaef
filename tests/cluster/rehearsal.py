"""A campaign drained by a real worker while something fails, and what came of it.

:func:`rehearse` is both rehearsals' common part: a ``verloop-worker run`` process drains a
campaign of :data:`RECIPIENTS` recipients, enqueued by ``verloop-worker campaign start``, at a
per-number rate limit that binds (the simulator counts every send over it); a third of the way
in, the rehearsal's fault is done; once every recipient has been messaged and the queues are
empty, the simulator's records are counted into :class:`Figures`, which are printed and checked
against the issue's targets:

* 0 recipients lost (each messaged, none dead-lettered), 0 messaged twice (by recipient, and by
  idempotency key as the simulator counts duplicates);
* sending resumes within :data:`RESUME_WITHIN_S` of the fault: the longest pause between two
  accepted sends, from the last one before the fault on;
* no number over its limit by more than one second's worth: the accepted sends of each number,
  replayed through the simulator's own token bucket (rate and burst of the limit), count at
  most ``rate`` sends over it.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.conftest import (
    VENV_BIN,
    Simulator,
    dead_letters,
    queue_depth,
    wait_for_progress,
    wait_until,
    worker_env,
    worker_process,
)
from worker.jobs.models import CAMPAIGN_QUEUE
from worker.sandbox.limits import TokenBucket

RECIPIENTS = 3000
PHONES = ("phone-1", "phone-2", "phone-3")
#: Messages per second per number: the worker's RATE_LIMIT_PER_NUMBER and the simulator's.
#: Three numbers at 40/s send the campaign in about 25 s.
RATE = 40
RESUME_WITHIN_S = 30.0
THREADS = 8


@dataclass
class Figures:
    """What a rehearsal's campaign came to, from the simulator's records."""

    name: str
    recipients: int
    #: Recipients the simulator accepted at least one message for.
    messaged: int
    #: Recipients it accepted more than one message for.
    messaged_twice: int
    #: Sends whose idempotency key it had seen before (its own count).
    duplicates: int
    accepted: int
    dead_lettered: int
    #: Accepted sends when the fault was done.
    accepted_before_fault: int
    #: Longest pause between accepted sends from the last one before the fault.
    resume_gap_s: float
    #: Per number: accepted sends over its limit (the simulator's token bucket, replayed).
    over_limit: dict[str, int]
    #: The simulator's own count of sends over a limit, all numbers.
    violations: int
    #: First to last accepted send.
    seconds: float
    campaign_status: dict[str, object] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.recipients - self.messaged

    def report(self) -> str:
        over = ", ".join(f"{phone} {n}" for phone, n in sorted(self.over_limit.items()))
        status = self.campaign_status
        return "\n".join(
            [
                f"rehearsal {self.name}: {self.recipients} recipients over {len(PHONES)} numbers "
                f"at {RATE}/s each; fault after {self.accepted_before_fault} accepted sends",
                f"  resume gap      {self.resume_gap_s:.2f} s (longest pause in accepted sends "
                f"after the fault; target < {RESUME_WITHIN_S:g} s)",
                f"  lost            {self.lost} (messaged {self.messaged}, dead-lettered "
                f"{self.dead_lettered})",
                f"  messaged twice  {self.messaged_twice} by recipient, {self.duplicates} "
                f"duplicate idempotency keys; {self.accepted} sends accepted",
                f"  over the limit  {over} (at most {RATE}, one second's worth, each); simulator "
                f"violations {self.violations}",
                f"  campaign        {self.seconds:.1f} s first to last send; `campaign status`: "
                + ", ".join(f"{k} {status.get(k)}" for k in ("sent", "suppressed", "pending")),
            ]
        )

    def assert_targets(self) -> None:
        assert self.accepted_before_fault < self.recipients // 2, "the fault came too late"
        assert self.lost == 0, self.report()
        assert self.dead_lettered == 0, self.report()
        assert self.messaged_twice == 0, self.report()
        assert self.duplicates == 0, self.report()
        assert self.resume_gap_s < RESUME_WITHIN_S, self.report()
        assert max(self.over_limit.values()) <= RATE, self.report()


def write_campaign(path: Path, count: int = RECIPIENTS) -> list[str]:
    """A campaign file of ``count`` recipients with one body parameter; returns them."""
    recipients = [f"+9197{n:08d}" for n in range(count)]
    with path.open("w", encoding="utf-8") as handle:
        handle.write("to,body_1\n")
        handle.writelines(f"{to},R{n}\n" for n, to in enumerate(recipients))
    return recipients


def campaign_command(simulator: Simulator, env: dict[str, str], *args: str) -> str:
    """``verloop-worker campaign ARGS`` as a process with the rehearsal's settings."""
    done = subprocess.run(
        [str(VENV_BIN / "verloop-worker"), "campaign", *args],
        env=worker_env(simulator, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def over_limit(times: dict[str, list[float]], rate: float) -> dict[str, int]:
    """Sends of each number beyond what a token bucket of ``rate`` (burst ``rate``) allows."""
    over: dict[str, int] = {}
    for phone, stamps in times.items():
        stamps.sort()
        bucket, count = TokenBucket(rate, stamps[0]), 0
        for stamp in stamps:
            if bucket.available(stamp):
                bucket.take()
            else:
                count += 1
        over[phone] = count
    return over


def longest_pause(stamps: list[float], since: float) -> float:
    """The longest gap between consecutive ``stamps`` from the last one before ``since``."""
    ordered = sorted(stamps)
    before = [s for s in ordered if s <= since]
    start = before[-1] if before else since
    after = [start, *(s for s in ordered if s > since)]
    return max((b - a for a, b in itertools.pairwise(after)), default=0.0)


def rehearse(
    name: str,
    simulator: Simulator,
    tmp_path: Path,
    env: dict[str, str],
    amqp_url: str,
    fault: Callable[[], None],
) -> Figures:
    """Run a campaign through a worker with settings ``env``, doing ``fault`` a third of the way
    in; ``amqp_url`` (the worker's) is where the queues are checked empty at the end."""
    simulator.faults(per_number_rate=RATE, enforce_limits=False)
    path = tmp_path / f"{name}.csv"
    recipients = write_campaign(path)
    settings = {"RATE_LIMIT_PER_NUMBER": str(RATE), **env}
    campaign_id = f"rehearsal-{name}"
    log_path = tmp_path / "worker.log"
    with worker_process(simulator, log_path, "--threads", str(THREADS), **settings) as proc:
        campaign_command(
            simulator,
            settings,
            "start",
            str(path),
            "--client-id",
            "acme",
            *(arg for phone in PHONES for arg in ("--phone-id", phone)),
            "--template",
            "spring_sale",
            "--body-params",
            "1",
            "--campaign-id",
            campaign_id,
            "--no-progress",
        )
        wait_until(lambda: simulator.stats()["sent"] >= RECIPIENTS // 3, timeout=120)
        accepted_before_fault = int(simulator.stats()["sent"])
        faulted_at = time.time()  # the simulator's received_at is wall-clock time
        fault()

        def messaged() -> int:
            return len({m["to"] for m in simulator.messages()})

        # Stuck longer than the target (with margin) fails here, naming the count.
        wait_for_progress(messaged, RECIPIENTS, stall_s=RESUME_WITHIN_S + 15, interval=0.5)
        wait_until(
            lambda: (
                queue_depth(CAMPAIGN_QUEUE, amqp_url) == 0
                and queue_depth(CAMPAIGN_QUEUE + ".DQ", amqp_url) == 0
            ),
            timeout=60,
        )
        time.sleep(3.0)  # a job delivered twice and deferred as busy looks again within 1.25 s
        assert proc.poll() is None, "the worker process died"
        status = json.loads(campaign_command(simulator, settings, "status", campaign_id, "--json"))
    records = simulator.messages()
    stats = simulator.stats()
    per_recipient = Counter(m["to"] for m in records)
    times: dict[str, list[float]] = defaultdict(list)
    for record in records:
        times[record["phone_id"]].append(record["received_at"])
    stamps = [m["received_at"] for m in records]
    figures = Figures(
        name=name,
        recipients=len(recipients),
        messaged=len(set(per_recipient) & set(recipients)),
        messaged_twice=sum(1 for n in per_recipient.values() if n > 1),
        duplicates=int(stats["duplicates"]),
        accepted=int(stats["sent"]),
        dead_lettered=len(dead_letters(CAMPAIGN_QUEUE, amqp_url)),
        accepted_before_fault=accepted_before_fault,
        resume_gap_s=longest_pause(stamps, faulted_at),
        over_limit=over_limit(times, RATE),
        violations=int(stats["rate_limit_violations"]),
        seconds=max(stamps) - min(stamps),
        campaign_status=status,
    )
    print("\n" + figures.report(), flush=True)
    return figures
