"""Whether a worker process still has all its threads: watched from inside, read by probes.

A dramatiq worker thread that dies is not replaced, and nothing else notices. :class:`ThreadWatch`
checks the threads every second and reports in metrics, in the log (once per dead thread) and in
a health file per process (``<pid>.json`` in :func:`health_dir`); ``verloop-worker check --live``
fails on a dead thread, a job stuck past ``JOB_STUCK_AFTER_S`` or a stale file, so the process
is restarted.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from dramatiq.middleware import Middleware

from worker.observability.metrics import Metrics
from worker.settings import Settings

__all__ = ["HEALTH_DIR_ENV", "ThreadWatch", "health_dir", "read_health"]

#: Set by ``verloop-worker run`` for its worker processes: where they write their health files.
HEALTH_DIR_ENV = "VERLOOP_WORKER_HEALTH_DIR"
#: How often the watch looks at the threads and writes the health file.
INTERVAL_S = 1.0
#: A health file older than this belongs to a process that stopped reporting.
STALE_AFTER_S = 30.0

_log = structlog.get_logger()


def health_dir(settings: Settings) -> Path:
    """The folder of an instance's health files, beside its metrics files."""
    return settings.instance_dir("health")


class ThreadWatch(Middleware):
    """Watches the worker threads of one process (see the module docstring)."""

    def __init__(
        self,
        *,
        stuck_after_s: float,
        metrics: Metrics | None = None,
        directory: Path | None = None,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.stuck_after_s = stuck_after_s
        self.metrics = metrics
        self.directory = directory
        self.interval_s = interval_s
        self._worker: Any = None
        self._busy_since: dict[int, float] = {}
        self._reported_dead: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- dramatiq's hooks ------------------------------------------------------------------------
    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self._worker = worker
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="verloop-thread-watch", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        # Threads that stop from here on are stopping on purpose.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s * 2)
            self._thread = None
        if self.directory is not None:
            with contextlib.suppress(OSError):
                (self.directory / f"{os.getpid()}.json").unlink()

    def before_process_message(self, broker: Any, message: Any) -> None:
        self._busy_since[threading.get_ident()] = time.monotonic()

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        self._busy_since.pop(threading.get_ident(), None)

    after_skip_message = after_process_message

    # --- the watch -------------------------------------------------------------------------------
    def check(self) -> ThreadCount:
        """Look at the threads now (and report a thread that died since the last look)."""
        worker = self._worker
        threads = list(worker.workers) if worker is not None else []
        expected = int(worker.worker_threads) if worker is not None else 0
        dead = [t for t in threads if not t.is_alive()]
        for thread in dead:
            self._busy_since.pop(thread.ident or 0, None)
            if thread.ident not in self._reported_dead:
                self._reported_dead.add(thread.ident or 0)
                if self.metrics is not None:
                    self.metrics.thread_deaths.inc()
                _log.critical(
                    "a worker thread died; this process runs with fewer threads until it is "
                    "restarted (`verloop-worker check --live` fails)",
                    thread=thread.name,
                    alive=len(threads) - len(dead),
                    expected=expected,
                )
        now = time.monotonic()
        stuck = sum(
            1 for since in list(self._busy_since.values()) if now - since > self.stuck_after_s
        )
        count = ThreadCount(expected, len(threads) - len(dead), len(dead), stuck)
        if self.metrics is not None:
            self.metrics.observe_threads(count.expected, count.alive, count.dead, count.stuck)
        return count

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                count = self.check()
                if self.directory is not None:
                    _write(self.directory, count)
            except Exception:  # noqa: BLE001 - the watch must outlive its own failures
                _log.exception("the worker thread watch failed; trying again")


@dataclass(frozen=True, slots=True)
class ThreadCount:
    """One look at a process's worker threads."""

    expected: int
    alive: int
    dead: int
    stuck: int

    @property
    def healthy(self) -> bool:
        return self.dead == 0 and self.stuck == 0 and self.alive >= self.expected


def _write(directory: Path, count: ThreadCount) -> None:
    """Replace this process's health file in one step (a reader never sees half of it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{os.getpid()}.json"
    partial = path.with_suffix(".tmp")
    partial.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "at": time.time(),
                "expected": count.expected,
                "alive": count.alive,
                "dead": count.dead,
                "stuck": count.stuck,
            }
        ),
        encoding="utf-8",
    )
    os.replace(partial, path)


def read_health(directory: Path, now: float | None = None) -> tuple[int, list[str]]:
    """(how many live processes reported, the problems found) from an instance's health files.

    Files of processes that no longer exist are skipped (an instance stopped uncleanly).
    """
    now = time.time() if now is None else now
    reporting = 0
    problems: list[str] = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            pid = int(report["pid"])
            count = ThreadCount(
                int(report["expected"]),
                int(report["alive"]),
                int(report["dead"]),
                int(report["stuck"]),
            )
            age = now - float(report["at"])
        except (OSError, ValueError, KeyError, TypeError):
            problems.append(f"{path.name}: unreadable health file")
            continue
        if not _exists(pid):
            continue
        reporting += 1
        if age > STALE_AFTER_S:
            problems.append(f"worker process {pid} has not reported for {age:.0f} s")
        elif count.dead:
            problems.append(f"worker process {pid}: {count.dead} of {count.expected} threads died")
        elif count.stuck:
            problems.append(
                f"worker process {pid}: {count.stuck} thread(s) stuck in one job for over "
                "JOB_STUCK_AFTER_S"
            )
        elif not count.healthy:
            problems.append(f"worker process {pid}: {count.alive} of {count.expected} threads")
    return reporting, problems


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
