"""How one model is served: its [serving] table (the server's flags are the defaults) and which
of its versions are served (its version policy, as Triton's version_policy)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from rnnstream.server.core._models import ModelConfigError

__all__ = ["GRAPH_LEVELS", "ServingConfig", "VersionPolicy", "parse_device"]

# ONNX Runtime's graph optimization levels, by the names config.toml uses.
GRAPH_LEVELS = ("disabled", "basic", "extended", "all")
_FIELDS = (
    "max_batch_size",
    "intra_op_threads",
    "inter_op_threads",
    "graph_optimization",
    "device",
    "warmup",
    "session_ttl",
)


def parse_device(text: str) -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda", CUDA device id or None) of auto, cpu, cuda or cuda:N."""
    kind, _, index = text.partition(":")
    if kind in ("auto", "cpu", "cuda") and not index:
        return kind, None
    if kind == "cuda" and index.isdigit():
        return kind, int(index)
    raise ValueError(f"device {text!r}: use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class ServingConfig:
    """One model's serving values, as they are in force."""

    max_batch_size: int  # most sessions stepped in one ONNX Runtime call
    intra_op_threads: int  # 0: ONNX Runtime decides
    inter_op_threads: int
    graph_optimization: str  # one of GRAPH_LEVELS
    device: str  # auto, cpu, cuda or cuda:N
    warmup: tuple[int, ...]  # batch sizes run before the model is ready
    session_ttl: float  # seconds an idle session lives; 0: forever

    def overridden(self, table: Mapping[str, Any], where: str) -> ServingConfig:
        """These values with a [serving] table's over them; ModelConfigError names a bad one."""
        unknown = sorted(set(table) - set(_FIELDS))
        if unknown:
            raise ModelConfigError(f"{where}: unknown [serving] keys {unknown}; known: {_FIELDS}")
        values = dict(table)
        try:
            for key in ("max_batch_size", "intra_op_threads", "inter_op_threads"):
                if key in values:
                    values[key] = _integer(values[key], key, 1 if key == "max_batch_size" else 0)
            if "graph_optimization" in values and values["graph_optimization"] not in GRAPH_LEVELS:
                raise ValueError(f"graph_optimization must be one of {list(GRAPH_LEVELS)}")
            if "device" in values:
                parse_device(str(values["device"]))
            if "warmup" in values:
                sizes = values["warmup"]
                if not isinstance(sizes, list):
                    raise ValueError("warmup must be a list of batch sizes, e.g. [1, 8, 64]")
                values["warmup"] = tuple(_integer(s, "each warmup batch size", 1) for s in sizes)
            if "session_ttl" in values:
                ttl = values["session_ttl"]
                if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
                    raise ValueError(f"session_ttl must be seconds >= 0, not {ttl!r}")
                values["session_ttl"] = float(ttl)
        except ValueError as exc:
            raise ModelConfigError(f"{where}: [serving] {exc}") from None
        return replace(self, **values)


def _integer(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, not {value!r}")
    return value


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served: the newest `latest`, all, or the listed ones."""

    kind: Literal["latest", "all", "specific"] = "latest"
    latest: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Iterable[int]) -> list[int]:
        found = sorted(available)
        if self.kind == "all":
            return found
        if self.kind == "specific":
            return [v for v in found if v in self.versions]
        return found[-self.latest :]

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.latest}"
        return "all" if self.kind == "all" else f"specific {list(self.versions)}"

    @classmethod
    def from_toml(cls, value: Any, where: str) -> VersionPolicy:
        """version_policy = "all" | { latest = N } | { specific = [1, 3] }."""
        if value == "all":
            return cls("all")
        if isinstance(value, Mapping) and len(value) == 1:
            (kind, arg), *_ = value.items()
            if kind == "latest" and isinstance(arg, int) and not isinstance(arg, bool) and arg > 0:
                return cls("latest", latest=arg)
            if (
                kind == "specific"
                and isinstance(arg, list)
                and arg
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in arg)
            ):
                return cls("specific", versions=tuple(sorted(set(arg))))
        raise ModelConfigError(
            f'{where}: version_policy must be "all", {{ latest = N }} (N >= 1) or '
            f"{{ specific = [1, 3] }} (positive versions), not {value!r}"
        )
