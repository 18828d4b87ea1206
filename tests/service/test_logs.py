"""--log-format json: one JSON object a line, with the lifecycle events and their context."""

from __future__ import annotations

import json
import logging
import time

from service.logs import JsonFormatter, TextFormatter, session_hash
from tests.helpers import Server

MODEL = "lstm-lm"


def _json_lines(server: Server, event: str, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in list(server.log) if line.startswith("{")]
        if any(rec["event"] == event for rec in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_json_lines_carry_the_lifecycle_and_hash_session_ids(tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = Server(tiny_models, "memory:", log_args=["--log-level", "INFO", "--log-format", "json"])
    try:
        server.start()
        with server.client() as c:
            c.create(MODEL, session_id="secret-session")
            c.fork("secret-session", new_session_id="secret-fork")
            c.step("secret-fork", tokens=[1, 2])
            c.import_session(c.export_session("secret-fork"), session_id="secret-import")
            c.delete("secret-session")
        lines = _json_lines(server, "session deleted")
        # every log line is JSON (the two printed port lines aside)
        others = [line for line in server.log if not line.startswith("{") and " on port " not in line]
        assert others == []
        by_event = {rec["event"]: rec for rec in lines}
        created, forked, deleted = (by_event[f"session {e}"] for e in ("created", "forked", "deleted"))
        for rec in (created, forked, deleted):
            assert {"timestamp", "level", "event", "logger"} <= rec.keys()
            assert rec["level"] == "info" and rec["logger"] == "service.core.sessions" and rec["tenant"] == "default"
            assert rec["timestamp"].endswith("Z")
            assert "session" not in rec  # only at debug level
        assert created["model"] == MODEL and created["version"] == 1
        assert created["session_hash"] == deleted["session_hash"] == session_hash("secret-session")
        assert forked["session_hash"] == session_hash("secret-fork")
        imported = by_event["session imported"]
        assert imported["session_hash"] == session_hash("secret-import") and imported["offset"] == 2
        assert not any("secret-" in line for line in server.log)  # an import too: ids at DEBUG only
    finally:
        server.kill()


def test_debug_level_names_the_session(tiny_models) -> None:  # type: ignore[no-untyped-def]
    server = Server(tiny_models, "memory:", log_args=["--log-level", "DEBUG", "--log-format", "json"])
    try:
        server.start()
        with server.client() as c:
            c.create(MODEL, session_id="s1")
        created = next(rec for rec in _json_lines(server, "session created") if rec["event"] == "session created")
        assert created["session"] == "s1" and created["level"] == "info"
    finally:
        server.kill()


def _record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("service.transport.servicer", logging.WARNING, __file__, 1, "call failed after %d ms",
                            (12,), None)
    rec.__dict__.update(extra)
    return rec


def test_the_formatters_carry_rpc_code_and_duration() -> None:
    out = json.loads(JsonFormatter().format(_record(rpc="Step", code="NOT_FOUND", duration_ms=12.5, session="x",
                                                    model="m", tenant="t")))
    assert out["event"] == "call failed after 12 ms" and out["level"] == "warning"
    assert (out["rpc"], out["code"], out["duration_ms"], out["model"], out["tenant"]) == ("Step", "NOT_FOUND", 12.5,
                                                                                          "m", "t")
    assert out["session_hash"] == session_hash("x") and "session" not in out
    text = TextFormatter().format(_record(rpc="Step", code="NOT_FOUND"))
    assert text.endswith("WARNING service.transport.servicer: call failed after 12 ms rpc=Step code=NOT_FOUND")
