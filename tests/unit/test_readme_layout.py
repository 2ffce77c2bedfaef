"""README.md's layout map and worker/__init__.py's short map name every module there is.

The map is the list between ``<!-- layout:begin -->`` and ``<!-- layout:end -->`` in README.md.
Each item starts with a path in backticks (```worker/send/```); the other backticked names in
the item that end in ``.py`` or ``/`` are relative to it (```actors.py```), unless they start
with a top-level folder of the repository (```tests/unit/```). A new module fails this test
until it has its line in the map, and a module that is gone fails it until its line goes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import worker

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BEGIN = "<!-- layout:begin"
END = "<!-- layout:end"
_BACKTICKED = re.compile(r"`([^`\s]+)`")
_PATH = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/?")


def layout_section(readme: str) -> str:
    """The text between the layout markers; fails the test when they are missing."""
    begin, end = readme.find(BEGIN), readme.find(END)
    if begin < 0 or end < begin:
        pytest.fail(f"README.md has no layout map between {BEGIN} --> and {END} -->")
    return readme[readme.index("\n", begin) + 1 : end]


def map_items(section: str) -> list[str]:
    """The list items of the map, continuation lines (indented) joined to their item."""
    items: list[str] = []
    for line in section.splitlines():
        if not line.strip():
            continue
        if line.startswith("- "):
            items.append(line[2:])
        elif line.startswith(" ") and items:
            items[-1] += " " + line.strip()
        else:
            pytest.fail(f"the layout map is a list, one item per folder; not an item: {line!r}")
    return items


def named_paths(section: str, root: Path) -> set[str]:
    """Every path the map names, relative to the repository root (folders end in ``/``)."""
    top_level = {p.name for p in root.iterdir() if p.is_dir()}
    paths: set[str] = set()
    for item in map_items(section):
        names = [n for n in _BACKTICKED.findall(item) if _PATH.fullmatch(n)]
        if not names or names[0].split("/")[0] not in top_level:
            pytest.fail(f"a layout item must start with a path in backticks: {item[:60]!r}")
        head = names[0] if names[0].endswith("/") else names[0].rsplit("/", 1)[0] + "/"
        paths.add(names[0])
        for name in names[1:]:
            if not name.endswith((".py", "/")):
                continue  # a file of another kind, a command or a value: not checked
            paths.add(name if name.split("/")[0] in top_level else head + name)
    return paths


def package_paths(root: Path) -> set[str]:
    """Every module (``*.py`` but ``__init__.py``) and every folder of Python code in worker/."""
    found: set[str] = set()
    for path in (root / "worker").rglob("*.py"):
        relative = path.relative_to(root)
        if "__pycache__" in relative.parts:
            continue
        if path.name != "__init__.py":
            found.add(relative.as_posix())
        found.update(parent.as_posix() + "/" for parent in relative.parents if parent.parts)
    return found


def layout_problems(readme: str, root: Path) -> list[str]:
    """What is wrong with the map: modules it misses, paths it names that do not exist."""
    named = named_paths(layout_section(readme), root)
    missing = sorted(package_paths(root) - named)
    gone = sorted(p for p in named if not (root / p).exists())
    problems = [f"not in README.md's layout map: {p}" for p in missing]
    problems += [f"named in README.md's layout map but does not exist: {p}" for p in gone]
    return problems


def test_the_readme_layout_map_names_every_module_and_only_existing_ones() -> None:
    """Every module and package folder under worker/ has its place in the README's map."""
    problems = layout_problems(README.read_text(encoding="utf-8"), ROOT)
    assert not problems, "\n".join(problems)


def test_the_package_docstring_names_every_folder_and_top_level_module() -> None:
    """worker/__init__.py's short map agrees with the tree (and so with the README's)."""
    doc = worker.__doc__ or ""
    named = set(re.findall(r"``([a-z_]+/|[a-z_]+\.py)``", doc))
    here = ROOT / "worker"
    actual = {p.name + "/" for p in here.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    actual |= {p.name for p in here.glob("*.py") if p.name != "__init__.py"}
    assert named == actual, (
        f"worker/__init__.py's map lacks {sorted(actual - named)}, "
        f"names what is not there: {sorted(named - actual)}"
    )


def test_the_readme_and_the_docstring_start_reading_at_the_same_existing_module() -> None:
    """Both say where to start reading, name the same module, and it exists."""
    in_doc = re.search(r"Start reading at :mod:`([a-z_.]+)`", worker.__doc__ or "")
    in_readme = re.search(r"Start reading at `([a-z_/]+\.py)`", README.read_text(encoding="utf-8"))
    assert in_doc, "worker/__init__.py says: Start reading at :mod:`worker....`"
    assert in_readme, "README.md's Layout says: Start reading at `worker/....py`"
    assert in_readme.group(1) == in_doc.group(1).replace(".", "/") + ".py"
    assert (ROOT / in_readme.group(1)).is_file(), f"{in_readme.group(1)} does not exist"


def test_the_check_names_a_missing_module_and_a_module_that_is_gone(tmp_path: Path) -> None:
    """The check itself: a module left out and a module that does not exist are both named."""
    for name in ("worker/send/actors.py", "worker/send/gate.py", "worker/errors.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "worker" / "send" / "__init__.py").write_text("")
    (tmp_path / "tests").mkdir()
    readme = (
        "# x\n<!-- layout:begin -->\n"
        "- `worker/` top level: `errors.py`\n"
        "- `worker/send/` the send path: `actors.py`,\n"
        "  `ledger.py`; tests in `tests/`\n"
        "<!-- layout:end -->\n"
    )
    assert layout_problems(readme, tmp_path) == [
        "not in README.md's layout map: worker/send/gate.py",
        "named in README.md's layout map but does not exist: worker/send/ledger.py",
    ]
