"""Nothing acknowledged is lost: SIGKILL and restart on the same SQLite file, and a client that
reconnects by itself."""

from __future__ import annotations

import threading
import time

import numpy as np

from tests.helpers import TOL, Server, free_port, logits_of, state_of


def test_sigkill_after_acknowledged_chunks_loses_nothing(start_server, reference) -> None:  # type: ignore[no-untyped-def]
    tokens = [int(t) for t in np.random.default_rng(21).integers(0, 98, 300)]
    server = start_server()
    with server.client() as c:
        sids = [c.create(m).session_id for m in ("lstm-lm", "gru-lm", "rnn-lm")]
        first = {s: c.step(s, tokens=tokens[:170], expected_offset=0, return_logits=True) for s in sids}
    server.proc.kill()  # type: ignore[union-attr]
    server.proc.wait()  # type: ignore[union-attr]
    again = start_server(server.store)
    with again.client() as c:
        for sid, model in zip(sids, ("lstm-lm", "gru-lm", "rnn-lm")):
            assert c.get(sid).offset == 170
            rest = c.step(sid, tokens=tokens[170:], expected_offset=170, return_logits=True, return_state=True)
            want_logits, want_state = reference(model).run(np.array(tokens))
            got = np.concatenate([logits_of(first[sid]), logits_of(rest)])
            assert np.abs(got - want_logits).max() <= TOL
            for a, b in zip(state_of(rest), want_state):
                assert np.abs(a - b).max() <= TOL


def test_the_client_resumes_across_a_server_restart(tiny_models, tmp_path, reference, caplog) -> None:  # type: ignore[no-untyped-def]
    """stream_sequence keeps going while the server is killed and restarted on the same port."""
    port = free_port()
    server = Server(tiny_models, f"sqlite:{tmp_path / 'r.db'}", ["--port", str(port)]).start()
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, 98, 12000)]
    try:
        with server.client() as c:
            sid = c.create("lstm-lm").session_id
            result: dict = {}

            def run() -> None:
                result["replies"] = c.stream_sequence(sid, tokens, chunk=8, retry_for=60, return_logits=True)

            t = threading.Thread(target=run)
            t.start()
            deadline = time.monotonic() + 60
            while c.get(sid).offset < 800:
                assert time.monotonic() < deadline and t.is_alive(), "the stream made no progress"
                time.sleep(0.02)
            server.kill()
            server.start()
            t.join(120)
            replies = result["replies"]
            assert len(replies) == 1500 and [r.start_offset for r in replies] == list(range(0, 12000, 8))
            assert "resuming at offset" in caplog.text  # the connection really dropped mid-sequence
            want_logits, want_state = reference("lstm-lm").run(np.array(tokens))
            assert np.abs(np.concatenate([logits_of(r) for r in replies]) - want_logits).max() <= TOL
            final = c.get(sid, include_state=True)
            assert final.offset == 12000
            for a, b in zip(state_of(final), want_state):
                assert np.abs(a - b).max() <= TOL
    finally:
        server.kill()
