"""The model repository on disk: one folder per model, holding model.onnx (version 1) or numbered
version folders (Triton's layout), with an optional config.toml and config.pbtxt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnstream.server.core._models import ModelConfigError, load_config
from rnnstream.server.core._serving import ServingConfig, VersionPolicy
from rnnstream.server.core._triton_config import TritonConfig, read_triton_config

__all__ = ["ModelSource", "Stamp", "scan_model", "scan_repository", "version_stamp"]

_MODEL_FILE = "model.onnx"
_OWN_KEYS = ("serving", "version_policy")  # config.toml keys that are not about the graph
Stamp = tuple[str, int, int]


@dataclass(frozen=True)
class ModelSource:
    """A model folder as found: its versions, how they are served, or why they cannot be."""

    name: str
    folder: Path
    versions: dict[int, Path]  # version -> its model file
    policy: VersionPolicy
    serving: ServingConfig
    problem: str = ""  # non-empty: nothing of the folder can be loaded, and why
    triton: TritonConfig | None = None
    fingerprint: tuple[Stamp, ...] = ()  # changes when any file it was read from changes
    graph_config: dict[str, Any] | None = field(default=None, repr=False)

    def wanted(self) -> list[int]:
        """The versions its policy serves, oldest first."""
        return self.policy.select(self.versions)

    def graph(self, version: int) -> tuple[dict[str, Any] | None, Path]:
        """The graph description (config.toml less [serving]) of a version, and the folder its
        files are named from: the version folder's own config.toml, else the model's."""
        own = self.versions[version].parent
        if own != self.folder and (own / "config.toml").is_file():
            return load_config(own), own
        return self.graph_config, self.folder


def _stamp(path: Path) -> Stamp | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (str(path), stat.st_mtime_ns, stat.st_size)


def version_stamp(source: ModelSource, version: int) -> tuple[Stamp | None, ...]:
    """The files a version is loaded from, as they are now: a reload is due when it changes."""
    path = source.versions[version]
    folder = source.folder
    files = (path, path.parent / "config.toml", folder / "config.toml", folder / "config.pbtxt")
    return tuple(_stamp(f) for f in files)


def _numbered(folder: Path) -> dict[int, Path]:
    """Version folders: positive integer names (Triton skips names with a leading zero)."""
    found: dict[int, Path] = {}
    for child in folder.iterdir():
        if child.is_dir() and child.name.isdigit() and not child.name.startswith("0"):
            found[int(child.name)] = child
    return found


def scan_model(folder: Path, defaults: ServingConfig) -> ModelSource | None:
    """The model in `folder`, or None when the folder holds none (no model file, no version
    folder, no config.pbtxt). A folder that is a model but cannot be served says why."""
    name = folder.name
    numbered = _numbered(folder)
    files = [folder / "config.toml", folder / "config.pbtxt"]
    files += [p / n for p in numbered.values() for n in (_MODEL_FILE, "config.toml")]
    stamps = tuple(s for s in map(_stamp, [folder / _MODEL_FILE, *files]) if s is not None)
    source = ModelSource(name, folder, {}, VersionPolicy(), defaults, fingerprint=stamps)
    try:
        triton = read_triton_config(folder)
        toml = load_config(folder) or {}
    except ModelConfigError as exc:
        if not numbered and not (folder / _MODEL_FILE).is_file():
            return None
        return _problem(source, str(exc))
    model_file = triton.model_file if triton is not None else _MODEL_FILE
    flat = folder / model_file
    if not numbered and not flat.is_file() and triton is None:
        return None
    source = ModelSource(name, folder, {}, source.policy, defaults, "", triton, stamps)
    if flat.is_file() and numbered:
        return _problem(
            source,
            f"{folder} holds both {model_file} and version folders {sorted(numbered)}: move "
            f"{model_file} into a version folder (1/{model_file})",
        )
    versions = {1: flat} if flat.is_file() else {}
    versions.update({v: p / model_file for v, p in numbered.items() if (p / model_file).is_file()})
    if not versions:
        return _problem(source, f"no version folder of {folder} holds {model_file}")
    try:
        serving = defaults.overridden(triton.serving if triton else {}, str(folder))
        serving = serving.overridden(toml.get("serving", {}), str(folder / "config.toml"))
        policy = triton.policy if triton is not None and triton.policy else VersionPolicy()
        if "version_policy" in toml:
            policy = VersionPolicy.from_toml(toml["version_policy"], str(folder / "config.toml"))
    except ModelConfigError as exc:
        return _problem(source, str(exc))
    graph = {k: v for k, v in toml.items() if k not in _OWN_KEYS} or None
    return ModelSource(name, folder, versions, policy, serving, "", triton, stamps, graph)


def _problem(source: ModelSource, problem: str) -> ModelSource:
    return ModelSource(
        source.name, source.folder, {}, source.policy, source.serving, problem,
        source.triton, source.fingerprint,
    )  # fmt: skip


def scan_repository(
    repository: Path, defaults: ServingConfig, only: Sequence[str] = ()
) -> dict[str, ModelSource]:
    """Every model folder of the repository (only those named in `only`, when given)."""
    if not repository.is_dir():
        raise ModelConfigError(f"model repository {repository} is not a folder")
    found: dict[str, ModelSource] = {}
    for folder in sorted(p for p in repository.iterdir() if p.is_dir()):
        if only and folder.name not in only:
            continue
        source = scan_model(folder, defaults)
        if source is not None:
            found[source.name] = source
    return found
