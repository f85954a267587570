"""Every Python snippet in README.md and docs/ runs, as written, against a live server.

A snippet is a fenced ```python block. It runs in a fresh interpreter in an empty folder, with
the server address it names (127.0.0.1:50051, or a proxy's 127.0.0.1:8080) pointed at the test
server. A plain ``` block right after it is the output it must print. The line before a snippet
may hold a marker:

    <!-- snippet: skip: REASON -->     not run, for the reason given
    <!-- snippet: needs MODULE -->     run where MODULE is installed, else skipped saying so
    <!-- snippet: tritonclient -->     run with tritonclient's own environment (.venv-triton)
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.conftest import REPO, RunningServer, missing_dependency

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ADDRESSES = ("127.0.0.1:50051", "127.0.0.1:8080")
TRITON_PYTHON = REPO / ".venv-triton" / "bin" / "python"
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*snippet:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    marker: str  # "" when none
    output: str | None  # what it must print, when the document shows it

    @property
    def label(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _blocks(text: str) -> list[tuple[int, str, str]]:
    """(line of the opening fence, language, body) of every fenced block."""
    blocks: list[tuple[int, str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        blocks.append((i + 1, match[1], "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


def snippets() -> list[Snippet]:
    found: list[Snippet] = []
    for path in DOCUMENTS:
        text = path.read_text()
        lines = text.splitlines()
        blocks = _blocks(text)
        for n, (line, language, body) in enumerate(blocks):
            if language != "python":
                continue
            before = [ln for ln in lines[: line - 1] if ln.strip()]
            marker = _MARKER.match(before[-1].strip()) if before else None
            output = None
            if n + 1 < len(blocks) and blocks[n + 1][1] == "":
                after, _, shown = blocks[n + 1]
                between = lines[line + body.count("\n") + 1 : after - 1]
                if not any(ln.strip() for ln in between):
                    output = shown
            found.append(Snippet(path, line, body, marker[1] if marker else "", output))
    return found


SNIPPETS = snippets()


def test_snippets_are_found_and_markers_say_why() -> None:
    assert len(SNIPPETS) >= 10
    assert sum(s.output is not None for s in SNIPPETS) >= 4  # outputs are found and compared
    for snippet in SNIPPETS:
        marker = snippet.marker
        if marker.startswith("skip"):
            assert re.fullmatch(r"skip: \S.{10,}", marker), f"{snippet.label}: skip needs a reason"
        else:
            assert marker in ("", "tritonclient") or marker.startswith("needs "), snippet.label


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.label for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, server: RunningServer, tmp_path: Path) -> None:
    marker = snippet.marker
    if marker.startswith("skip"):
        pytest.skip(f"{snippet.label}: {marker.removeprefix('skip:').strip()}")
    python = sys.executable
    if marker.startswith("needs "):
        module = marker.removeprefix("needs ")
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{snippet.label} needs {module}, which is not installed")
    elif marker == "tritonclient":
        if not TRITON_PYTHON.exists():
            missing_dependency(f"{TRITON_PYTHON} (bash bench/perf_analyzer_setup.sh)")
        python = str(TRITON_PYTHON)
    code = snippet.code
    for address in ADDRESSES:
        code = code.replace(address, server.target)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}
    result = subprocess.run(
        [python, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 0, f"{snippet.label} failed:\n{result.stderr}"
    if snippet.output is not None:
        assert result.stdout.rstrip() == snippet.output.rstrip(), snippet.label


def _oip_rpcs() -> tuple[set[str], set[str]]:
    """The OIP RPCs docs/triton.md's table says are served, and those it says answer
    UNIMPLEMENTED."""
    text = (REPO / "docs" / "triton.md").read_text()
    table = text.split("| RPC | what rnnstream does |")[1].split("\n\n")[0]
    rows = [row.split("|")[1:3] for row in table.splitlines()[2:]]
    unimplemented = {name.strip() for name, does in rows if does.strip() == "`UNIMPLEMENTED`"}
    return {name.strip() for name, _ in rows} - unimplemented, unimplemented


def test_triton_doc_names_exactly_the_rpcs_served(server: RunningServer) -> None:
    served, unimplemented = _oip_rpcs()
    assert len(served) == 12 and len(unimplemented) == 8
    with grpc.insecure_channel(server.target) as channel:
        for name in sorted(served | unimplemented):
            if name == "ModelStreamInfer":
                continue  # a stream; served by every tritonclient test
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{name}")
            try:
                call(b"", timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            if name in served:
                assert code != grpc.StatusCode.UNIMPLEMENTED, name
            else:
                assert code == grpc.StatusCode.UNIMPLEMENTED, name


def test_relative_links_point_at_files() -> None:
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            linked = (path.parent / target.split("#")[0]).resolve()
            assert linked.exists(), f"{path.relative_to(REPO)} links to missing {target}"
