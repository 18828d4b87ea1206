"""`recur client ...`: stream text, generate, and inspect sessions from the shell."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from recur.client import API_KEY_ENV, ChunkRefused, RecurClient

# The client's TLS variables. The server's own are RECUR_TLS_CERT/RECUR_TLS_KEY/RECUR_TLS_CLIENT_CA,
# so a client (or health check) running beside a server never mistakes the server's files for its own.
TLS_ENV = {"tls_ca": "RECUR_TLS_CA", "tls_cert": "RECUR_TLS_CLIENT_CERT", "tls_key": "RECUR_TLS_CLIENT_KEY",
           "tls_server_name": "RECUR_TLS_SERVER_NAME"}


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, each defaulting to its variable."""
    env = os.environ
    p.add_argument("--tls", action="store_true", default=env.get("RECUR_TLS", "") not in ("", "0", "false", "no"),
                   help="dial TLS, verifying the server with the system's roots (implied by --tls-ca) [RECUR_TLS]")
    p.add_argument("--tls-ca", default=env.get(TLS_ENV["tls_ca"], ""),
                   help=f"PEM CA bundle that signed the server's certificate; dials TLS [{TLS_ENV['tls_ca']}]")
    p.add_argument("--tls-cert", default=env.get(TLS_ENV["tls_cert"], ""),
                   help=f"PEM client certificate, for servers that require one (mutual TLS) [{TLS_ENV['tls_cert']}]")
    p.add_argument("--tls-key", default=env.get(TLS_ENV["tls_key"], ""),
                   help=f"PEM private key of --tls-cert [{TLS_ENV['tls_key']}]")
    p.add_argument("--tls-server-name", default=env.get(TLS_ENV["tls_server_name"], ""),
                   help="the name to check the server's certificate against, when not the target's host "
                   f"[{TLS_ENV['tls_server_name']}]")


def tls_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of RecurClient/open_channel that add_tls_arguments filled."""
    return {"tls": args.tls, "tls_ca": args.tls_ca or None, "tls_cert": args.tls_cert or None,
            "tls_key": args.tls_key or None, "tls_server_name": args.tls_server_name or None}


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("RECUR_TARGET", "localhost:50051"),
                   help="server address [RECUR_TARGET; default localhost:50051]")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, ""),
                   help=f"API key, sent as 'authorization: Bearer KEY' [{API_KEY_ENV}; prefer the variable: "
                   "a flag shows in the process list]")
    add_tls_arguments(p)
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("models", help="list the models the server has loaded")
    c = sub.add_parser("create", help="create a session and print its id")
    c.add_argument("model")
    c.add_argument("--version", type=int, default=0, help="model version (0: latest)")
    c.add_argument("--session-id", default="", help="choose the id (default: the server makes one)")
    c.add_argument("--ttl", type=int, default=0, help="idle seconds before it expires (0: server default)")
    for name, text in (("get", "show a session"), ("delete", "delete a session")):
        s = sub.add_parser(name, help=text)
        s.add_argument("session_id")
    f = sub.add_parser("fork", help="copy a session's state and offset under a new id")
    f.add_argument("session_id")
    f.add_argument("--new-session-id", default="")
    st = sub.add_parser("step", help="feed text (or --features) to a session; prints each step's prediction")
    st.add_argument("session_id")
    st.add_argument("text", nargs="?", default="", help="text, for a model with a vocabulary")
    st.add_argument("--features", default="", metavar="FILE",
                    help="a feature model's input: FILE.npy (float [steps, width]) or a CSV file (a row a step)")
    st.add_argument("--top-k", type=int, default=0, help="also show each step's k most likely tokens or labels")
    st.add_argument("--final-only", action="store_true", help="only the last step's output (many-to-one)")
    sm = sub.add_parser("stream", help="stream a file (or - for stdin) through a session in chunks, resuming "
                        "after dropped connections")
    sm.add_argument("session_id")
    sm.add_argument("file")
    sm.add_argument("--chunk", type=int, default=256, help="characters per chunk")
    g = sub.add_parser("generate", help="sample text from a session (after an optional prompt)")
    g.add_argument("session_id")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop after this string (repeatable)")
    ex = sub.add_parser("export", help="write a session (offset, state, replay record, TTL) to a file")
    ex.add_argument("session_id")
    ex.add_argument("file")
    im = sub.add_parser("import", help="recreate an exported session on this server, at the same offset")
    im.add_argument("file")
    im.add_argument("--session-id", default="", help="the id here (default: the exported id)")
    im.add_argument("--force", action="store_true", help="import even if this server's model has another sha256")
    ls = sub.add_parser("sessions", help="list your live sessions, ordered by id")
    ls.add_argument("--model", default="", help="only this model's sessions")
    ls.add_argument("--page-size", type=int, default=0, help="sessions a call (0: the server's default)")
    w = sub.add_parser("watch", help="a status screen refreshed every second: models, sessions, key counters")
    w.add_argument("--once", action="store_true", help="print one screen and exit")
    w.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    w.add_argument("--metrics-port", type=int, default=int(os.environ.get("RECUR_METRICS_PORT", "9464")),
                   help="the server's /metrics port, on the target's host (0: none) [RECUR_METRICS_PORT]")
    w.add_argument("--metrics-url", default="", help="the /metrics address, when not the target's host and port")


def _session_line(s: object) -> str:
    return (f"session {s.session_id}  model {s.model} v{s.version}  offset {s.offset}  "  # type: ignore[attr-defined]
            f"expires {s.expires_at.ToJsonString()}")  # type: ignore[attr-defined]


def _fail(message: str) -> int:
    """Every error of `recur client`: one line on stderr, exit status 1, never a traceback."""
    print(f"recur: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def run_client(args: argparse.Namespace) -> int:
    try:
        with RecurClient(args.target, api_key=args.api_key or None, **tls_options(args)) as client:
            return _run(client, args)
    except grpc.RpcError as e:
        return _fail(f"{e.code().name}: {e.details()}")
    except OSError as e:  # a file to read or write
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e.__class__.__name__}")
    except (ChunkRefused, ValueError) as e:  # a refused chunk; an unreadable TLS or features file
        return _fail(str(e) or e.__class__.__name__)
    except KeyboardInterrupt:
        return 130


def read_features(path: str) -> np.ndarray:
    """A features file as float32 [steps, width]: .npy, else CSV (a row a step, no header)."""
    if path.lower().endswith(".npy"):
        with open(path, "rb") as f:
            try:
                a = np.load(f, allow_pickle=False)
            except (ValueError, EOFError) as e:
                raise ValueError(f"{path}: not a .npy array ({e})") from None
    else:
        with open(path, encoding="utf-8") as f:
            try:
                a = np.loadtxt(f, delimiter=",", ndmin=2, dtype=np.float32)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a CSV of numbers, a row a step ({e})") from None
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.size == 0 or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{path}: features must be numbers of shape [steps, width], not {a.dtype} {list(a.shape)}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{path}: features hold values that are not finite")
    return a


def _names(client: RecurClient, session_id: str) -> list[str]:
    """What a step's output ids name for the session's model: labels, or the vocabulary's tokens."""
    s = client.get(session_id)
    for m in client.models():
        if m.name == s.model and m.version == s.version:
            return list(m.labels) or list(m.vocabulary)
    return []


def _step(client: RecurClient, args: argparse.Namespace) -> None:
    if bool(args.text) == bool(args.features):
        raise ValueError("give the text or --features FILE (one of them)")
    names = _names(client, args.session_id) if args.top_k else []
    data: dict[str, Any] = {"text": args.text} if args.text else \
        {"features": np.ascontiguousarray(read_features(args.features), dtype="<f4").tobytes()}
    r = client.step(args.session_id, top_k=args.top_k, final_only=args.final_only, **data)
    for o in r.outputs:
        shown = o.label or repr(o.text)
        # a label as it is; a token as its text, quoted (repr), so a space or a newline shows
        top = " ".join(f"{(names[i] if o.label else repr(names[i])) if 0 <= i < len(names) else i}:{p:.2f}"
                       for i, p in zip(o.top_ids, o.top_probs))
        print(f"{shown}  {top}".rstrip())
    print(f"offset {r.offset}")


def _metrics_url(args: argparse.Namespace) -> str:
    if args.metrics_url:
        return str(args.metrics_url)
    if not args.metrics_port:
        return ""
    host = args.target.rsplit(":", 1)[0] if ":" in args.target else args.target
    host = host.split("://")[-1] or "localhost"
    return f"http://{host}:{args.metrics_port}/metrics"


def read_counters(url: str, timeout: float = 1.0) -> dict[str, float]:
    """The recur_* counters (and gauges) of a Prometheus text page, summed over their labels."""
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        text = reply.read(4 * 1024 * 1024).decode("utf-8", "replace")
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1).endswith(("_bucket", "_created")):
            continue
        try:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        except ValueError:
            continue
    return out


_SAMPLE = re.compile(r"(recur_[A-Za-z0-9_:]*)(?:\{.*\})?\s+(\S+)")  # name{labels} value [timestamp]
WATCH_COUNTERS = 12  # lines of counters a screen shows
WATCH_SESSIONS = 10_000  # sessions a screen counts at most


def watch_screen(client: RecurClient, args: argparse.Namespace) -> str:
    """One screen of `recur client watch`."""
    lines = [f"recur at {args.target}  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC", ""]
    live: dict[tuple[str, int], int] = {}
    n = 0
    for s in client.list_sessions(limit=WATCH_SESSIONS):
        live[(s.model, s.version)] = live.get((s.model, s.version), 0) + 1
        n += 1
    lines.append(f"{'MODEL':<24} {'VERSION':>7}  {'HEAD':<10} {'INPUT':<9} {'SESSIONS':>8}")
    for m in client.models():
        lines.append(f"{m.name:<24} {'v' + str(m.version):>7}  {m.head:<10} {m.input_kind:<9} "
                     f"{live.get((m.name, m.version), 0):>8}")
    more = "+" if n >= WATCH_SESSIONS else ""
    lines += ["", f"live sessions (yours): {n}{more}"]
    url = _metrics_url(args)
    if url:
        try:
            counters = read_counters(url)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e.__class__.__name__
            lines.append(f"metrics: not available at {url} ({reason})")
        else:
            lines.append(f"metrics ({url}):")
            key = sorted(counters, key=lambda n: (not n.endswith("_total"), "_process_" in n, n))  # counters first
            for name in key[:WATCH_COUNTERS]:
                lines.append(f"  {name:<48} {counters[name]:>14g}")
            if not counters:
                lines.append("  (no recur_* metrics)")
    return "\n".join(lines)


def _watch(client: RecurClient, args: argparse.Namespace) -> int:
    if args.once:
        print(watch_screen(client, args))
        return 0
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    while True:
        try:
            screen = watch_screen(client, args)
        except grpc.RpcError as e:
            screen = f"recur at {args.target}: {e.code().name}: {' '.join((e.details() or '').split())}"
        sys.stdout.write(clear + screen + "\n")
        sys.stdout.flush()
        time.sleep(max(0.1, args.interval))


def _run(client: RecurClient, args: argparse.Namespace) -> int:
    a = args.action
    if a == "models":
        for m in client.models():
            extra = f"labels {list(m.labels)}" if m.labels else f"vocabulary {len(m.vocabulary)}"
            print(f"{m.name} v{m.version}: {m.cell} x{m.layers} ({m.hidden_size}) {m.head} head, "
                  f"{m.input_kind} input, {extra}")
    elif a == "create":
        print(client.create(args.model, args.version, args.session_id, args.ttl).session_id)
    elif a == "get":
        print(_session_line(client.get(args.session_id)))
    elif a == "delete":
        client.delete(args.session_id)
        print(f"deleted {args.session_id}")
    elif a == "fork":
        print(client.fork(args.session_id, args.new_session_id).session_id)
    elif a == "step":
        _step(client, args)
    elif a == "export":
        data = client.export_session(args.session_id)
        Path(args.file).write_bytes(data)
        print(f"exported {args.session_id} to {args.file} ({len(data)} bytes)")
    elif a == "import":
        s = client.import_session(Path(args.file).read_bytes(), args.session_id, args.force)
        print(f"imported {_session_line(s)}")
    elif a == "sessions":
        n = 0
        for s in client.list_sessions(args.model, args.page_size):
            print(_session_line(s))
            n += 1
        print(f"{n} session{'' if n == 1 else 's'}")
    elif a == "watch":
        return _watch(client, args)
    elif a == "stream":
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        model = client.get(args.session_id).model
        info = next(m for m in client.models() if m.name == model)
        ids = {t: i for i, t in enumerate(info.vocabulary)}
        tokens = [ids.get(ch, info.unk_id) for ch in text]
        replies = client.stream_sequence(args.session_id, tokens, args.chunk)
        offset = replies[-1].offset if replies else "-"
        print(f"streamed {len(tokens)} tokens in {len(replies)} chunks; offset {offset}")
    elif a == "generate":
        fields: dict = dict(prompt=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, stop=args.stop)
        if args.seed is not None:
            fields["seed"] = args.seed
        last = None
        for last in client.generate(args.session_id, **fields):
            sys.stdout.write(last.text)
            sys.stdout.flush()
        print(f"\n[{last.finish_reason if last else 'nothing generated'}; offset {last.offset if last else '-'}]")
    return 0
