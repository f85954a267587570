"""Load test options: one dataclass, its command-line flags and its checks."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rnnstream._connection import (
    DEFAULT_TARGET,
    Connection,
    add_connection_arguments,
    parse_metadata,
)

__all__ = ["DEFAULT_DURATION", "LoadtestOptions", "OptionsError", "add_arguments", "from_args"]

DEFAULT_DURATION = 10.0
# An open-loop session keeps sending on schedule while earlier frames are still queued; this caps
# how many it may have outstanding so a stalled server cannot make the client hoard memory.
OPEN_LOOP_INFLIGHT = 1024


class OptionsError(ValueError):
    """The options cannot describe a run; the message says which one and why."""


@dataclass(frozen=True)
class LoadtestOptions:
    """Everything one load test run needs. Unset bounds default to a 10 s run."""

    model: str
    target: str = DEFAULT_TARGET
    sessions: int = 16
    duration: float | None = None
    frames_per_session: int | None = None
    warmup: float = 0.0
    inflight: int | None = None
    rate: float | None = None
    session_rate: float | None = None  # frames/s of each session (open loop): rate = sessions * it
    arrivals: Literal["constant", "poisson"] = "constant"
    connections: int = 1
    processes: int = 1
    sessions_per_message: int = 1
    pack_outputs: bool = True
    pack_frames: bool = True
    seed: int = 0
    frames_file: Path | None = None
    verify: bool = False
    verify_model: Path | None = None
    max_error_rate: float = 0.0
    timeout: float | None = None
    drain: float = 10.0
    json_path: Path | None = None
    plot_path: Path | None = None
    progress: bool = True
    # How to reach the server (see Connection): TLS files, a bearer token, request metadata.
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    token: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    def connection(self) -> Connection:
        return Connection(
            target=self.target,
            tls=self.tls,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_server_name=self.tls_server_name,
            token=self.token,
            metadata=self.metadata,
        )

    @property
    def open_loop(self) -> bool:
        return self.rate is not None or self.session_rate is not None

    @property
    def total_rate(self) -> float | None:
        """Frames/s over all sessions in open loop (None: closed loop)."""
        if self.session_rate is not None:
            return self.session_rate * self.sessions
        return self.rate

    @property
    def window(self) -> int:
        """Frames one session may have on the wire at once."""
        if self.inflight is not None:
            return self.inflight
        return OPEN_LOOP_INFLIGHT if self.open_loop else 1

    @property
    def send_seconds(self) -> float | None:
        """Measured seconds of sending, or None when only the frame count bounds the run."""
        if self.duration is None and self.frames_per_session is None:
            return DEFAULT_DURATION
        return self.duration

    @property
    def hard_limit(self) -> float:
        """Seconds after the start (warm-up included) when sending stops whatever else holds."""
        if self.timeout is not None:
            return self.timeout
        seconds = self.send_seconds
        return self.warmup + (seconds if seconds is not None else 600.0)

    def checked(self) -> LoadtestOptions:
        """These options, or OptionsError naming the first one that makes no sense."""
        positive_ints = {
            "sessions": self.sessions,
            "connections": self.connections,
            "processes": self.processes,
            "sessions-per-message": self.sessions_per_message,
        }
        for name, value in positive_ints.items():
            if value < 1:
                raise OptionsError(f"--{name} must be at least 1, got {value}")
        if self.frames_per_session is not None and self.frames_per_session < 1:
            raise OptionsError(
                f"--frames-per-session must be at least 1, got {self.frames_per_session}"
            )
        if self.inflight is not None and self.inflight < 1:
            raise OptionsError(f"--inflight must be at least 1, got {self.inflight}")
        for name, number in (
            ("duration", self.duration),
            ("rate", self.rate),
            ("session-rate", self.session_rate),
            ("timeout", self.timeout),
        ):
            if number is not None and not (math.isfinite(number) and number > 0):
                raise OptionsError(f"--{name} must be a positive number, got {number}")
        if self.rate is not None and self.session_rate is not None:
            raise OptionsError(
                "--rate (frames/s in total) and --session-rate (frames/s per session) are two "
                "ways to set the open-loop rate: give one"
            )
        if not (math.isfinite(self.warmup) and self.warmup >= 0):
            raise OptionsError(f"--warmup must be zero or more seconds, got {self.warmup}")
        if not (math.isfinite(self.drain) and self.drain >= 0):
            raise OptionsError(f"--drain must be zero or more seconds, got {self.drain}")
        if not 0 <= self.max_error_rate <= 1:
            raise OptionsError(f"--max-error-rate must be within [0, 1], got {self.max_error_rate}")
        if self.sessions_per_message > 1 and self.open_loop:
            raise OptionsError(
                "--sessions-per-message drives each group of sessions in a closed loop (one "
                "message in flight per group); it does not go with --rate or --session-rate"
            )
        if self.sessions_per_message > 1 and self.inflight not in (None, 1):
            raise OptionsError(
                "--sessions-per-message keeps one message in flight per group of sessions; "
                f"--inflight {self.inflight} does not go with it"
            )
        if self.arrivals not in ("constant", "poisson"):
            raise OptionsError(f"--arrivals must be constant or poisson, got {self.arrivals!r}")
        if self.processes > self.sessions:
            raise OptionsError(
                f"--processes ({self.processes}) exceeds --sessions ({self.sessions}): "
                "every process needs a session"
            )
        if self.verify and self.verify_model is None:
            raise OptionsError("--verify needs --verify-model PATH (the .onnx file served)")
        files = (
            ("verify-model", self.verify_model),
            ("frames-file", self.frames_file),
            ("tls-ca", self.tls_ca),
            ("tls-cert", self.tls_cert),
            ("tls-key", self.tls_key),
        )
        for name, path in files:
            if path is not None and not path.is_file():
                raise OptionsError(f"--{name}: {path} is not a file")
        if self.frames_file is not None and self.frames_file.suffix != ".npy":
            raise OptionsError(f"--frames-file: {self.frames_file} is not a .npy file")
        if not self.target or ":" not in self.target:
            raise OptionsError(f"--target must be HOST:PORT, got {self.target!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise OptionsError("--tls-cert and --tls-key go together")
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        if self.token:
            out["token"] = "(set)"  # a report is shared; the token is not
        out["metadata"] = [list(pair) for pair in self.metadata]
        return out


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(LoadtestOptions)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rnnstream loadtest` flags; their defaults are LoadtestOptions' own."""
    add_connection_arguments(parser)
    parser.add_argument("--model", required=True, help="model to open the sessions on")
    parser.add_argument(
        "--sessions",
        type=int,
        default=_DEFAULTS["sessions"],
        help="sessions open at once (default %(default)s)",
    )
    bound = parser.add_argument_group(f"bounds (without either: --duration {DEFAULT_DURATION:g})")
    bound.add_argument("--duration", type=float, help="seconds of measured sending")
    bound.add_argument("--frames-per-session", type=int, help="measured frames each session sends")
    bound.add_argument(
        "--warmup",
        type=float,
        default=_DEFAULTS["warmup"],
        help="seconds of sending first that are not measured (default %(default)s)",
    )
    bound.add_argument(
        "--timeout",
        type=float,
        help="stop sending this many seconds after the start whatever else holds "
        "(default: warm-up + duration, or warm-up + 600 s)",
    )
    bound.add_argument(
        "--drain",
        type=float,
        default=_DEFAULTS["drain"],
        help="seconds to wait for outstanding answers after sending stops (default %(default)s)",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--inflight",
        type=int,
        help="frames in flight per session (default: 1 closed loop, "
        f"{OPEN_LOOP_INFLIGHT} open loop)",
    )
    load.add_argument(
        "--rate",
        type=float,
        help="open loop: frames/s in total across all sessions (default: closed loop)",
    )
    load.add_argument(
        "--session-rate",
        type=float,
        help="open loop: frames/s of each session, e.g. 0.1 for a frame every 10 s (a fleet of "
        "sparse sessions; the sessions take turns, so the load is spread evenly); instead of "
        "--rate",
    )
    load.add_argument(
        "--arrivals",
        choices=("constant", "poisson"),
        default=_DEFAULTS["arrivals"],
        help="open-loop arrival process (default %(default)s)",
    )
    load.add_argument(
        "--connections",
        type=int,
        default=_DEFAULTS["connections"],
        help="TCP connections the sessions are spread over (default %(default)s)",
    )
    load.add_argument(
        "--processes",
        type=int,
        default=_DEFAULTS["processes"],
        help="client processes, each driving its share of sessions (default %(default)s)",
    )
    load.add_argument(
        "--sessions-per-message",
        type=int,
        default=_DEFAULTS["sessions_per_message"],
        metavar="K",
        help="send one frame for each of K sessions in one message (FrameGroup), each group of "
        "K sessions in a closed loop on one connection (default %(default)s: a message per "
        "frame)",
    )
    load.add_argument(
        "--no-pack-frames",
        action="store_false",
        dest="pack_frames",
        default=_DEFAULTS["pack_frames"],
        help="send every frame in a message of its own (default: frames that several sessions "
        "of a connection have ready together travel in one FrameGroup)",
    )
    load.add_argument(
        "--no-pack-outputs",
        action="store_false",
        dest="pack_outputs",
        default=_DEFAULTS["pack_outputs"],
        help="ask for one message per answered frame (default: the server may pack the outputs "
        "that are ready together into one message)",
    )
    data = parser.add_argument_group("frames and checks")
    data.add_argument(
        "--seed",
        type=int,
        default=_DEFAULTS["seed"],
        help="seed of the random frames (default %(default)s)",
    )
    data.add_argument(
        "--frames-file",
        type=Path,
        help=".npy of frames, shape [n, ...frame]; session s starts at row s",
    )
    data.add_argument(
        "--verify", action="store_true", help="check every output against a local ONNX Runtime run"
    )
    data.add_argument("--verify-model", type=Path, help="the .onnx file --verify runs")
    data.add_argument(
        "--max-error-rate",
        type=float,
        default=_DEFAULTS["max_error_rate"],
        help="exit 1 when failed requests / requests exceeds this (default %(default)s)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, dest="json_path", help="write the full report here")
    out.add_argument(
        "--plot",
        type=Path,
        dest="plot_path",
        help="draw latency and throughput over time into this .png (extra: plot)",
    )
    out.add_argument(
        "--no-progress",
        action="store_false",
        dest="progress",
        default=_DEFAULTS["progress"],
        help="no live progress line",
    )


def from_args(args: argparse.Namespace) -> LoadtestOptions:
    names = {f.name for f in dataclasses.fields(LoadtestOptions)}
    given = {k: v for k, v in vars(args).items() if k in names}
    try:
        given["metadata"] = parse_metadata(given.get("metadata", ()))
    except ValueError as exc:
        raise OptionsError(str(exc)) from None
    return LoadtestOptions(**given).checked()
