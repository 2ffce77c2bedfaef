"""worker.runtime.lifeline on real processes: a child stops, once, when its parent dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: A parent with a second thread (as dramatiq's process manager has) forks a child from its
#: main thread, then waits to be killed. The child records every SIGTERM it gets.
PARENT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from worker.runtime.lifeline import children_die_with_this_process, watch_parent

    mode, record = sys.argv[1], sys.argv[2]
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    if mode == "prctl":
        children_die_with_this_process()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        def on_term(signum, frame):
            with open(record, "a") as f:
                f.write("TERM\\n")
        signal.signal(signal.SIGTERM, on_term)
        if mode == "watch":
            watch_parent(parent, poll_s=0.05)
        print(os.getpid(), flush=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not os.path.exists(record):
            time.sleep(0.01)
        time.sleep(1.0)  # long enough for a second signal to arrive, if one were coming
        os._exit(0)
    time.sleep(60)
    """
)


def _run_and_kill_parent(mode: str, tmp_path: Path) -> tuple[list[str], int]:
    record = tmp_path / "signals"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, mode, str(record)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    with parent.stdout:
        child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its parent by 10 s"
        time.sleep(0.05)
    return (record.read_text().splitlines() if record.exists() else []), child


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_forked_child_gets_exactly_one_sigterm_when_its_parent_is_killed(
    tmp_path: Path,
) -> None:
    """The kernel signals a child at each step of a dying multi-threaded parent; dramatiq
    would take a second SIGTERM as "kill now". The child gets one."""
    signals, _ = _run_and_kill_parent("prctl", tmp_path)
    assert signals == ["TERM"]


def test_the_fallback_watch_sends_sigterm_once_the_parent_is_gone(tmp_path: Path) -> None:
    """Where prctl is missing, a thread watching the parent pid stops the child."""
    signals, _ = _run_and_kill_parent("watch", tmp_path)
    assert signals == ["TERM"]


def test_a_parent_that_died_before_the_child_asked_to_follow_it_stops_the_child_at_once() -> None:
    """The race: told to follow a parent that is no longer its parent, the child stops."""
    script = textwrap.dedent(
        """
        import os, time
        from worker.runtime.lifeline import die_with_parent
        die_with_parent(os.getppid() + 1)  # not the parent: as if it had died already
        time.sleep(30)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=20,
    )
    assert child.returncode == -signal.SIGTERM
