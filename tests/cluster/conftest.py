"""The rehearsals use the integration tests' services check, clean state and simulator."""

from tests.integration.conftest import _services_answer, clean_state, simulator

__all__ = ["_services_answer", "clean_state", "simulator"]
