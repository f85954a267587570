"""The server's rooms keep to their doors: transports reach the core only through the Engine's
public surface, and the core reaches nothing above it. Read from the source (ast), not run."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import rnnstream.server.core as core
from tests.conftest import REPO

SERVER = REPO / "server"
CORE = "rnnstream.server.core"

# Where the core's public names may be defined: the Engine, its results, its errors, and the
# value types those carry (model specs, the state store interface, a frame's tensors).
PUBLIC_HOMES = {
    f"{CORE}._budget",
    f"{CORE}._engine",
    f"{CORE}._engine_settings",
    f"{CORE}._instruments",
    f"{CORE}._errors",
    f"{CORE}._models",
    f"{CORE}._results",
    f"{CORE}._serving",
    f"{CORE}._runtime",  # DeviceError only, checked below
    f"{CORE}._work",  # FrameReply only, checked below
    f"{CORE}._store",
}
INTERNALS = {"Session", "SessionManager", "ModelScheduler", "StatePool", "OrtModel", "load_model"}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # absolute module imported from
    names: tuple[str, ...]  # names imported from it (empty for `import module`)


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVER).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("rnnstream", "server", *parts))


def imports(folder: Path) -> list[Import]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        package = module_name(path)
        if path.name != "__init__.py":
            package = package.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [Import(path, node.lineno, a.name, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, module] if module else base)
                names = tuple(a.name for a in node.names)
                found.append(Import(path, node.lineno, module, names))
    return found


def where(i: Import) -> str:
    return f"{i.path.relative_to(REPO)}:{i.line}"


def test_the_walk_sees_the_imports_it_checks() -> None:
    """The rules below cannot pass by finding nothing."""
    transport = imports(SERVER / "transport")
    assert any(i.module == CORE and "Engine" in i.names for i in transport)
    assert any(i.module.startswith(f"{CORE}._") for i in imports(SERVER / "core"))


def test_transports_use_only_the_cores_public_surface() -> None:
    public = set(core.__all__)
    problems = []
    for i in imports(SERVER / "transport"):
        if i.module.startswith(f"{CORE}.") or (i.module == CORE and not i.names):
            problems.append(f"{where(i)}: imports {i.module} (only `from {CORE} import ...`)")
        elif i.module == CORE:
            problems += [
                f"{where(i)}: {n} is not in {CORE}.__all__" for n in i.names if n not in public
            ]
    assert problems == []


def test_the_core_exports_the_engine_its_results_and_errors_only() -> None:
    assert "Engine" in core.__all__
    assert not INTERNALS & set(core.__all__)
    for name in core.__all__:
        value = getattr(core, name)
        home = getattr(value, "__module__", None)
        if home is None or home == "typing" or not home.startswith(CORE):
            continue  # type aliases and constants
        assert home in PUBLIC_HOMES, f"{name} comes from {home}"
        if home == f"{CORE}._runtime":
            assert name == "DeviceError"
        if home == f"{CORE}._work":
            assert name == "FrameReply"


def test_the_core_reaches_nothing_above_it() -> None:
    """No transport, no wire format, no server settings or Prometheus: the core is handed its
    settings (EngineSettings) and its metrics (CoreMetrics), and its errors carry its own codes."""
    problems = []
    for i in imports(SERVER / "core"):
        top = i.module.split(".")[0]
        if top in ("grpc", "google", "prometheus_client", "redis") or (
            top == "rnnstream" and not i.module.startswith(CORE)
        ):
            problems.append(f"{where(i)}: imports {i.module}")
    assert problems == []


def test_every_error_code_has_a_grpc_and_an_http_status() -> None:
    import grpc

    from rnnstream.server.core import ErrorCode
    from rnnstream.server.transport.grpc._status import GRPC_STATUS
    from rnnstream.server.transport.http._status import HTTP_STATUS

    assert set(GRPC_STATUS) == set(ErrorCode) == set(HTTP_STATUS)
    assert all(GRPC_STATUS[code].name == code.name for code in ErrorCode)
    assert GRPC_STATUS[ErrorCode.NOT_FOUND] == grpc.StatusCode.NOT_FOUND


def test_no_import_cycle_inside_the_core() -> None:
    """Counting imports made for type checking only: a cycle there is a cycle of design."""
    graph: dict[str, set[str]] = {}
    for i in imports(SERVER / "core"):
        if i.module.startswith(f"{CORE}._"):
            graph.setdefault(module_name(i.path), set()).add(i.module)
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError(
                "import cycle: " + " -> ".join(m.rpartition(".")[2] for m in cycle)
            )
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert len(done) > 10  # the walk saw the core's modules


def test_only_the_sessions_own_queue_writes_its_fields() -> None:
    """Inside the core, that is: no module outside it ever sees a Session (rules above)."""
    from rnnstream.server.core._session import Session

    fields = set(Session.__slots__)
    problems = []
    for path in sorted((SERVER / "core").rglob("*.py")):
        if path.name == "_session.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            while targets:
                target = targets.pop()
                if isinstance(target, ast.Tuple | ast.List):
                    targets += target.elts
                elif (
                    isinstance(target, ast.Attribute)
                    and target.attr in fields
                    and not (isinstance(target.value, ast.Name) and target.value.id == "self")
                ):
                    problems.append(
                        f"{path.relative_to(REPO)}:{node.lineno}: writes .{target.attr}"
                    )
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and node.attr in fields
            ):
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: reaches .{node.attr}")
    assert problems == []


def test_no_server_module_is_over_350_lines() -> None:
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for path in SERVER.rglob("*.py")
    }
    assert len(sizes) > 30
    assert {path: n for path, n in sizes.items() if n > 350} == {}
