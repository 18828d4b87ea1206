"""Exactly-once chunks over the wire: racing clients, and a replay after the reply was lost in a restart.
The offset and replay rules themselves are tested in process in tests/core."""

from __future__ import annotations

import numpy as np

from tests.helpers import TOL, Server, logits_of, race, state_of


def test_two_clients_racing_on_one_session(server: Server, reference) -> None:  # type: ignore[no-untyped-def]
    """Both feed the same sequence with expected offsets: every offset is applied exactly once."""
    tokens = [int(t) for t in np.random.default_rng(9).integers(0, 98, 400)]
    chunk = 5
    with server.client() as c:
        sid = c.create("lstm-lm").session_id
    applied, _ = race([server.target, server.target], sid, tokens, chunk)
    assert sorted(applied) == list(range(0, len(tokens), chunk))  # each offset once, none twice
    with server.client() as c:
        final = c.get(sid, include_state=True)
    _, want_state = reference("lstm-lm").run(np.array(tokens))
    assert final.offset == len(tokens)
    for got, want in zip(state_of(final), want_state):
        assert np.abs(got - want).max() <= TOL


def test_replay_works_after_the_reply_was_lost_in_a_restart(start_server, reference) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    with server.client() as c:
        s = c.create("lstm-lm").session_id
        sent = c.step(s, text="while True:", expected_offset=0, return_logits=True)
    server.kill()
    again = start_server(server.store)
    with again.client() as c:
        retry = c.step(s, text="while True:", expected_offset=0, return_logits=True)
    assert retry.replayed and retry.offset == 11 and retry.logits == sent.logits
    assert np.abs(logits_of(retry) - reference("lstm-lm").run(np.array(c_tokens("while True:")))[0]).max() <= TOL


def c_tokens(text: str) -> list[int]:
    from training.data import encode

    return [int(i) for i in encode(text)]
