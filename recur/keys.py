"""`recur keys`: make API keys and list a key file's tenants (the file's format: service/auth.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.auth import add_key, key_file_summary


def add_keys_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_action", required=True)
    a = sub.add_parser("add", help="make a new API key for a tenant: prints the key once, stores only its hash")
    a.add_argument("--file", type=Path, required=True, help="the key file (created when missing)")
    a.add_argument("--tenant", required=True, help="tenant name: letters, digits, '.', '_', '-'")
    a.add_argument("--label", default="", help="a note stored beside the hash (e.g. who holds the key)")
    a.add_argument("--max-sessions", type=int, default=None, help="the tenant's most live sessions (0: no limit)")
    a.add_argument("--max-chunk", type=int, default=None, help="the tenant's most steps in one chunk (0: no limit)")
    a.add_argument("--requests-per-second", type=float, default=None,
                   help="the tenant's most calls per second (0: no limit)")
    a.add_argument("--admin", action="store_true",
                   help="the key may call the admin API (load, unload and reload models)")
    ls = sub.add_parser("list", help="tenants, their limits and how many keys each has (no keys or hashes)")
    ls.add_argument("--file", type=Path, required=True, help="the key file")


def run_keys(args: argparse.Namespace) -> int:
    if args.keys_action == "add":
        key = add_key(args.file, args.tenant, label=args.label, max_sessions=args.max_sessions,
                      max_chunk=args.max_chunk, requests_per_second=args.requests_per_second, admin=args.admin)
        print(f"added a key for tenant {args.tenant} to {args.file}; it is shown only this once:", file=sys.stderr)
        print(key, flush=True)
        return 0
    for line in key_file_summary(args.file):
        print(line)
    return 0
