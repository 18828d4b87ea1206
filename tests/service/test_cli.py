"""`recur client` as a user runs it, against real server processes: export, import, sessions and
watch; step's --top-k (the tokens' text) and --features (.npy and CSV); and every error as exactly
one line on stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import Server, free_port

ROOT = Path(__file__).resolve().parents[2]


def recur(target: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recur.cli", "client", "--target", target, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def ok(target: str, *args: str) -> str:
    out = recur(target, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def fails(target: str, *args: str, words: tuple[str, ...] = ()) -> str:
    """The command exits non-zero with exactly one line on stderr (holding each of `words`)."""
    out = recur(target, *args)
    lines = out.stderr.splitlines()
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert lines[0].startswith("recur: error: ") and "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server over the shipped models (digits takes 8 features a step)."""
    s = Server(ROOT / "models", "memory:").start()
    yield s
    s.kill()


def test_errors_are_one_line(server: Server, tmp_path: Path) -> None:
    t = server.target
    ok(t, "create", "lstm-lm", "--session-id", "s1")
    ok(t, "create", "lstm-classifier", "--session-id", "c1")
    fails(t, "get", "nobody", words=("NOT_FOUND: session 'nobody' does not exist",))
    fails(t, "step", "nobody", "abc", words=("NOT_FOUND",))
    fails(t, "stream", "s1", str(tmp_path / "missing.txt"), words=("missing.txt", "No such file"))
    fails(t, "import", str(tmp_path / "missing.blob"), words=("missing.blob",))
    (tmp_path / "junk.blob").write_bytes(b"junk")
    fails(t, "import", str(tmp_path / "junk.blob"), words=("INVALID_ARGUMENT", "not a valid session blob"))
    fails(t, "export", "nobody", str(tmp_path / "x.blob"), words=("NOT_FOUND",))
    fails(t, "export", "s1", str(tmp_path / "no-dir" / "x.blob"), words=("No such file",))
    fails(t, "step", "s1", words=("text or --features",))
    (tmp_path / "bad.csv").write_text("1,2,x\n")
    fails(t, "step", "c1", "--features", str(tmp_path / "bad.csv"), words=("bad.csv", "CSV"))
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    fails(t, "step", "c1", "--features", str(tmp_path / "bad.npy"), words=("bad.npy",))
    np.save(tmp_path / "nan.npy", np.full((2, 8), np.nan, dtype=np.float32))
    fails(t, "step", "c1", "--features", str(tmp_path / "nan.npy"), words=("not finite",))
    np.save(tmp_path / "wide.npy", np.zeros((2, 5), dtype=np.float32))
    fails(t, "step", "c1", "--features", str(tmp_path / "wide.npy"), words=("INVALID_ARGUMENT",))
    fails(t, "step", "c1", "--features", str(tmp_path / "none.csv"), words=("none.csv",))
    fails(t, "sessions", "--page-size", "-1", words=("INVALID_ARGUMENT", "page_size"))
    fails(f"127.0.0.1:{free_port()}", "models", words=("UNAVAILABLE",))
    fails(f"127.0.0.1:{free_port()}", "watch", "--once", words=("UNAVAILABLE",))


def test_top_k_shows_the_tokens_text(server: Server) -> None:
    t = server.target
    ok(t, "create", "lstm-lm", "--session-id", "lm")
    out = ok(t, "step", "lm", "def f", "--top-k", "3").splitlines()
    assert out[-1] == "offset 5" and len(out) == 6
    for line in out[:-1]:
        top = re.findall(r"('(?:[^'\\]|\\.)*'|\"[^\"]*\"):(\d\.\d\d)", line)
        assert len(top) == 3, line  # each as its text, quoted, with its probability
    ok(t, "create", "gru-tagger", "--session-id", "tag")
    out = ok(t, "step", "tag", "x = 1", "--top-k", "2").splitlines()
    assert len(out) == 6 and all(len(line.split()) == 3 for line in out[:-1]), out  # label, then 2 label:prob


def test_features_from_npy_and_csv(shipped: Server, tmp_path: Path) -> None:
    t = shipped.target
    x = np.random.default_rng(3).normal(size=(6, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",", fmt="%.9g")
    outs = []
    for name in ("x.npy", "x.csv"):
        sid = name.replace(".", "-")
        ok(t, "create", "digits", "--session-id", sid)
        outs.append(ok(t, "step", sid, "--features", str(tmp_path / name), "--top-k", "2").splitlines())
    assert outs[0] == outs[1] and outs[0][-1] == "offset 6" and len(outs[0]) == 7
    assert all(line.split()[0] in "0123456789" for line in outs[0][:-1]), outs[0]
    ok(t, "create", "digits", "--session-id", "last")
    final = ok(t, "step", "last", "--features", str(tmp_path / "x.csv"), "--final-only").splitlines()
    assert final == [outs[0][-2].split()[0], "offset 6"]


def test_export_import_and_sessions(start_server: Callable[..., Server], tmp_path: Path) -> None:
    a, b = start_server(), start_server(store="memory:")
    ok(a.target, "create", "lstm-lm", "--session-id", "mover", "--ttl", "600")
    ok(a.target, "step", "mover", "hello")
    ok(a.target, "create", "gru-tagger", "--session-id", "other")
    blob = tmp_path / "mover.session"
    assert "exported mover" in ok(a.target, "export", "mover", str(blob))
    assert "offset 5" in ok(b.target, "import", str(blob))
    assert "offset 5" in ok(b.target, "import", str(blob), "--session-id", "mover2")
    fails(b.target, "import", str(blob), words=("ALREADY_EXISTS", "mover"))
    listed = ok(a.target, "sessions").splitlines()
    assert [line.split()[1] for line in listed[:-1]] == ["mover", "other"] and listed[-1] == "2 sessions"
    assert ok(a.target, "sessions", "--model", "gru-tagger").splitlines()[-1] == "1 session"
    assert "session mover2  model lstm-lm v1  offset 5" in ok(b.target, "sessions", "--page-size", "1")
    assert "offset 8" in ok(b.target, "step", "mover2", "abc")


def test_watch_once(start_server: Callable[..., Server]) -> None:
    server = start_server()  # its own: the screen counts every session it holds
    t = server.target
    ok(t, "create", "rnn-lm", "--session-id", "w1")
    ok(t, "create", "rnn-lm", "--session-id", "w2")
    screen = ok(t, "watch", "--once", "--metrics-port", str(free_port()))
    rows = {line.split()[0]: line.split() for line in screen.splitlines() if line.endswith(tuple("0123456789"))}
    assert rows["rnn-lm"][-1] == "2" and rows["gru-tagger"][-1] == "0", screen
    assert "live sessions (yours): 2" in screen and "metrics: not available" in screen
    assert "metrics" not in ok(t, "watch", "--once", "--metrics-port", "0")
    port = next((line.split()[-1] for line in server.log if line.startswith("metrics on port ")), None)
    if port is not None:  # a server with a /metrics endpoint: its counters on the screen
        screen = ok(t, "watch", "--once", "--metrics-port", port)
        assert f"metrics (http://127.0.0.1:{port}/metrics):" in screen and "recur_" in screen, screen
