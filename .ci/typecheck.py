"""mypy --strict over the rnnstream package, laid out as the wheel lays it out.

pyproject.toml maps client/, server/ and proto/rnnstream/proto/ into the one package `rnnstream`
(setuptools package-dir). mypy names modules by their folders and cannot follow that mapping, so
this script builds the package's tree out of symbolic links in a temporary folder, runs mypy on it
and prints mypy's findings with the repository's own paths.

Usage: python .ci/typecheck.py [extra mypy arguments]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, Path]:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: REPO / folder for name, folder in setuptools["package-dir"].items()}


def link_tree(root: Path, mapping: dict[str, Path]) -> dict[Path, Path]:
    """Link each mapped folder's entries under `root`; returns link folder -> real folder."""
    placed: dict[Path, Path] = {}
    for name, folder in sorted(mapping.items()):  # parents before their subpackages
        target = root.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        placed[target] = folder
        for entry in folder.iterdir():
            if entry.name != "__pycache__" and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return placed


def main() -> int:
    mypy = Path(sys.executable).with_name("mypy")
    with tempfile.TemporaryDirectory(prefix="rnnstream-typecheck-") as tmp:
        placed = link_tree(Path(tmp), package_dirs())
        result = subprocess.run(
            [
                str(mypy),
                "--config-file",
                str(REPO / "pyproject.toml"),
                "-p",
                "rnnstream",
                *sys.argv[1:],
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
    out = result.stdout + result.stderr
    # Longest link folder first, so rnnstream/server/... maps to server/, not client/server/.
    for link, real in sorted(placed.items(), key=lambda item: -len(str(item[0]))):
        relative_link = str(link.relative_to(tmp)) + "/"
        out = out.replace(relative_link, str(real.relative_to(REPO)) + "/")
    print(out, end="")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
