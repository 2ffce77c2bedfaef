"""The property suite runs on the integration tests' services and fixtures, with Hypothesis
profiles: ``ci`` (the default, a bounded number of examples, no shrinking) and ``fuzz``
(``make fuzz``: as many examples or minutes as asked, failures shrunk)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

from tests.integration.conftest import (  # noqa: F401 - fixtures, found by pytest by name
    _services_answer,
    clean_state,
    make_settings,
    simulator,
    start_worker,
)

#: Examples per CI run: each publishes a batch and waits for its outcomes (about 1-2 s).
CI_EXAMPLES = 40

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES") or CI_EXAMPLES),
    deadline=None,
    # A failing example waits out the settle bound, and each shrinking step would too: CI
    # reports the failure as found; `make fuzz` shrinks it.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
settings.register_profile(
    "fuzz",
    # FUZZ_MINUTES bounds the run by time instead (tests/property/test_hostile_jobs.py).
    max_examples=int(
        os.environ.get("FUZZ_EXAMPLES") or (1_000_000 if os.environ.get("FUZZ_MINUTES") else 1000)
    ),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile("fuzz" if os.environ.get("FUZZ") else "ci")
