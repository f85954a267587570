"""The server's one settings object, filled from flags and RNNSTREAM_* environment variables;
each setting declares what it accepts (server/_flags.py parses, checks and refuses)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rnnstream.server._flags import Rule, check_value, read_settings, refusal, settings_parser

if TYPE_CHECKING:
    import argparse

    from rnnstream.server.core import EngineSettings

__all__ = ["Settings"]

_PORT = {"minimum": 0, "maximum": 65535}
_FILE = {"path": "file"}


def _setting(default: Any, doc: str, **rule: Any) -> Any:
    return field(default=default, metadata={"doc": doc, "rule": Rule(**rule)})


@dataclass(frozen=True)
class Settings:
    """Every knob of rnnstream-server. Flag --foo-bar maps to env RNNSTREAM_FOO_BAR."""

    host: str = _setting("127.0.0.1", "Address to listen on (0.0.0.0 inside containers).")
    port: int = _setting(50051, "gRPC port; 0 picks a free one.", **_PORT)
    model_repository: Path = field(
        default=Path("models"),
        metadata={
            "doc": "Folder with one sub-folder per model holding model.onnx.",
            "rule": Rule(
                path="dir",
                unless="example_models",
                hint="give the folder of your models, or serve the examples: --example-models",
            ),
        },
    )
    example_models: bool = _setting(
        False,
        "Serve the small example models shipped with rnnstream (gru, lstm, rnn_tanh, rnn_relu, "
        "co2_forecaster, seq_classifier) instead of a --model-repository: a first request "
        "needs no model of your own.",
    )
    models: tuple[str, ...] = _setting(
        (), "Load only these models (comma-separated); empty loads every model found."
    )
    model_control_mode: str = _setting(
        "none",
        "How served models follow the repository (Triton's names): none loads every model at "
        "start; poll also rescans it every --repository-poll-secs (new, changed and removed "
        "models); explicit loads only --load-model at start, then what clients load and unload. "
        "SIGHUP rescans in every mode.",
        choices=("none", "poll", "explicit"),
    )
    repository_poll_secs: float = _setting(
        15.0,
        "Poll mode: seconds between rescans; a model loads once its files hold still.",
        above=0,
    )
    load_model: tuple[str, ...] = _setting(
        (), "With --model-control-mode explicit, models to load at start (comma-separated; *: all)."
    )
    drain_timeout: float = _setting(
        600.0,
        "Seconds a retired model version (unloaded, or replaced by a newer one) keeps serving "
        "the sessions opened on it; then they are ended, each told why. 0: until they end.",
        minimum=0,
    )
    bad_models: str = _setting(
        "refuse",
        "A model that cannot be loaded (a corrupt model.onnx, a graph rnnstream cannot serve): "
        "refuse to start, naming it; or skip it with an error logged and serve the others.",
        choices=("refuse", "skip"),
    )
    device: str = _setting(
        "auto",
        "Execution provider: auto (CUDA if it really works, else CPU), cpu or cuda.",
        choices=("auto", "cpu", "cuda"),
    )
    ort_threads: int = _setting(
        1, "ONNX Runtime intra-op threads per model; 0 lets ORT decide.", minimum=0, maximum=1024
    )
    max_batch_size: int = _setting(
        256, "Most sessions stepped in one ONNX Runtime call; 1 disables batching.", minimum=1
    )
    inline_run_us: float = _setting(
        250.0,
        "Batches whose ONNX Runtime run takes less than this many microseconds (timed at startup "
        "and while serving) run on the event loop instead of the executor thread; 0 sends every "
        "batch to the thread.",
        minimum=0,
        maximum=1_000_000,
    )
    busy_poll_us: float = _setting(
        500.0,
        "After a batch, keep the event loop polling (not sleeping) this many microseconds for the "
        "next frame: lower latency at low load for CPU while frames flow; 0 turns it off.",
        minimum=0,
        maximum=1_000_000,
    )
    gather_us: float = _setting(
        200.0,
        "Under load, the longest quiet spell a batch waits through for more frames: 1 µs per "
        "session whose next frame is expected (answered in the last 100 ms, nothing sent since), "
        "up to this; a lone stream never waits; 0: a batch starts after two idle loop turns.",
        minimum=0,
        maximum=1_000_000,
    )
    port_file: str = _setting(
        "",
        "Once serving, write the gRPC port bound to this file (one line): with --port 0, how a "
        "script that started the server learns its port.",
    )
    workers: int = _setting(
        1,
        "Server processes sharing the port (SO_REUSEPORT), each with its own sessions.",
        minimum=1,
        maximum=256,
    )
    max_sessions: int = _setting(
        100_000, "Most sessions open at once across all models.", minimum=1
    )
    session_ttl: float = _setting(
        600.0, "Seconds an idle session lives; 0 turns expiry off.", minimum=0
    )
    max_sessions_per_principal: int = _setting(
        0,
        "Most sessions one principal may hold at once, over all its streams (0: no limit but "
        "--max-sessions). At it, an open is refused, or with --evict-idle-when-full the "
        "principal's own longest-idle session is evicted; never another principal's.",
        minimum=0,
    )
    output_ring: int = _setting(
        64,
        "Outputs kept per session to answer frames resent after a reconnect.",
        minimum=0,
        maximum=1_000_000,
    )
    output_ring_bytes: int = _setting(
        4 * 2**20, "Most bytes of outputs one session's ring keeps (its newest always).", minimum=0
    )
    max_steps_per_frame: int = _setting(4096, "Most time steps (T) one frame may carry.", minimum=1)
    max_forecast_steps: int = _setting(4096, "Most steps one Forecast may roll forward.", minimum=1)
    max_message_bytes: int = _setting(
        16 * 1024 * 1024, "Largest gRPC message accepted or sent.", minimum=4096, maximum=2**31 - 1
    )
    state_store: str = _setting(
        "",
        "Where session state lives: empty keeps it in this process; redis://HOST:PORT/DB keeps it "
        "in Redis so any replica can resume a session.",
        prefixes=("redis://", "rediss://", "unix://"),
    )
    spill_after: float = _setting(
        0.0,
        "With --state-store: an idle session leaves memory after this many seconds, its state "
        "kept in the store; its next request, on any replica, brings it back. 0: never.",
        minimum=0,
    )
    store_ttl: float = _setting(
        0.0,
        "Seconds a spilled session's state stays in the store before the session expires "
        "(0: its session TTL; that 0 too: for good).",
        minimum=0,
    )
    state_store_legacy_keys: str = _setting(
        "refuse",
        "Sessions a Redis store holds under the old key layout (rnnstream:session:*, "
        "ambiguous across principals) are never read: refuse to start while any exist, ignore "
        "them (they expire), or delete them at start.",
        choices=("refuse", "ignore", "delete"),
    )
    rate_limit_frames: float = _setting(
        0.0,
        "Frames a second each principal may send, over all its calls (0: no limit): streams "
        "beyond it are read more slowly, unary calls refused with RESOURCE_EXHAUSTED and a retry "
        "hint (trailing metadata grpc-retry-pushback-ms). A forecast of k steps counts k frames.",
        minimum=0,
    )
    rate_limit_burst: float = _setting(
        0.0,
        "Frames a principal may send at once above its rate (0: one second's worth).",
        minimum=0,
    )
    max_sessions_per_stream: int = _setting(1024, "Most sessions one stream may open.", minimum=1)
    max_pending_frames: int = _setting(
        64,
        "Frames queued per session before the server stops reading that stream (back-pressure).",
        minimum=1,
    )
    max_buffered_bytes: int = _setting(256 * 2**20, "Most bytes held for clients.", minimum=2**20)
    max_buffered_bytes_per_principal: int = _setting(
        0, "Of --max-buffered-bytes, most one principal's work holds; 0: all of it.", minimum=0
    )
    pack_outputs: bool = _setting(
        True,
        "Send the frame outputs that are ready together (a batch's) in one FrameOutputs message "
        "on streams that ask for it (metadata rnnstream-pack-outputs: 1); off: one message each.",
    )
    evict_idle_when_full: bool = _setting(
        False,
        "At the session cap, evict an idle session instead of refusing the open: the longest-idle "
        "one of the principal holding the most sessions, never one of a principal holding fewer "
        "than the one opening.",
    )
    keepalive_time: float = _setting(
        30.0, "Seconds between keepalive pings on idle connections.", above=0
    )
    keepalive_timeout: float = _setting(
        10.0, "Seconds to wait for a ping ack before dropping.", above=0
    )
    grace: float = _setting(
        10.0, "Seconds a SIGTERM/SIGINT shutdown may take before closing.", minimum=0
    )
    http_port: int = _setting(
        0, "Open Inference Protocol REST (KServe v2) port on --host, auth as gRPC; 0: off.", **_PORT
    )
    metrics_port: int = _setting(
        9400, "Prometheus metrics HTTP port on --metrics-host; 0 turns it off.", **_PORT
    )
    metrics_host: str = _setting("", "Address the metrics endpoint listens on; empty: --host.")
    metrics_token: str = _setting(
        "",
        "Bearer token GET /metrics must send (prefer the variable: a flag shows in ps). Required "
        "when the API needs credentials and metrics listen beyond loopback.",
    )
    metrics_per_principal: bool = _setting(
        False,
        "Also export per-principal series (frames, refused frames, throttled seconds, open "
        "sessions), labelled by principal: one series per principal, so off by default.",
    )
    metrics_token_file: str = _setting(
        "", "File holding the metrics bearer token (instead of --metrics-token).", **_FILE
    )
    log_format: str = _setting("text", "Log line format.", choices=("text", "json"))
    log_level: str = _setting(
        "INFO",
        "Logging level.",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        upper=True,
    )
    tls_cert: str = _setting(
        "", "PEM server certificate chain; with --tls-key enables TLS.", **_FILE
    )
    tls_key: str = _setting("", "PEM private key of --tls-cert.", **_FILE)
    tls_client_ca: str = _setting(
        "", "PEM CA bundle; when set, clients must present a certificate.", **_FILE
    )
    tls_client_principal: str = _setting(
        "cn",
        "With --tls-client-ca, the client certificate's name that is its principal: the subject "
        "common name, or its one DNS, URI or email SAN; none: certificates only admit the "
        "connection. With bearer tokens too, a call needs both, naming the same principal.",
        choices=("cn", "dns", "uri", "email", "none"),
    )
    auth_tokens: tuple[str, ...] = _setting(
        (), "Bearer tokens, comma-separated, each 'principal=token' or a bare token."
    )
    auth_tokens_file: str = _setting(
        "", "File of bearer tokens, one per line: 'principal=token' or a bare token.", **_FILE
    )
    admin_principals: tuple[str, ...] = _setting(
        (),
        "Principals (named by a bearer token or a client certificate) that may list, read and "
        "end every principal's sessions (ListSessions, GetSession, EndSession), comma-separated.",
    )
    readiness_without_auth: bool = _setting(
        False,
        "Let the Open Inference Protocol ServerLive and ServerReady answer callers without "
        "credentials (for probes that cannot send any); gRPC health always does.",
    )

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
