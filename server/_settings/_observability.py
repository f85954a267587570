"""Metrics and logs: the /metrics endpoint, per-principal series, log format."""

from __future__ import annotations

from dataclasses import dataclass

from rnnstream.server._settings._field import FILE, PORT, setting

__all__ = ["ObservabilitySettings"]


@dataclass(frozen=True)
class ObservabilitySettings:
    """Metrics and logs."""

    metrics_port: int = setting(
        9400, "Prometheus metrics HTTP port on --metrics-host; 0 turns it off.", **PORT
    )
    metrics_host: str = setting("", "Address the metrics endpoint listens on; empty: --host.")
    metrics_token: str = setting(
        "",
        "Bearer token GET /metrics must send (prefer the variable: a flag shows in ps). Required "
        "when the API needs credentials and metrics listen beyond loopback.",
    )
    metrics_token_file: str = setting(
        "", "File holding the metrics bearer token (instead of --metrics-token).", **FILE
    )
    metrics_per_principal: bool = setting(
        False,
        "Also export per-principal series (frames, refused frames, throttled seconds, open "
        "sessions), labelled by principal: one series per principal, so off by default.",
    )
    log_format: str = setting("text", "Log line format.", choices=("text", "json"))
    log_level: str = setting(
        "INFO",
        "Logging level.",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        upper=True,
    )
