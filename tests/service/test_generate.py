"""One-to-many: generation is reproducible, stops where asked, advances the session, survives a cancel."""

from __future__ import annotations

import numpy as np

from recur.client import RecurClient
from tests.helpers import TOL, logits_of, state_of
from training.data import encode


def _gen(c: RecurClient, sid: str, **kw: object) -> list:
    return list(c.generate(sid, **kw))


def test_same_seed_same_state_same_tokens(client: RecurClient) -> None:
    root = client.create("lstm-lm").session_id
    client.step(root, text="class A:\n")
    a, b, other = (client.fork(root).session_id for _ in range(3))
    ta = _gen(client, a, max_tokens=40, temperature=1.0, seed=7)
    tb = _gen(client, b, max_tokens=40, temperature=1.0, seed=7)
    tc = _gen(client, other, max_tokens=40, temperature=1.0, seed=8)
    assert [t.token for t in ta] == [t.token for t in tb]
    assert [t.token for t in ta] != [t.token for t in tc]
    assert [t.offset for t in ta] == list(range(10, 50))
    assert ta[-1].done and ta[-1].finish_reason == "max_tokens" and not any(t.done for t in ta[:-1])


def test_greedy_top_k_and_top_p(client: RecurClient) -> None:
    s = client.create("gru-lm").session_id
    client.step(s, text="x")
    f1, f2 = client.fork(s).session_id, client.fork(s).session_id
    greedy = _gen(client, f1, max_tokens=10, temperature=0)
    top1 = _gen(client, f2, max_tokens=10, temperature=1.5, top_k=1, seed=3)
    assert [t.token for t in greedy] == [t.token for t in top1]  # top-1 sampling is greedy
    nucleus = _gen(client, s, max_tokens=10, temperature=1.0, top_p=1e-6, seed=4)
    assert [t.token for t in nucleus] == [t.token for t in greedy]  # so is a vanishing nucleus


def test_stop_strings_end_generation(client: RecurClient) -> None:
    s = client.create("lstm-lm").session_id
    client.step(s, text="a")
    probe = client.fork(s).session_id
    text = "".join(t.text for t in _gen(client, probe, max_tokens=60, temperature=1.0, seed=11))
    stop = text[5:7]  # a string this seed is known to produce
    out = _gen(client, s, max_tokens=60, temperature=1.0, seed=11, stop=[stop, "never-made"])
    made = "".join(t.text for t in out)
    assert made.endswith(stop) and made == text[: text.index(stop) + len(stop)]
    assert out[-1].done and out[-1].finish_reason == "stop"
    assert client.get(s).offset == 1 + len(out)


def test_a_step_continues_after_generation(client: RecurClient, reference) -> None:  # type: ignore[no-untyped-def]
    s = client.create("rnn-lm").session_id
    out = _gen(client, s, prompt="for i in", max_tokens=12, temperature=0.9, seed=2)
    after = client.step(s, text=" range", return_logits=True, return_state=True)
    sequence = list(encode("for i in")) + [t.token for t in out] + list(encode(" range"))
    want_logits, want_state = reference("rnn-lm").run(np.array(sequence))
    assert after.start_offset == 20 and after.offset == 26
    assert np.abs(logits_of(after) - want_logits[20:]).max() <= TOL
    assert np.abs(state_of(after)[0] - want_state[0]).max() <= TOL


def test_a_cancelled_generation_leaves_the_session_consistent(client: RecurClient, reference) -> None:  # type: ignore[no-untyped-def]
    s = client.create("lstm-lm").session_id
    client.step(s, text="def ")
    twin = client.fork(s).session_id
    call = client.generate(s, max_tokens=2000, temperature=1.0, seed=5)
    got = [next(call) for _ in range(5)]
    call.cancel()
    offset = client.get(s).offset
    assert offset >= 4 + len(got) and offset < 4 + 2000
    # Replay the same sampling on the twin up to that offset: the states must agree exactly.
    same = _gen(client, twin, max_tokens=offset - 4, temperature=1.0, seed=5)
    assert [t.token for t in same[:5]] == [t.token for t in got]
    a, b = client.get(s, include_state=True), client.get(twin, include_state=True)
    assert a.offset == b.offset
    for x, y in zip(state_of(a), state_of(b)):
        assert np.abs(x - y).max() <= TOL
    client.step(s, text="x")  # the session is not locked by the cancelled call
