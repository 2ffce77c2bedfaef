"""``make profile``: where one send's CPU goes in the worker, step by step.

Runs the send path as ``make bench`` does (the simulator at 20 ms, a backlog on ``verloop.send``,
the limiter on but not binding), with one worker process, samples that process with py-spy
while it drains the backlog (only samples holding the GIL: CPU, not waiting), and sorts every
sample into the step of the send it belongs to, by the innermost frame of ours on its stack:

=================  ==========================================================================
step               frames
=================  ==========================================================================
decode, validate   the envelope's checks, the job's model, the actor's prologue
campaign, token    the campaign gate and the phone token lookup
limiter            waiting for the number's slot (``send/gate.py``, ``limits/``)
ledger claim       the claim before the call
Verloop call       the HTTP call (httpx, httpcore, h11, ssl) and its answer's classification
record, event      the finisher: ledger record, campaign counter, status link, event
log line           the job's log line (structlog and its renderer)
metrics            the job's metrics (prometheus-client)
outcome, retries   the rest of the outcome middleware (retries, deferrals, dead letters)
events relay       the outbox relay thread publishing events
dramatiq, pika     consuming, acknowledging and dispatching (no frame of ours)
=================  ==========================================================================

It does the same for the naive actor of ``make bench`` (``bench/naive.py``), and prints each
step's CPU per send for both (the step's share of the samples times the process's CPU per
send, measured from /proc over the same span), largest difference first: where our extra CPU
per send goes. Needs py-spy (a dev
dependency) and the right to trace the worker (root, or ``ptrace_scope`` 0, or the container's
``SYS_PTRACE``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    AMQP_URL,
    BIN,
    RESULTS,
    BenchError,
    CpuSample,
    Simulator,
    clear_queues,
    clear_redis,
    cpu_between,
    ensure_vhost,
    phone_token,
    process_cpu_s,
    publish_backlog,
    simulator,
    system_token,
    verloop_worker,
    worker,
    worker_env,
)
from bench.send_path import PHONE, backlog

#: (step, what a frame's file or function must contain), tried from the innermost frame out;
#: the first frame that matches any names the sample's step.
STEPS: Sequence[tuple[str, tuple[str, ...]]] = (
    ("events relay", ("worker/finish/outbox.py",)),
    ("record, event", ("worker/finish/finish.py", "worker/receipts/links.py")),
    ("log line", ("structlog/", "worker/observability/logging.py")),
    ("metrics", ("prometheus_client/", "worker/observability/")),
    (
        "Verloop call",
        (
            "worker/verloop/client.py",
            "worker/verloop/transport.py",
            "worker/verloop/classify.py",
            "bench/naive.py",
        ),
    ),
    ("ledger claim", ("worker/send/ledger.py",)),
    ("limiter", ("worker/send/gate.py", "worker/limits/")),
    ("campaign, token", ("worker/campaigns/", "worker/verloop/tokens.py", "token_cache.py")),
    ("outcome, retries", ("worker/finish/",)),
    (
        "decode, validate",
        ("worker/jobs/", "worker/runtime/actors.py", "worker/runtime/broker.py", "pydantic"),
    ),
    ("send steps", ("worker/send/",)),
    ("worker, other", ("worker/",)),
)
OTHER = "dramatiq, pika"


def classify(stack: Sequence[str]) -> str:
    """The step of one sample, from its frames (outermost first, as py-spy writes them)."""
    for frame in reversed(stack):
        for step, marks in STEPS:
            if any(mark in frame for mark in marks):
                return step
    return OTHER


def read_raw(path: Path) -> Counter[str]:
    """Samples per step from py-spy's ``--format raw`` output (``frame;frame;... count``)."""
    steps: Counter[str] = Counter()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            steps[classify(stack.split(";"))] += int(count)
    return steps


def _busiest(pids: Sequence[int], seconds: float = 1.0) -> int:
    """The pid among ``pids`` that used the most CPU over ``seconds`` (the worker process)."""
    before = process_cpu_s(pids)
    time.sleep(seconds)
    after = process_cpu_s(pids)
    return max(before.keys() & after.keys(), key=lambda pid: after[pid] - before[pid])


@dataclass
class Profile:
    """One worker's samples by step, and its CPU per send over the same span."""

    steps: Counter[str]
    per_send_ms: float
    sends_per_s: float

    def ms(self, step: str) -> float:
        total = sum(self.steps.values())
        return self.per_send_ms * self.steps[step] / total if total else 0.0


def _profile(
    spy: str, sim: Simulator, command: list[str], env: dict[str, str], name: str, args: Any
) -> Profile:
    """Drain a backlog with ``command`` and sample its busiest process for ``args.seconds``."""
    raw = RESULTS / f"profile-{name}.raw"
    http = httpx.Client(base_url=sim.url, timeout=10)
    http.post("/admin/reset").raise_for_status()
    http.put("/admin/faults", json={"latency_ms": args.latency_ms}).raise_for_status()
    try:
        with worker(command, env, RESULTS / f"profile-{name}.log") as proc:
            deadline = time.monotonic() + 120
            while http.get("/admin/stats").json()["sent"] < args.jobs * 0.1:
                proc.check()
                if time.monotonic() > deadline:
                    raise BenchError(f"worker stalled; see {proc.log}")
                time.sleep(0.05)
            target = _busiest(proc.pids())
            first = CpuSample.take(proc, sim)
            sent_before = http.get("/admin/stats").json()["sent"]
            subprocess.run(  # our own worker
                [
                    spy,
                    "record",
                    "--gil",
                    "--nonblocking",
                    "--pid",
                    str(target),
                    "--duration",
                    str(args.seconds),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
                check=True,
                capture_output=True,
            )
            last = CpuSample.take(proc, sim)
            sends = http.get("/admin/stats").json()["sent"] - sent_before
    finally:
        http.close()
    if sends <= 0:
        raise BenchError("no sends while profiling; is the backlog big enough? (--jobs)")
    elapsed = last.t - first.t
    per_send_ms = 1000 * cpu_between(first, last)["worker"] * elapsed / sends
    return Profile(read_raw(raw), per_send_ms, sends / elapsed)


def run(args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: `make install` installs the dev tools, py-spy included")
    RESULTS.mkdir(exist_ok=True)
    ensure_vhost()
    clear_redis()
    pool = ["--processes", "1", "--threads", str(args.threads)]
    profiles: dict[str, Profile] = {}
    with simulator(args.latency_ms) as sim:
        system = system_token(sim.url)
        try:
            publish_backlog({"bench.naive": backlog("naive_send", "bench.naive", args.jobs)})
            naive_env = worker_env(sim.url, system, metrics=False) | {
                "BENCH_AMQP_URL": AMQP_URL,
                "BENCH_VERLOOP_URL": sim.url,
                "BENCH_PHONE_TOKEN": phone_token(sim.url, system, PHONE),
            }
            naive_command = [str(BIN / "dramatiq"), "bench.naive", *pool, "--skip-logging"]
            profiles["naive"] = _profile(spy, sim, naive_command, naive_env, "naive", args)
            publish_backlog({"verloop.send": backlog("send_message", "verloop.send", args.jobs)})
            ours_env = worker_env(sim.url, system, RATE_LIMIT_PER_NUMBER="10000")
            ours_command = verloop_worker(1, args.threads)
            profiles["ours"] = _profile(spy, sim, ours_command, ours_env, "ours", args)
        finally:
            clear_queues()
    naive, ours = profiles["naive"], profiles["ours"]
    print(
        f"one worker process x {args.threads} threads each, simulator at {args.latency_ms:g} ms; "
        f"CPU per send of all the worker's processes: naive {naive.per_send_ms:.3f} ms "
        f"({naive.sends_per_s:.0f} sends/s), ours {ours.per_send_ms:.3f} ms "
        f"({ours.sends_per_s:.0f} sends/s), ratio {ours.per_send_ms / naive.per_send_ms:.2f}"
    )
    print(f"  {'step':<18} {'naive ms':>9} {'ours ms':>9} {'ours - naive':>13}")
    steps = sorted(
        set(naive.steps) | set(ours.steps), key=lambda step: -(ours.ms(step) - naive.ms(step))
    )
    for step in steps:
        print(
            f"  {step:<18} {naive.ms(step):9.3f} {ours.ms(step):9.3f} "
            f"{ours.ms(step) - naive.ms(step):+13.3f}"
        )
    print(f"raw stacks: {RESULTS}/profile-{{naive,ours}}.raw (py-spy's raw format)")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=8000, help="backlog size, each worker")
    parser.add_argument("--seconds", type=int, default=12, help="how long to sample each")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument(
        "--rate", type=int, default=250, help="samples per second (more: finer, and slower)"
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
