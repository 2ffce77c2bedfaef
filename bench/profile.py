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

It prints each step's share of the process's CPU and its CPU per send (the share times the
process's CPU per send, measured from /proc over the same span). Needs py-spy (a dev
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
from pathlib import Path

import httpx

from bench.common import (
    BIN,
    RESULTS,
    BenchError,
    CpuSample,
    clear_queues,
    clear_redis,
    cpu_between,
    ensure_vhost,
    process_cpu_s,
    publish_backlog,
    simulator,
    system_token,
    verloop_worker,
    worker,
    worker_env,
)
from bench.send_path import backlog

#: (step, what a frame's file or function must contain), tried from the innermost frame out;
#: the first frame that matches any names the sample's step.
STEPS: Sequence[tuple[str, tuple[str, ...]]] = (
    ("events relay", ("worker/finish/outbox.py",)),
    ("record, event", ("worker/finish/finish.py", "worker/receipts/links.py")),
    ("log line", ("structlog/", "worker/observability/logging.py")),
    ("metrics", ("prometheus_client/", "worker/observability/")),
    ("Verloop call", ("worker/verloop/client.py", "worker/verloop/classify.py")),
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


def run(args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: `make install` installs the dev tools, py-spy included")
    RESULTS.mkdir(exist_ok=True)
    ensure_vhost()
    clear_redis()
    publish_backlog({"verloop.send": backlog("send_message", "verloop.send", args.jobs)})
    raw = RESULTS / "profile.raw"
    with simulator(args.latency_ms) as sim:
        http = httpx.Client(base_url=sim.url, timeout=10)
        http.put("/admin/faults", json={"latency_ms": args.latency_ms}).raise_for_status()
        env = worker_env(sim.url, system_token(sim.url), RATE_LIMIT_PER_NUMBER="10000")
        try:
            with worker(verloop_worker(1, args.threads), env, RESULTS / "profile.log") as proc:
                deadline = time.monotonic() + 120
                while http.get("/admin/stats").json()["sent"] < args.jobs * 0.1:
                    proc.check()
                    if time.monotonic() > deadline:
                        raise BenchError(f"worker stalled; see {proc.log}")
                    time.sleep(0.05)
                target = _busiest(proc.pids())
                first = CpuSample.take(proc, sim)
                sent_before = http.get("/admin/stats").json()["sent"]
                subprocess.run(
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
                        "250",
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
            clear_queues()
    if sends <= 0:
        raise BenchError("no sends while profiling; is the backlog big enough? (--jobs)")
    elapsed = last.t - first.t
    cpu = cpu_between(first, last)
    per_send_ms = 1000 * cpu["worker"] * elapsed / sends
    steps = read_raw(raw)
    total = sum(steps.values())
    print(
        f"one worker process x {args.threads} threads, {sends} sends in {elapsed:.1f} s "
        f"({sends / elapsed:.0f}/s); worker CPU per send {per_send_ms:.3f} ms "
        f"(all its processes); {total} samples holding the GIL"
    )
    print(f"  {'step':<18} {'share':>6} {'CPU ms/send':>12}")
    for step, count in steps.most_common():
        share = count / total
        print(f"  {step:<18} {share:6.1%} {share * per_send_ms:12.3f}")
    print(f"raw stacks: {raw} (py-spy's raw format, for flame graphs)")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=6000, help="backlog size")
    parser.add_argument("--seconds", type=int, default=6, help="how long to sample")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
