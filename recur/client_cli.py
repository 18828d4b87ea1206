"""`recur client ...`: stream text, generate, and inspect sessions from the shell."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

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
    st = sub.add_parser("step", help="feed text to a session; prints each step's prediction")
    st.add_argument("session_id")
    st.add_argument("text")
    st.add_argument("--top-k", type=int, default=0)
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


def _session_line(s: object) -> str:
    return (f"session {s.session_id}  model {s.model} v{s.version}  offset {s.offset}  "  # type: ignore[attr-defined]
            f"expires {s.expires_at.ToJsonString()}")  # type: ignore[attr-defined]


def run_client(args: argparse.Namespace) -> int:
    try:
        with RecurClient(args.target, api_key=args.api_key or None, **tls_options(args)) as client:
            return _run(client, args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (ChunkRefused, ValueError) as e:  # a refused chunk; an unreadable TLS file
        print(f"error: {e}", file=sys.stderr)
        return 1


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
        r = client.step(args.session_id, text=args.text, top_k=args.top_k, final_only=args.final_only)
        for o in r.outputs:
            shown = o.label or repr(o.text)
            top = " ".join(f"{i}:{p:.2f}" for i, p in zip(o.top_ids, o.top_probs))
            print(f"{shown}  {top}".rstrip())
        print(f"offset {r.offset}")
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
