"""Publish a batch of jobs to a real worker and check that none of them hurt the others.

Invariants checked after each batch (see :meth:`Harness.check`):

* ``ends_once``: every job ends exactly once (one final outcome event each), valid jobs end
  ``sent``/``done``, and nothing is left in the work or delay queues;
* ``dead_letters``: a dead-lettered job is in ``<queue>.XQ`` once, with the
  ``x-verloop-dead-letter`` header and a reason; no dead letter belongs to nobody;
* ``messaged_once``: no recipient got a job's message twice;
* ``verloop_ids``: every ``sent`` event names a message the simulator accepted;
* ``no_pointless_retries``: nothing gives up after retries (the simulator injects no faults,
  so only a job's own ``time_limit`` can make an attempt fail for a reason worth a retry);
* ``threads``: the worker's threads are all alive;
* ``good_jobs``: ordinary sends published after the batch are sent.

Each invariant fails as its own exception class, so Hypothesis tells distinct failures apart.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from tests.integration.conftest import (
    AMQP_URL,
    QUEUES,
    REDIS_URL,
    Simulator,
    WorkerStarter,
    queue_depth,
    redis_client,
)
from tests.property.strategies import NONCE, PHONE_STEM, Job, encode, message_id, recipient
from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.models import CAMPAIGN_QUEUE, MANAGE_QUEUE, SEND_QUEUE

EXCHANGE = "verloop.events"
WORK_QUEUES = (SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE)
FINAL_OUTCOMES = frozenset({"sent", "suppressed", "cancelled", "dead_lettered", "done"})
UNDECODABLE = "verloop.undecodable"
#: How long a batch may take to settle. Retries with the test settings' backoff take about
#: 2 s in all; a job still without an outcome after this is stuck.
SETTLE_S = float(os.environ.get("FUZZ_SETTLE_S", "8"))
#: After the last outcome arrived: how long to keep listening for a second one (about twice
#: the outbox relay's latency).
QUIET_S = 0.4
THREADS = 4
#: Recipients of the ordinary sends published after each batch (batch indexes stay below).
GOOD_INDEXES = (9000, 9001, 9002)

#: The regression corpus; FUZZ_CORPUS_DIR replays another folder (say .hypothesis/found).
CORPUS_DIR = Path(os.environ.get("FUZZ_CORPUS_DIR") or Path(__file__).parent / "corpus")


class InvariantBroken(AssertionError):
    """One invariant failed; subclasses name which."""


class EndsOnce(InvariantBroken):
    pass


class DeadLetters(InvariantBroken):
    pass


class MessagedOnce(InvariantBroken):
    pass


class VerloopIds(InvariantBroken):
    pass


class NoPointlessRetries(InvariantBroken):
    pass


class Threads(InvariantBroken):
    pass


class GoodJobs(InvariantBroken):
    pass


INVARIANTS: dict[str, type[InvariantBroken]] = {
    "ends_once": EndsOnce,
    "dead_letters": DeadLetters,
    "messaged_once": MessagedOnce,
    "verloop_ids": VerloopIds,
    "no_pointless_retries": NoPointlessRetries,
    "threads": Threads,
    "good_jobs": GoodJobs,
}


# --- rendering ----------------------------------------------------------------------------------
@dataclass
class Published:
    """A job as published: its body with this run's nonce, and how to recognise its outcome."""

    job: Job
    body: bytes
    #: The envelope's message_id when the body is a JSON object carrying one as a string.
    message_id: str | None
    #: The digits of its recipient when it has one of the run's unique recipients.
    marker: str | None
    actor: str | None
    options: dict[str, Any]
    good: bool = False

    @property
    def key(self) -> tuple[str, bytes]:
        """Copies of one body published to one queue are one job published twice."""
        return self.job.queue, self.body


def _nonces() -> Iterable[tuple[str, str]]:
    start = random.randrange(1 << 20)
    for n in itertools.count(start):
        yield f"n{n % (1 << 24):06x}n", f"{n % 100_000:05d}"


def render_text(text: str, nonce: str, phone: str) -> str:
    return text.replace(NONCE, nonce).replace(f"+91{PHONE_STEM}", f"+919{phone}")


def render(job: Job, nonce: str, phone: str, *, good: bool = False) -> Published:
    body = job.body.replace(NONCE.encode(), nonce.encode()).replace(
        f"+91{PHONE_STEM}".encode(), f"+919{phone}".encode()
    )
    mid = marker = actor = None
    options: dict[str, Any] = {}
    try:
        envelope = json.loads(body)
    except (ValueError, RecursionError):
        envelope = None
    if isinstance(envelope, dict):
        if isinstance(envelope.get("message_id"), str):
            mid = envelope["message_id"]
        if isinstance(envelope.get("actor_name"), str):
            actor = envelope["actor_name"]
        if isinstance(envelope.get("options"), dict):
            options = envelope["options"]
        kwargs = envelope.get("kwargs")
        to = kwargs.get("to") if isinstance(kwargs, dict) else None
        if isinstance(to, str) and to.startswith(f"+919{phone}"):
            marker = to.removeprefix("+")
    return Published(job, body, mid, marker, actor, options, good)


def good_jobs() -> list[Job]:
    """Ordinary sends, published after every batch: they must go out whatever came before."""
    jobs = []
    for index in GOOD_INDEXES:
        queue = CAMPAIGN_QUEUE if index == GOOD_INDEXES[-1] else SEND_QUEUE
        kwargs: dict[str, Any] = {
            "client_id": "acme",
            "phone_id": "phone-good",
            "to": recipient(index),
            "message": {"type": "text", "text": {"body": "an ordinary message"}},
        }
        if queue == CAMPAIGN_QUEUE:
            kwargs["campaign_id"] = f"{NONCE}-good"
        envelope = {"actor_name": "send_message", "kwargs": kwargs, "message_id": message_id(index)}
        jobs.append(Job(queue, encode(envelope), "valid", "an ordinary send"))
    return jobs


# --- the corpus ---------------------------------------------------------------------------------
def job_to_json(job: Job) -> dict[str, Any]:
    data: dict[str, Any] = {"queue": job.queue, "kind": job.kind, "note": job.note}
    if job.script:
        data["script"] = list(job.script)
    try:
        data["body"] = job.body.decode("utf-8")
    except UnicodeDecodeError:
        data["body_b64"] = base64.b64encode(job.body).decode("ascii")
    return data


def job_from_json(data: dict[str, Any]) -> Job:
    body = (
        data["body"].encode("utf-8", "surrogatepass")
        if "body" in data
        else base64.b64decode(data["body_b64"])
    )
    return Job(
        data["queue"],
        body,
        data.get("kind", "hostile"),
        data.get("note", ""),
        tuple(data.get("script", ())),
    )


def load_case(path: Path) -> tuple[str, list[Job]]:
    case = json.loads(path.read_text(encoding="utf-8"))
    return case["note"], [job_from_json(job) for job in case["jobs"]]


def case_json(note: str, jobs: list[Job]) -> str:
    return json.dumps(
        {"note": note, "jobs": [job_to_json(job) for job in jobs]}, indent=2, ensure_ascii=False
    )


# --- events -------------------------------------------------------------------------------------
class Events:
    """Every outcome event, on a queue of the test's own bound to ``#``."""

    def __init__(self) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, EXCHANGE, routing_key="#")

    def take(self) -> list[tuple[str, Any]]:
        got = []
        while True:
            method, _, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return got
            try:
                event = json.loads(body)
            except ValueError:
                event = {"undecodable_event": body[:200]}
            got.append((method.routing_key, event))

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@dataclass
class Letter:
    queue: str
    headers: dict[str, Any]
    body: bytes

    @property
    def info(self) -> dict[str, Any] | None:
        info = self.headers.get(DEAD_LETTER_HEADER)
        return info if isinstance(info, dict) else None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --- the harness --------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one check saw."""

    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, invariant: str, text: str) -> None:
        self.violations[invariant].append(text[:600])

    def raise_first(self, context: str) -> None:
        for name, cls in INVARIANTS.items():
            if self.violations.get(name):
                raise cls(f"{context}\n{self.describe()}")

    def describe(self) -> str:
        return "\n".join(
            f"  [{name}] {text}" for name, texts in self.violations.items() for text in texts[:8]
        )


class Harness:
    """A worker, an events subscriber and a publisher, shared by every example of a test."""

    def __init__(self, simulator: Simulator, start_worker: WorkerStarter) -> None:
        self.simulator = simulator
        self.start_worker = start_worker
        self.app = start_worker(threads=THREADS, as_process=True)
        self.events = Events()
        self.publisher = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.publisher.channel()
        self.channel.confirm_delivery()
        self.nonces = iter(_nonces())
        self.duplicates_before = 0
        #: Per invariant, the smallest batch that broke it (what ``make fuzz`` keeps).
        self.smallest_failures: dict[str, tuple[list[Job], str]] = {}

    def close(self) -> None:
        self.events.close()
        if self.publisher.is_open:
            self.publisher.close()

    # -- one batch --
    def run(self, jobs: list[Job]) -> Outcome:
        """Publish ``jobs`` and then a few ordinary sends; wait for them to settle; check."""
        nonce, phone = next(self.nonces)
        published = [render(job, nonce, phone) for job in jobs]
        published += [render(job, nonce, phone, good=True) for job in good_jobs()]
        self.duplicates_before = int(self.simulator.stats()["duplicates"])
        script = [
            json.loads(render_text(json.dumps(entry), nonce, phone))
            for job in jobs
            for entry in job.script
        ]
        if script:
            self.simulator.script(*script)
        for item in published:
            self.channel.basic_publish(
                exchange="",
                routing_key=item.job.queue,
                body=item.body,
                properties=pika.BasicProperties(delivery_mode=2, timestamp=int(time.time())),
                mandatory=True,
            )
        events, letters = self._settle(published)
        outcome = self._check(published, events, letters)
        if outcome.violations:
            self._remember(jobs, outcome)
            self.reset()
        return outcome

    def check(self, jobs: list[Job]) -> None:
        """Run ``jobs``; raise the first broken invariant's exception."""
        outcome = self.run(jobs)
        outcome.raise_first("\n".join(f"  job: {job.queue} {job.note}" for job in jobs))

    def _settle(self, published: list[Published]) -> tuple[list[tuple[str, Any]], list[Letter]]:
        events: list[tuple[str, Any]] = []
        letters: list[Letter] = []
        deadline = time.monotonic() + SETTLE_S
        settled_at: float | None = None
        while True:
            events += self.events.take()
            letters += self._dead_letters()
            now = time.monotonic()
            if self._all_ended(published, events, letters):
                settled_at = settled_at or now
                if now - settled_at >= QUIET_S:
                    break
            else:
                settled_at = None
            if now > deadline:
                break
            time.sleep(0.05)
        return events, letters

    def _dead_letters(self) -> list[Letter]:
        channel = self.channel
        got = []
        for queue in WORK_QUEUES:
            while True:
                method, properties, body = channel.basic_get(queue + ".XQ", auto_ack=True)
                if method is None:
                    break
                got.append(Letter(queue, dict(properties.headers or {}), body))
        return got

    @staticmethod
    def _finals(
        published: list[Published], events: list[tuple[str, Any]], letters: list[Letter]
    ) -> tuple[dict[int, list[dict[str, Any]]], list[tuple[str, Any]]]:
        """Each published body's final events (copies of one body on one queue share them), and
        the events that belong to no job."""
        by_mid: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        undecodable_bodies: dict[tuple[str, bytes], list[dict[str, Any]]] = defaultdict(list)
        letters_by_mid = {
            _text(letter.info.get("message_id")): letter for letter in letters if letter.info
        }
        strays = []
        for key, event in events:
            if not isinstance(event, dict):
                strays.append((key, event))
                continue
            if event.get("actor") == UNDECODABLE:
                letter = letters_by_mid.get(str(event.get("message_id")))
                if letter is None:
                    strays.append((key, event))
                else:
                    undecodable_bodies[letter.queue, letter.body].append(event)
            else:
                by_mid[str(event.get("queue")), str(event.get("message_id"))].append(event)
        finals: dict[int, list[dict[str, Any]]] = {}
        seen: set[tuple[str, bytes]] = set()
        known_mids = set()
        for i, item in enumerate(published):
            if item.key in seen:
                continue
            seen.add(item.key)
            got = list(undecodable_bodies.get(item.key, []))
            if item.message_id is not None:
                got += by_mid.get((item.job.queue, item.message_id), [])
                known_mids.add((item.job.queue, item.message_id))
            finals[i] = got
        strays += [
            ("", event) for mid, evs in by_mid.items() if mid not in known_mids for event in evs
        ]
        return finals, strays

    def _all_ended(
        self, published: list[Published], events: list[tuple[str, Any]], letters: list[Letter]
    ) -> bool:
        finals, _ = self._finals(published, events, letters)
        copies = Counter(item.key for item in published)
        return all(len(got) >= copies[published[i].key] for i, got in finals.items())

    # -- the invariants --
    def _check(
        self,
        published: list[Published],
        events: list[tuple[str, Any]],
        letters: list[Letter],
    ) -> Outcome:
        outcome = Outcome()
        finals, strays = self._finals(published, events, letters)
        copies = Counter(item.key for item in published)
        for key, event in strays:
            outcome.add("ends_once", f"an event that belongs to no published job: {key} {event}")
        for key, event in events:
            if isinstance(event, dict) and event.get("outcome") not in FINAL_OUTCOMES:
                outcome.add("ends_once", f"an event with no final outcome: {key} {event}")

        records = self.simulator.messages()
        by_marker = Counter(record["to"].removeprefix("+") for record in records)
        record_ids = {record["id"] for record in records}
        letters_by_mid: dict[tuple[str, str], list[Letter]] = defaultdict(list)
        for letter in letters:
            if letter.info is None:
                outcome.add(
                    "dead_letters",
                    f"a dead letter in {letter.queue}.XQ without {DEAD_LETTER_HEADER}: "
                    f"{letter.body[:200]!r} headers {letter.headers}",
                )
            else:
                letters_by_mid[letter.queue, _text(letter.info.get("message_id"))].append(letter)
        claimed_letters: set[tuple[str, str]] = set()

        for i, got in finals.items():
            item = published[i]
            what = f"{'good ' if item.good else ''}job {item.job.queue} {item.job.note!r} " + (
                f"message_id {item.message_id!r}" if item.message_id else f"{item.body[:120]!r}"
            )
            expected = copies[item.key]
            outcomes = sorted(str(event.get("outcome")) for event in got)
            if len(got) != expected:
                outcome.add(
                    "good_jobs" if item.good and not got else "ends_once",
                    f"{what}: {len(got)} final outcome events {outcomes}, expected {expected}",
                )
            if item.job.kind == "valid":
                wanted = "sent" if item.actor == "send_message" else "done"
                if wanted == "sent":
                    allowed = ["sent"] + ["suppressed"] * (expected - 1)
                else:
                    allowed = ["done"] * expected
                if got and outcomes != sorted(allowed):
                    outcome.add(
                        "good_jobs" if item.good else "ends_once",
                        f"{what}: a valid job ended {outcomes}, expected {sorted(allowed)}; "
                        f"reasons {[e.get('reason') for e in got if e.get('reason')]}",
                    )
            for event in got:
                if event.get("outcome") == "dead_lettered":
                    mid = (item.job.queue, str(event.get("message_id")))
                    mine = letters_by_mid.get(mid, [])
                    claimed_letters.add(mid)
                    if len(mine) != 1:
                        outcome.add("dead_letters", f"{what}: {len(mine)} dead letters for one job")
                    for letter in mine:
                        reason = _text(letter.info.get("reason", "")) if letter.info else ""
                        if not reason.strip() or "no reason recorded" in reason:
                            outcome.add("dead_letters", f"{what}: dead letter reason {reason!r}")
                if event.get("dead_letter") == "gave_up" and "time_limit" not in item.options:
                    outcome.add(
                        "no_pointless_retries",
                        f"{what}: gave up after retries, reason {event.get('reason')!r}",
                    )
                if event.get("outcome") == "sent":
                    verloop_id = event.get("verloop_message_id")
                    if verloop_id not in record_ids:
                        outcome.add(
                            "verloop_ids",
                            f"{what}: sent with Verloop id {verloop_id!r}, which the simulator "
                            "never gave out",
                        )
            if item.marker is not None and by_marker[item.marker] > 1:
                outcome.add(
                    "messaged_once",
                    f"{what}: the recipient got {by_marker[item.marker]} messages",
                )
        for mid, mine in letters_by_mid.items():
            if mid not in claimed_letters:
                outcome.add(
                    "dead_letters",
                    f"{len(mine)} dead letter(s) with no dead_lettered event: message_id "
                    f"{mid!r}, reason {[_text(m.info.get('reason')) for m in mine if m.info]}",
                )
        duplicates = int(self.simulator.stats()["duplicates"]) - self.duplicates_before
        if duplicates:
            outcome.add("messaged_once", f"the simulator counted {duplicates} duplicate sends")

        for queue in (*WORK_QUEUES, *(q + ".DQ" for q in WORK_QUEUES)):
            depth = queue_depth(queue)
            if depth:
                outcome.add("ends_once", f"{depth} job(s) left in {queue}")

        worker = self.start_worker.worker_of(self.app)
        dead = [t.name for t in worker.workers if not t.is_alive()]
        dead += [t.name for t in worker.consumers.values() if not t.is_alive()]
        if dead or len(worker.workers) != THREADS:
            outcome.add(
                "threads", f"worker threads dead: {dead} ({len(worker.workers)} of {THREADS})"
            )
        return outcome

    # -- after a failure --
    def _remember(self, jobs: list[Job], outcome: Outcome) -> None:
        size = (len(jobs), sum(len(job.body) for job in jobs))
        for name, texts in outcome.violations.items():
            if not texts:
                continue
            known = self.smallest_failures.get(name)
            if known is None or size < (len(known[0]), sum(len(j.body) for j in known[0])):
                self.smallest_failures[name] = (jobs, f"{name}: {texts[0]}")

    def reset(self) -> None:
        """Start over after a broken invariant, so the next example is judged on its own: a
        new worker, empty queues, an empty Redis database (the old worker is stopped first:
        its relay keeps state there)."""
        self.start_worker.stop(self.app)
        channel = self.channel
        for queue in QUEUES:
            channel.queue_delete(queue)
        redis_client(REDIS_URL).flushdb()
        self.events.take()
        self.app = self.start_worker(threads=THREADS, as_process=True)

    def write_found(self, folder: Path) -> list[Path]:
        """Write the smallest failing batch of each broken invariant as a corpus case."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, (jobs, note) in self.smallest_failures.items():
            path = folder / f"found-{name}-{int(time.time())}.json"
            path.write_text(case_json(note.splitlines()[0][:300], jobs) + "\n", encoding="utf-8")
            written.append(path)
        return written
