"""The simulator stays apart from the runtime: outside ``worker/sandbox/`` only the command
module that runs it (``worker/commands/sandbox.py``) may import ``worker.sandbox``."""

from __future__ import annotations

import ast
from pathlib import Path

import worker

PACKAGE = Path(worker.__file__).parent
SIMULATOR = "worker.sandbox"
#: The one module outside the simulator's package allowed to import it.
ALLOWED = PACKAGE / "commands" / "sandbox.py"


def _module_name(path: Path) -> str:
    """``worker.x.y`` (a package's ``__init__`` keeps its name: relative imports count from
    the package itself)."""
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def imported_modules(source: str, module: str) -> set[str]:
    """Every module ``source`` imports, anywhere in it (inside functions too), as absolute
    names; ``module`` is its own name, to resolve relative imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _imports_simulator(names: set[str]) -> bool:
    return any(name == SIMULATOR or name.startswith(SIMULATOR + ".") for name in names)


def offenders(package: Path = PACKAGE) -> list[str]:
    """Modules outside the simulator (and the allowed command) that import it."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        if (package / "sandbox") in path.parents or path == ALLOWED:
            continue
        names = imported_modules(path.read_text(encoding="utf-8"), _module_name(path))
        if _imports_simulator(names):
            bad.append(str(path.relative_to(package.parent)))
    return bad


def test_nothing_outside_the_simulator_and_its_command_imports_it() -> None:
    assert offenders() == []


def test_the_allowed_command_is_the_one_that_imports_it() -> None:
    # If the sandbox command moved, ALLOWED would silently allow nothing.
    names = imported_modules(ALLOWED.read_text(encoding="utf-8"), _module_name(ALLOWED))
    assert _imports_simulator(names)


def test_every_form_of_import_is_seen() -> None:
    for source in (
        "import worker.sandbox",
        "import worker.sandbox.faults as f",
        "from worker.sandbox import Faults",
        "from worker import sandbox",
        "from worker.sandbox.faults import Faults",
        "def later():\n    from worker.sandbox.server import serve\n",
        "from ..sandbox import faults",
        "from .. import sandbox",
    ):
        assert _imports_simulator(imported_modules(source, "worker.runtime.app")), source
    for source in ("import worker.sandboxed", "from worker.runtime import sandbox_free"):
        assert not _imports_simulator(imported_modules(source, "worker.runtime.app")), source
