"""DramatiqMetrics counts exactly what dramatiq's own Prometheus middleware counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dramatiq


def _messages() -> list[dramatiq.Message[Any]]:
    pairs = [("verloop.send", "send_message")] * 3 + [
        ("verloop.campaign", "send_message"),
        ("verloop.manage", "list_clients"),
    ]
    return [
        dramatiq.Message(
            queue_name=queue, actor_name=actor, args=(), kwargs={}, options={}, message_id=f"m{n}"
        )
        for n, (queue, actor) in enumerate(pairs)
    ]


def _samples(middleware: Any) -> dict[str, float]:
    metrics = [
        middleware.total_messages,
        middleware.total_errored_messages,
        middleware.inprogress_messages,
        middleware.inprogress_delayed_messages,
        middleware.message_durations,
    ]
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for metric in metrics
        for family in metric.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def scenario(ours: bool) -> None:
    """One middleware through the messages; prints its series. Run in a process of its own:
    dramatiq's middleware sets prometheus-client's multiprocess folder for good."""
    from dramatiq.middleware.prometheus import Prometheus

    from worker.observability.dramatiq_metrics import DramatiqMetrics

    middleware = DramatiqMetrics() if ours else Prometheus()
    middleware.after_process_boot(None)
    messages = _messages()
    middleware.before_delay_message(None, messages[4])
    for n, message in enumerate(messages):
        middleware.before_process_message(None, message)
        error = ValueError("boom") if n % 2 else None
        middleware.after_process_message(None, message, exception=error)
    middleware.after_skip_message(None, messages[0])
    print(json.dumps(_samples(middleware)))


def _series(tmp_path: Path, ours: bool) -> dict[str, float]:
    folder = tmp_path / str(ours)
    folder.mkdir()
    env = os.environ | {
        "dramatiq_prom_db": str(folder),
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    code = f"from tests.unit.test_dramatiq_metrics import scenario; scenario({ours})"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    series: dict[str, float] = json.loads(done.stdout)
    return series


def test_the_same_messages_give_the_same_series_and_counts(tmp_path: Path) -> None:
    theirs, ours = _series(tmp_path, ours=False), _series(tmp_path, ours=True)
    assert ours == theirs
    sends = "[('actor_name', 'send_message'), ('queue_name', 'verloop.send')]"
    assert ours["dramatiq_messages_total" + sends] == 4  # three, and the skipped one again
    assert ours["dramatiq_message_errors_total" + sends] == 1
    assert ours["dramatiq_message_duration_milliseconds_count" + sends] == 4
    assert ours["dramatiq_messages_inprogress" + sends] == -1  # dramatiq's count of a skip
