"""Exactly-once chunks: offsets, replayed retries, racing clients."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from recur.client import RecurClient
from tests.helpers import TOL, Server, logits_of, race, refused, state_of


def test_a_retried_chunk_is_replayed_not_applied_again(client: RecurClient) -> None:
    s = client.create("lstm-lm").session_id
    client.step(s, text="import ", expected_offset=0)
    first = client.step(s, text="os", expected_offset=7, top_k=2, return_logits=True)
    before = client.get(s, include_state=True)
    again = client.step(s, text="os", expected_offset=7, top_k=2, return_logits=True)
    after = client.get(s, include_state=True)
    assert (first.replayed, again.replayed) == (False, True)
    assert again.offset == first.offset == after.offset == 9 and again.start_offset == 7
    assert list(again.outputs) == list(first.outputs) and again.logits == first.logits
    assert [t.data for t in after.state] == [t.data for t in before.state]


@pytest.mark.parametrize("offset", [0, 3, 10, 999])
def test_stale_and_future_offsets_are_refused_with_the_actual_offset(client: RecurClient, offset: int) -> None:
    s = client.create("gru-lm").session_id
    client.step(s, text="abcde", expected_offset=0)
    client.step(s, text="fgh", expected_offset=5)  # offset 8; its retry (at 5, "fgh") would replay
    before = client.get(s, include_state=True)
    message = refused(lambda: client.step(s, text="zz", expected_offset=offset), grpc.StatusCode.FAILED_PRECONDITION)
    assert "is at offset 8" in message
    after = client.get(s, include_state=True)
    assert after.offset == 8 and [t.data for t in after.state] == [t.data for t in before.state]


def test_same_offset_different_content_is_refused(client: RecurClient) -> None:
    s = client.create("gru-lm").session_id
    client.step(s, text="abc", expected_offset=0)
    message = refused(lambda: client.step(s, text="abd", expected_offset=0), grpc.StatusCode.FAILED_PRECONDITION)
    assert "is at offset 3, not 0" in message


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
