"""Where and how the server listens: address, ports, workers, message size, keepalive, grace."""

from __future__ import annotations

from dataclasses import dataclass

from rnnstream.server._settings._field import PORT, setting

__all__ = ["ServingSettings"]


@dataclass(frozen=True)
class ServingSettings:
    """Serving: where the server listens and how its processes run."""

    host: str = setting("127.0.0.1", "Address to listen on (0.0.0.0 inside containers).")
    port: int = setting(50051, "gRPC port; 0 picks a free one.", **PORT)
    port_file: str = setting(
        "",
        "Once serving, write the gRPC port bound to this file (one line): with --port 0, how a "
        "script that started the server learns its port.",
    )
    workers: int = setting(
        1,
        "Server processes sharing the port (SO_REUSEPORT), each with its own sessions.",
        minimum=1,
        maximum=256,
    )
    http_port: int = setting(
        0, "Open Inference Protocol REST (KServe v2) port on --host, auth as gRPC; 0: off.", **PORT
    )
    max_message_bytes: int = setting(
        16 * 1024 * 1024, "Largest gRPC message accepted or sent.", minimum=4096, maximum=2**31 - 1
    )
    pack_outputs: bool = setting(
        True,
        "Send the frame outputs that are ready together (a batch's) in one FrameOutputs message "
        "on streams that ask for it (metadata rnnstream-pack-outputs: 1); off: one message each.",
    )
    keepalive_time: float = setting(
        30.0, "Seconds between keepalive pings on idle connections.", above=0
    )
    keepalive_timeout: float = setting(
        10.0, "Seconds to wait for a ping ack before dropping.", above=0
    )
    grace: float = setting(
        10.0, "Seconds a SIGTERM/SIGINT shutdown may take before closing.", minimum=0
    )
