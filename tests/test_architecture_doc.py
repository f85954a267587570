"""docs/architecture.md's module tree names every module of the server and the client, and
nothing that is not there: a new module gets its line, a removed one loses it."""

from __future__ import annotations

import re

from tests.conftest import REPO

DOC = REPO / "docs" / "architecture.md"
ENTRY = re.compile(r"^( *)(\S+)")


def _tree_paths() -> set[str]:
    """The paths the doc's first code block names, nested folders joined by indentation."""
    block = DOC.read_text().split("```")[1]
    paths: set[str] = set()
    folders: list[tuple[int, str]] = []  # (indent, folder) of the entries above
    for line in block.splitlines():
        match = ENTRY.match(line)
        if match is None:
            continue
        indent, name = len(match.group(1)), match.group(2)
        folders = [(i, f) for i, f in folders if i < indent]
        path = "".join(f for _, f in folders) + name
        if name.endswith("/"):
            folders.append((indent, name))
        paths.add(path)
    return paths


def _modules() -> set[str]:
    return {
        str(path.relative_to(REPO))
        for top in ("server", "client")
        for path in (REPO / top).rglob("*.py")
        if path.name != "__init__.py" or path.parent.name == "core"
    }


def test_every_module_has_its_line() -> None:
    missing = sorted(_modules() - _tree_paths())
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_every_named_module_exists() -> None:
    named = {p for p in _tree_paths() if p.endswith(".py") and p.startswith(("server/", "client/"))}
    gone = sorted(p for p in named if not (REPO / p).is_file())
    assert not gone, f"docs/architecture.md names modules that are gone: {gone}"
