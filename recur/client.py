"""Python client for recur: grpc and the generated stubs only.

`stream_sequence` feeds a long sequence chunk by chunk over a Stream, each chunk
naming the offset it expects. When the connection drops it reconnects and re-sends
the one unacknowledged chunk at that offset: if the server had applied it, the
recorded reply comes back (`replayed`); if not, it applies now. No step is lost or
applied twice.

Authentication and TLS: `api_key` (default: the RECUR_API_KEY variable) is sent as
`authorization: Bearer KEY` metadata on every call. `tls_ca` (a PEM CA bundle) or `tls=True`
(the system's roots) dials TLS; `tls_cert` and `tls_key` add a client certificate (mutual TLS).

Retries: `stream_sequence` retries UNAVAILABLE, ABORTED and DEADLINE_EXCEEDED (a server or
replica away, the store unreachable) for up to `retry_for` seconds without progress, and a stream
reset in transit (see `lost_in_transit`); any other status (a refused chunk, a bad key, an internal
error the server reported) is raised at once.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from recur._common import (
    API_KEY_ENV,
    AUTH_HEADER,
    CHANNEL_OPTIONS,
    RETRYABLE,
    SESSION_HEADER,
    ChunkRefused,
    PackedReply,
    PathLike,
    Resume,
    RetryChunk,
    api_key_of,
    auth_metadata,
    call_metadata,
    channel_credentials,
    channel_settings,
    create_request,
    fork_request,
    lost_in_transit,
    packed_request,
    retryable,
)
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc

# The public names, several of them defined in recur._common (shared with recur.aio).
__all__ = ["API_KEY_ENV", "AUTH_HEADER", "CHANNEL_OPTIONS", "RETRYABLE", "SESSION_HEADER", "ChunkRefused",
           "PackedReply", "RecurClient", "channel_credentials", "lost_in_transit", "open_channel", "packed_request",
           "retryable"]


def open_channel(target: str, *, tls: bool = False, tls_ca: PathLike = None, tls_cert: PathLike = None,
                 tls_key: PathLike = None, tls_server_name: str | None = None,
                 options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS) -> grpc.Channel:
    """A plaintext channel, or TLS when `tls` or any tls_* file is given."""
    opts, creds = channel_settings(tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                   tls_server_name=tls_server_name, options=options)
    return grpc.insecure_channel(target, options=opts) if creds is None else grpc.secure_channel(target, creds, opts)


class RecurClient:
    """A blocking client of one server (or balancer): every method is one call, except
    `stream_sequence`, which resumes by itself (see the module's docstring). recur.aio.RecurClient
    is the same client for asyncio."""

    def __init__(self, target: str, *, api_key: str | None = None, tls: bool = False, tls_ca: PathLike = None,
                 tls_cert: PathLike = None, tls_key: PathLike = None, tls_server_name: str | None = None,
                 timeout: float = 30.0) -> None:
        """api_key: sent as `authorization: Bearer KEY` (None: the RECUR_API_KEY variable, if set).
        tls / tls_ca / tls_cert / tls_key: see `open_channel`."""
        self.target, self.timeout = target, timeout
        self.api_key = api_key_of(api_key)
        self._auth = auth_metadata(self.api_key)
        self.channel = open_channel(target, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                    tls_server_name=tls_server_name)
        self.stub = recur_pb2_grpc.RecurStub(self.channel)
        self.reconnects = 0  # times stream_sequence lost its stream and resumed on a new one

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RecurClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def metadata(self, session_id: str = "") -> list[tuple[str, str]]:
        """Every call's metadata: the API key, and the session id that nginx routes on (only an id
        the server could accept: a huge one would overflow the metadata before the server refuses it)."""
        return call_metadata(self._auth, session_id)

    def models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata()).models)

    def create(self, model: str, version: int = 0, session_id: str = "", ttl_seconds: int = 0,
               initial_state: Sequence[pb.Tensor] = ()) -> pb.Session:
        req = create_request(model, version, session_id, ttl_seconds, initial_state)
        return self.stub.CreateSession(req, timeout=self.timeout, metadata=self.metadata(session_id))

    def get(self, session_id: str, include_state: bool = False) -> pb.Session:
        return self.stub.GetSession(pb.GetSessionRequest(session_id=session_id, include_state=include_state),
                                    timeout=self.timeout, metadata=self.metadata(session_id))

    def delete(self, session_id: str) -> None:
        self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=self.timeout,
                                metadata=self.metadata(session_id))

    def fork(self, session_id: str, new_session_id: str = "", ttl_seconds: int = 0) -> pb.Session:
        req = fork_request(session_id, new_session_id, ttl_seconds)
        return self.stub.ForkSession(req, timeout=self.timeout, metadata=self.metadata(session_id))

    def export_session(self, session_id: str) -> bytes:
        """The session as a blob (model, sha256, offset, state, replay record, TTL) for import_session."""
        return self.stub.ExportSession(pb.ExportSessionRequest(session_id=session_id), timeout=self.timeout,
                                       metadata=self.metadata(session_id)).blob

    def import_session(self, blob: bytes, session_id: str = "", force: bool = False) -> pb.Session:
        """Recreate an exported session here (under `session_id`, default its exported id)."""
        return self.stub.ImportSession(pb.ImportSessionRequest(blob=blob, session_id=session_id, force=force),
                                       timeout=self.timeout, metadata=self.metadata(session_id))

    def list_sessions_page(self, model: str = "", page_size: int = 0, page_token: str = ""
                           ) -> pb.ListSessionsResponse:
        req = pb.ListSessionsRequest(model=model, page_size=page_size, page_token=page_token)
        return self.stub.ListSessions(req, timeout=self.timeout, metadata=self.metadata())

    def list_sessions(self, model: str = "", page_size: int = 0, limit: int = 0) -> Iterator[pb.Session]:
        """The caller's live sessions ordered by id (of `model` only, unless empty), page after page;
        at most `limit` of them (0: all)."""
        token, n = "", 0
        while True:
            page = self.list_sessions_page(model, page_size, token)
            for s in page.sessions:
                yield s
                n += 1
                if limit and n >= limit:
                    return
            token = page.next_page_token
            if not token:
                return

    def step(self, session_id: str, **fields: Any) -> pb.StepResponse:
        """One chunk: tokens=[...], text="..." or features=bytes; expected_offset, top_k, ... as in StepRequest."""
        return self.stub.Step(pb.StepRequest(session_id=session_id, **fields), timeout=self.timeout,
                              metadata=self.metadata(session_id))

    def step_packed(self, session_ids: Sequence[str], chunks: Sequence[Any] | None = None, *,
                    tokens: Any = None, lengths: Any = None, features: Any = None,
                    expected_offsets: Sequence[int] | None = None, return_logits: bool = False,
                    final_only: bool = False, top_k: int = 0, request_id: str = "",
                    **activations: Any) -> PackedReply:
        """Several sessions' chunks in one columnar message (StepPacked). Give either `chunks` (one
        array of token ids, or of float32 features [steps, dim], per session) or the columns:
        `tokens` (all chunks' ids concatenated) or `features` ([sum(lengths), dim]) with `lengths`.
        `expected_offsets`: one per session (-1: not checked). `return_activations=True` with
        activation_layers/units/states as in StepRequest. Returns numpy arrays (PackedReply)."""
        return PackedReply.of(self.stub.StepPacked(
            packed_request(session_ids, chunks, tokens=tokens, lengths=lengths, features=features,
                           expected_offsets=expected_offsets, return_logits=return_logits, final_only=final_only,
                           top_k=top_k, request_id=request_id, **activations),
            timeout=self.timeout, metadata=self.metadata()))

    def generate(self, session_id: str, **fields: Any) -> Iterator[pb.GenerateResponse]:
        """Tokens as they are made: prompt=..., max_tokens, temperature, top_k, top_p, seed, stop."""
        return self.stub.Generate(pb.GenerateRequest(session_id=session_id, **fields),
                                  metadata=self.metadata(session_id))

    def stream_sequence(self, session_id: str, tokens: Sequence[int], chunk: int = 16, *,
                        retry_for: float = 60.0, on_reply: Callable[[pb.StepResponse], None] | None = None,
                        **options: Any) -> list[pb.StepResponse]:
        """Feed `tokens` from the session's current offset; returns one reply per chunk, in order.

        Survives dropped connections, server restarts and replica failover for up to `retry_for`
        seconds each. `on_reply` sees each reply as it arrives (progress, timing).
        """
        run = Resume(self.target, session_id, tokens, chunk, self.get(session_id).offset, retry_for, options)
        while not run.done:
            requests: queue.Queue[pb.StepRequest | None] = queue.Queue()
            call = self.stub.Stream(iter(requests.get, None), metadata=self.metadata(session_id))
            try:
                while not run.done:
                    requests.put(run.request())
                    reply = next(call)
                    seen = run.reconnections
                    try:
                        run.accept(reply)
                    finally:
                        self.reconnects += run.reconnections - seen
                    if on_reply is not None:
                        on_reply(reply)
                requests.put(None)
            except (grpc.RpcError, RetryChunk) as e:
                requests.put(None)
                call.cancel()
                time.sleep(run.failed(e))
                try:
                    grpc.channel_ready_future(self.channel).result(timeout=retry_for)
                except grpc.FutureTimeoutError:
                    raise e from None
        return run.replies
