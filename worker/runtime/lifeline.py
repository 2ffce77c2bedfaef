"""A worker's processes die with ``verloop-worker run``, however it dies (SIGKILL included), so
no orphan keeps consuming jobs or holding the metrics port.

On Linux ``prctl(PR_SET_PDEATHSIG)`` sends :data:`PARENT_DEATH_SIGNAL` (SIGUSR2: dramatiq takes a
second SIGTERM as "kill now"), whose handler sends one SIGTERM once the parent pid has really
changed; elsewhere a daemon thread watches ``os.getppid()``. SIGTERM lets in-flight jobs finish.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = [
    "PARENT_DEATH_SIGNAL",
    "PARENT_PID_VARIABLE",
    "children_die_with_this_process",
    "die_with_parent",
    "follow_parent_from_environment",
    "watch_parent",
]

#: Set by ``run`` in the environment of the processes it starts: its own pid.
PARENT_PID_VARIABLE = "VERLOOP_WORKER_PARENT_PID"
#: What the kernel sends when the parent dies (see the module docstring).
PARENT_DEATH_SIGNAL = signal.SIGUSR2 if hasattr(signal, "SIGUSR2") else signal.SIGTERM

_PR_SET_PDEATHSIG = 1
_expected_parent = 0
_stopping = False
_forking_parent = 0


def _set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return bool(prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)


def _stop_if_orphaned(*_: object) -> None:
    global _stopping
    if os.getppid() != _expected_parent and not _stopping:
        _stopping = True
        os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent(parent_pid: int) -> None:
    """Send this process one SIGTERM when ``parent_pid``, its parent, dies.

    Call it from the main thread (it installs a signal handler).
    """
    global _expected_parent, _stopping
    _expected_parent, _stopping = parent_pid, False
    signal.signal(PARENT_DEATH_SIGNAL, _stop_if_orphaned)
    if not _set_parent_death_signal(PARENT_DEATH_SIGNAL):
        watch_parent(parent_pid)
    _stop_if_orphaned()  # the parent may have died before the kernel was asked to watch it


def watch_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Without ``prctl``: a daemon thread sends this process SIGTERM once its parent is no
    longer ``parent_pid`` (an orphan is adopted by another process)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def follow_parent_from_environment() -> None:
    """:func:`die_with_parent` for the parent named in :data:`PARENT_PID_VARIABLE`, if set.

    The variable is removed, so a process this one starts does not take it for its own.
    """
    parent = os.environ.pop(PARENT_PID_VARIABLE, "")
    if parent.isdigit():
        die_with_parent(int(parent))


def _remember_parent() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _follow_forking_parent() -> None:
    die_with_parent(_forking_parent)


def children_die_with_this_process() -> None:
    """Every process forked from now on (``os.fork``, multiprocessing's fork start method)
    gets one SIGTERM when this process dies; its own forks, when it dies, and so on.

    The forking thread must be the main thread of the process (as in dramatiq's process
    manager): the child's handler is installed there, and the kernel watches that thread.
    """
    os.register_at_fork(before=_remember_parent, after_in_child=_follow_forking_parent)
