"""Log lines from a real server process: one per event, JSON with --log-format json, with the
session id and model on session events."""

from __future__ import annotations

import json
import re
import signal

import numpy as np
import pytest

from rnnstream import Client
from tests.server_process import ServerProcess


def _session_events(
    server: ServerProcess,
) -> tuple[str, str]:
    with Client(server.target) as client:
        session = client.open("gru")
        session.step(np.zeros(16, np.float32))
        kept = client.open("gru")
        session.end()
        kept.step(np.zeros(16, np.float32))
        # Resume by id on the same server: a logged event too.
        client.open("gru", kept.id, resume=True)
    return session.id, kept.id


def test_json_lines_carry_session_and_model() -> None:
    server = ServerProcess("--models", "gru", "--log-format", "json", "--session-ttl", "0.5")
    try:
        ended_id, expired_id = _session_events(server)
        server.wait_for_line(re.compile(r"session ended \(expired\)"), 10)
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        server.close()
    records = []
    for line in server.lines:
        record = json.loads(line)  # every line is one JSON object: nothing else on stderr
        assert {"time", "level", "logger", "message"} <= record.keys()
        records.append(record)
    by_message: dict[str, list[dict[str, str]]] = {}
    for record in records:
        by_message.setdefault(record["message"], []).append(record)
    assert any(m.startswith("serving ['gru'] on 127.0.0.1:") for m in by_message)
    assert any(m.startswith("shutting down within") for m in by_message)
    opened = by_message["session opened"]
    assert {(r["session_id"], r["model"]) for r in opened} == {
        (ended_id, "gru"),
        (expired_id, "gru"),
    }
    (client_end,) = by_message["session ended (client)"]
    assert (client_end["session_id"], client_end["model"]) == (ended_id, "gru")
    (expiry,) = by_message["session ended (expired)"]
    assert (expiry["session_id"], expiry["model"]) == (expired_id, "gru")
    (resumed,) = by_message["session resumed"]
    assert (resumed["session_id"], resumed["model"]) == (expired_id, "gru")
    # Events without a session carry no session fields.
    assert all("session_id" not in r for r in by_message["shutting down within 10.0 s"])


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_text_lines_and_level(level: str) -> None:
    server = ServerProcess("--models", "gru", "--log-level", level)
    try:
        ended_id, _ = _session_events(server)
        server.signal(signal.SIGINT)
        assert server.wait(30) == 0
    finally:
        server.close()
    opened = [line for line in server.lines if "session opened" in line]
    if level == "WARNING":
        assert opened == []
        return
    assert any(line.endswith(f"session_id={ended_id} model=gru") for line in opened)
    for line in server.lines:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ rnnstream\.", line), line
