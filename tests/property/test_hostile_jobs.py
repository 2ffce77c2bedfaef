"""A job can only ever hurt itself: generated batches of valid, nearly valid and hostile jobs
through a real worker, the real simulator and Redis (see harness.py for the invariants), and
every case found so far replayed from corpus/."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given

from tests.integration.conftest import Simulator, WorkerStarter
from tests.property.harness import CORPUS_DIR, Harness, load_case
from tests.property.strategies import batches

pytestmark = pytest.mark.integration

#: Where `make fuzz` writes the smallest failing batch of each broken invariant.
FOUND_DIR = Path(os.environ.get("FUZZ_FOUND_DIR", ".hypothesis/found"))
FUZZ_MINUTES = float(os.environ.get("FUZZ_MINUTES") or 0)


class _TimeUp(BaseException):
    """FUZZ_MINUTES ran out (a BaseException: Hypothesis does not take it for a failure)."""


#: CI's examples take under a minute (a few seconds more each with a short eta or a slow
#: answer in them), above the usual 120 s on a busy machine; `make fuzz` runs as long as asked.
FUZZ_TIMEOUT_S = 0 if os.environ.get("FUZZ") else 240


@pytest.mark.timeout(FUZZ_TIMEOUT_S)
def test_no_job_hurts_another(simulator: Simulator, start_worker: WorkerStarter) -> None:
    harness = Harness(simulator, start_worker)
    ends = time.monotonic() + FUZZ_MINUTES * 60 if FUZZ_MINUTES else None

    # Defined inside the test so the worker and simulator are shared by every example.
    @given(batches())
    def batch_hurts_nobody(batch: list) -> None:
        if ends is not None and time.monotonic() > ends:
            raise _TimeUp
        harness.check(batch)

    try:
        batch_hurts_nobody()
    except _TimeUp:
        pass
    finally:
        written = harness.write_found(FOUND_DIR) if harness.smallest_failures else []
        harness.close()
        if written:
            print("smallest failing batches written to:", *map(str, written), sep="\n  ")
    assert not harness.smallest_failures, "see the failing batches above"


def _corpus() -> list[Path]:
    return sorted(CORPUS_DIR.glob("*.json"))


# A case that still fails waits out the settle bound (8 s): a handful of them exceed 120 s.
@pytest.mark.timeout(240)
def test_the_corpus_of_cases_found_so_far(
    simulator: Simulator, start_worker: WorkerStarter
) -> None:
    """Every case in corpus/, one after another on one worker; all failures reported."""
    cases = _corpus()
    assert cases, f"no corpus cases in {CORPUS_DIR}"
    harness = Harness(simulator, start_worker)
    broken = []
    try:
        for path in cases:
            note, jobs = load_case(path)
            outcome = harness.run(jobs)
            if outcome.violations:
                broken.append(f"{path.name} ({note}):\n{outcome.describe()}")
    finally:
        harness.close()
    assert not broken, "\n".join(broken)
