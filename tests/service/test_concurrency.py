"""Many sessions at once on one server, each checked against its own one-pass reference."""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from recur.v1 import recur_pb2 as pb
from tests.helpers import TOL, Server, logits_of, state_of


def test_a_hundred_sessions_multiplexed_on_one_stream(server: Server, reference) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(13)
    models = ["lstm-lm", "gru-lm", "rnn-lm", "gru-tagger"]
    with server.client() as c:
        sessions = [(c.create(models[i % 4]).session_id, models[i % 4], rng.integers(0, 98, 64)) for i in range(100)]
        requests: queue.Queue = queue.Queue()
        for chunk in range(4):  # interleave every session's chunks on the one stream
            for sid, _, toks in sessions:
                requests.put(pb.StepRequest(session_id=sid, tokens=[int(t) for t in toks[chunk * 16 : chunk * 16 + 16]],
                                            expected_offset=chunk * 16, return_logits=True, return_state=True))
        requests.put(None)
        replies: dict[str, list] = {}
        for r in c.stub.Stream(iter(requests.get, None)):
            assert not r.HasField("status"), r.status.message
            replies.setdefault(r.session_id, []).append(r)
    for sid, model, toks in sessions:
        got = replies[sid]
        assert [r.offset for r in got] == [16, 32, 48, 64]
        want_logits, want_state = reference(model).run(toks)
        assert np.abs(np.concatenate([logits_of(r) for r in got]) - want_logits).max() <= TOL
        for a, b in zip(state_of(got[-1]), want_state):
            assert np.abs(a - b).max() <= TOL


def test_a_hundred_clients_stepping_at_once(server: Server, reference) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(14)
    seqs = [rng.integers(0, 98, 40) for _ in range(100)]

    def one(toks: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        with server.client() as c:
            sid = c.create("gru-lm").session_id
            rs = [c.step(sid, tokens=[int(t) for t in toks[i : i + 10]], expected_offset=i, return_logits=True,
                         return_state=True) for i in range(0, 40, 10)]
        return np.concatenate([logits_of(r) for r in rs]), state_of(rs[-1])

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, seqs))
    for toks, (logits, state) in zip(seqs, results):
        want_logits, want_state = reference("gru-lm").run(toks)
        assert np.abs(logits - want_logits).max() <= TOL
        assert np.abs(state[0] - want_state[0]).max() <= TOL
