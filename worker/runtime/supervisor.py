"""``python -m worker.runtime.supervisor DRAMATIQ_ARGS``: dramatiq's process manager.

``verloop-worker run`` prepares the environment and starts this module in a fresh interpreter
(dramatiq and prometheus-client read it when first imported); dramatiq's command line then
forks the worker processes (each calls :func:`worker.runtime.app.boot`) and the metrics
exposition process. All of them stop when ``run`` dies (:mod:`worker.runtime.lifeline`).
"""

from __future__ import annotations

import os
import sys
from typing import Literal, cast

from worker.observability.logging import configure_logging
from worker.runtime.lifeline import children_die_with_this_process, follow_parent_from_environment


def main(argv: list[str]) -> int:
    """Run dramatiq's CLI with ``argv``; return its exit code."""
    # This process stops when `verloop-worker run` dies, and the processes dramatiq forks stop
    # when this one dies (see worker.runtime.lifeline): no orphan keeps consuming or holds the port.
    follow_parent_from_environment()
    children_die_with_this_process()
    fmt = cast(Literal["auto", "json", "console"], os.environ.get("LOG_FORMAT", "json"))
    configure_logging(fmt, os.environ.get("LOG_LEVEL", "INFO"))
    # Imported only now, with the environment in place (see the module docstring).
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    # dramatiq's CLI is not annotated; these two calls are its documented entry points.
    parsed = make_argument_parser().parse_args(argv)  # type: ignore[no-untyped-call]
    return int(dramatiq_main(parsed) or 0)  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
