"""Verloop simulator ("sandbox"): an HTTP server imitating Verloop's WhatsApp partner API.

Used by integration tests (:class:`SandboxServer`), ``make run`` demos and
benchmarks (``python -m worker.sandbox``).  Besides the partner API it serves
``/admin/*`` endpoints to inspect recorded sends and inject faults, and posts WhatsApp status
webhooks for accepted sends when given a URL (:class:`StatusCallbacks`).
"""

from worker.sandbox.app import create_app
from worker.sandbox.config import DEFAULT_CLIENTS, SandboxConfig
from worker.sandbox.deployment import Sandbox
from worker.sandbox.faults import Faults
from worker.sandbox.script import ScriptedResponse
from worker.sandbox.server import SandboxServer, serve
from worker.sandbox.statuses import PhoneNumber, StatusCallbacks
from worker.sandbox.validation import FaultConfigError

__all__ = [
    "DEFAULT_CLIENTS",
    "FaultConfigError",
    "Faults",
    "PhoneNumber",
    "Sandbox",
    "SandboxConfig",
    "SandboxServer",
    "ScriptedResponse",
    "StatusCallbacks",
    "create_app",
    "serve",
]
