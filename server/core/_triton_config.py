"""A Triton model folder's config.pbtxt: the fields that matter to rnnstream, and which are not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnstream.server.core._models import ModelConfigError
from rnnstream.server.core._pbtxt import Message, PbtxtError, parse_pbtxt
from rnnstream.server.core._serving import VersionPolicy

__all__ = ["TritonConfig", "describe_ignored", "read_triton_config"]

_ONNX = ("onnxruntime_onnx", "onnxruntime")
# Read here; every other field is named in the log line of ignored ones.
_USED = {
    "name",
    "platform",
    "backend",
    "max_batch_size",
    "version_policy",
    "sequence_batching",
    "instance_group",
    "default_model_filename",
}


@dataclass(frozen=True)
class TritonConfig:
    serving: dict[str, Any]  # [serving] values it sets
    policy: VersionPolicy | None
    model_file: str  # the file each version folder holds
    ignored: tuple[str, ...]


def _one(fields: Message, name: str, default: Any = None) -> Any:
    values = fields.get(name)
    return values[-1] if values else default


def _policy(value: Any, where: str) -> VersionPolicy:
    if not isinstance(value, dict) or len(value) != 1:
        raise ModelConfigError(f"{where}: version_policy must hold one of latest, all, specific")
    kind = next(iter(value))
    bodies = value[kind]
    body = bodies[-1] if bodies and isinstance(bodies[-1], dict) else {}
    if kind == "all":
        return VersionPolicy("all")
    if kind == "latest":
        return VersionPolicy.from_toml({"latest": _one(body, "num_versions", 1)}, where)
    if kind == "specific":
        return VersionPolicy.from_toml({"specific": list(body.get("versions", []))}, where)
    raise ModelConfigError(f"{where}: unknown version_policy {kind!r}")


def _device(groups: list[Any]) -> tuple[str | None, list[str]]:
    """The device of the first instance group, and the group fields left unused."""
    if not groups:
        return None, []
    group = groups[0]
    unused = [f"instance_group.{k}" for k in sorted(group) if k not in ("kind", "gpus")]
    if len(groups) > 1:
        unused.append("instance_group[1:]")
    kind = _one(group, "kind", "KIND_AUTO")
    gpus = group.get("gpus", [])
    if kind == "KIND_GPU":
        return (f"cuda:{gpus[0]}" if gpus else "cuda"), unused
    if kind == "KIND_CPU":
        return "cpu", unused
    return None, unused


def read_triton_config(folder: Path) -> TritonConfig | None:
    """The folder's config.pbtxt as rnnstream reads it (None without one); ModelConfigError
    when it cannot be read or describes a model rnnstream cannot serve."""
    path = folder / "config.pbtxt"
    if not path.is_file():
        return None
    where = str(path)
    try:
        fields = parse_pbtxt(path.read_text())
    except (PbtxtError, SyntaxError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{where}: not protobuf text format: {exc}") from None
    name = _one(fields, "name")
    if name is not None and name != folder.name:
        raise ModelConfigError(f"{where}: name {name!r} must be the folder's name {folder.name!r}")
    runtime = _one(fields, "platform") or _one(fields, "backend")
    if runtime is not None and runtime not in _ONNX:
        raise ModelConfigError(
            f"{where}: platform/backend {runtime!r}; rnnstream serves ONNX models "
            "(onnxruntime_onnx) only"
        )
    serving: dict[str, Any] = {}
    batch = _one(fields, "max_batch_size")
    if isinstance(batch, int):
        serving["max_batch_size"] = max(1, batch)  # 0 (no batching): one session per run
    ignored = sorted(k for k in fields if k not in _USED)
    sequence = _one(fields, "sequence_batching", {})
    idle = _one(sequence, "max_sequence_idle_microseconds", 0)
    if isinstance(idle, int) and idle > 0:
        serving["session_ttl"] = idle / 1e6
    ignored += [f"sequence_batching.{k}" for k in sorted(sequence) if not k.startswith("max_seq")]
    device, unused = _device(fields.get("instance_group", []))
    if device is not None:
        serving["device"] = device
    ignored += unused
    policy = _one(fields, "version_policy")
    config = TritonConfig(
        serving=serving,
        policy=None if policy is None else _policy(policy, where),
        model_file=str(_one(fields, "default_model_filename", "model.onnx")),
        ignored=tuple(ignored),
    )
    return config


def describe_ignored(name: str, config: TritonConfig) -> str:
    """One line naming what of config.pbtxt rnnstream does not read."""
    return (
        f"model {name}: config.pbtxt fields not read: {', '.join(config.ignored)} (inputs, "
        "outputs and states come from the ONNX graph and config.toml)"
    )
