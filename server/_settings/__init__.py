"""The server's one settings object, filled from flags and RNNSTREAM_* environment variables.

Each topic's settings live in a module of their own (serving, models, batching, sessions, limits,
state store, security, metrics and logs); `Settings` joins them, and `--help` lists them by topic.
Each setting declares what it accepts (server/_flags.py parses, checks and refuses)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rnnstream.server._flags import check_value, read_settings, refusal, settings_parser
from rnnstream.server._settings._batching import BatchingSettings
from rnnstream.server._settings._limits import LimitSettings
from rnnstream.server._settings._models import ModelSettings
from rnnstream.server._settings._observability import ObservabilitySettings
from rnnstream.server._settings._security import SecuritySettings
from rnnstream.server._settings._serving import ServingSettings
from rnnstream.server._settings._sessions import SessionSettings
from rnnstream.server._settings._store import StoreSettings

if TYPE_CHECKING:
    import argparse

    from rnnstream.server.core import EngineSettings

__all__ = ["Settings"]


# Bases are listed last topic first: a dataclass orders inherited fields from the last base on,
# so fields (and --help) follow the topics from serving to observability.
@dataclass(frozen=True)
class Settings(
    ObservabilitySettings,
    SecuritySettings,
    StoreSettings,
    LimitSettings,
    SessionSettings,
    BatchingSettings,
    ModelSettings,
    ServingSettings,
):
    """Every knob of rnnstream-server. Flag --foo-bar maps to env RNNSTREAM_FOO_BAR."""

    def engine_settings(self) -> EngineSettings:
        """What the core reads of these settings."""
        from rnnstream.server._core_settings import core_settings

        return core_settings(self)

    def __post_init__(self) -> None:
        """Settings made in code keep the same rules (files and folders are checked where
        they are given, by from_args)."""
        for f in dataclasses.fields(self):
            try:
                check_value(f, getattr(self, f.name), paths=False)
            except ValueError as exc:
                raise refusal(f, "", str(exc)) from None
        if self.example_models and self.model_repository != Path("models"):
            raise refusal(
                _field("example_models"),
                "",
                f"serves the example models, not {str(self.model_repository)!r}: give "
                "--example-models or --model-repository, not both",
            )
        if self.load_model and self.model_control_mode != "explicit":
            raise refusal(
                _field("load_model"),
                "",
                "names the models to load with --model-control-mode explicit; in "
                f"{self.model_control_mode!r} mode every model found loads",
            )
        if self.spill_after and not self.state_store:
            raise refusal(_field("spill_after"), "", "spills to a state store: give --state-store")
        if self.metrics_port and self.metrics_port + self.workers - 1 > 65535:
            raise refusal(
                _field("metrics_port"),
                "",
                f"{self.metrics_port} + {self.workers} workers runs past port 65535 (worker i "
                "serves metrics on --metrics-port + i)",
            )

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        return settings_parser(
            cls,
            "rnnstream-server",
            "Serve recurrent ONNX models over gRPC with per-session state.",
        )

    @classmethod
    def from_args(
        cls,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        paths: bool = True,
    ) -> Settings:
        """Parse flags; a setting without its flag comes from its RNNSTREAM_* variable, else
        its default. A refused value exits with status 2 and one line naming the setting;
        `paths`: the files and folders named must exist."""
        parser = cls.parser()
        return cls.from_namespace(parser, parser.parse_args(argv), env, paths=paths)

    @classmethod
    def from_namespace(
        cls,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        env: Mapping[str, str] | None = None,
        *,
        paths: bool = True,
    ) -> Settings:
        try:
            return read_settings(cls, namespace, os.environ if env is None else env, paths=paths)
        except ValueError as exc:
            parser.exit(2, f"{parser.prog}: {exc}\n")


def _field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(Settings) if f.name == name)
