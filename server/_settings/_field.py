"""How a setting is declared: its default, its one-line doc and the rule its values follow."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from rnnstream.server._flags import Rule

__all__ = ["FILE", "PORT", "setting"]

PORT: dict[str, Any] = {"minimum": 0, "maximum": 65535}
FILE: dict[str, Any] = {"path": "file"}


def setting(default: Any, doc: str, **rule: Any) -> Any:
    return field(default=default, metadata={"doc": doc, "rule": Rule(**rule)})
