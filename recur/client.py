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

import logging
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc

log = logging.getLogger(__name__)

# nginx hashes on this header, so a session keeps landing on the same replica.
SESSION_HEADER = "x-session-id"
AUTH_HEADER = "authorization"
API_KEY_ENV = "RECUR_API_KEY"
# Codes that mean "not now" rather than "no": the same chunk may succeed later.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED})
_RETRYABLE_VALUES = frozenset(c.value[0] for c in RETRYABLE)
# Short reconnect backoff: after a replica restarts or fails over, resume within a second or two.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 2000)]


def lost_in_transit(e: grpc.RpcError) -> bool:
    """A stream the transport reset, not a status the server sent: when nginx loses the replica
    behind a stream it resets the client's HTTP/2 stream, which gRPC reports as INTERNAL "Stream
    removed (RST_STREAM ...)". A server's own INTERNAL ("internal error ...") is not this."""
    code, details = e.code(), e.details() or ""
    return code == grpc.StatusCode.INTERNAL and "RST_STREAM" in details


def retryable(e: grpc.RpcError) -> bool:
    """Whether `stream_sequence` resumes after this error (see the module's docstring)."""
    return e.code() in RETRYABLE or lost_in_transit(e)


class ChunkRefused(Exception):
    """A chunk on a Stream was answered with a status that retrying will not fix."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{grpc.StatusCode(_code_tuple(code)).name}: {message}" if _code_tuple(code) else message)
        self.code, self.message = code, message


def _code_tuple(code: int) -> tuple | None:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c.value
    return None


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it ({e.strerror or type(e).__name__})") from None


def channel_credentials(tls_ca: str | os.PathLike[str] | None = None, tls_cert: str | os.PathLike[str] | None = None,
                        tls_key: str | os.PathLike[str] | None = None) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: `tls_ca` to verify the server (None: the system's roots),
    `tls_cert` and `tls_key` (both or neither) for a client certificate."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca, "TLS CA"),
                                        private_key=_read(tls_key, "TLS key"),
                                        certificate_chain=_read(tls_cert, "TLS certificate"))


def open_channel(target: str, *, tls: bool = False, tls_ca: str | os.PathLike[str] | None = None,
                 tls_cert: str | os.PathLike[str] | None = None, tls_key: str | os.PathLike[str] | None = None,
                 tls_server_name: str | None = None,
                 options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS) -> grpc.Channel:
    """A plaintext channel, or TLS when `tls` or any tls_* file is given."""
    opts = list(options)
    if not (tls or tls_ca or tls_cert or tls_key):
        return grpc.insecure_channel(target, options=opts)
    if tls_server_name:  # the name the server's certificate is checked against, when not the target's host
        opts.append(("grpc.ssl_target_name_override", tls_server_name))
    return grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key), options=opts)


class RecurClient:
    def __init__(self, target: str, *, api_key: str | None = None, tls: bool = False,
                 tls_ca: str | os.PathLike[str] | None = None, tls_cert: str | os.PathLike[str] | None = None,
                 tls_key: str | os.PathLike[str] | None = None, tls_server_name: str | None = None,
                 timeout: float = 30.0) -> None:
        """api_key: sent as `authorization: Bearer KEY` (None: the RECUR_API_KEY variable, if set).
        tls / tls_ca / tls_cert / tls_key: see `open_channel`."""
        self.target, self.timeout = target, timeout
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self._auth: list[tuple[str, str]] = [(AUTH_HEADER, f"Bearer {self.api_key}")] if self.api_key else []
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
        routable = session_id and len(session_id) <= 128 and session_id.isprintable()
        return [*self._auth, (SESSION_HEADER, session_id)] if routable else list(self._auth)

    def models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata()).models)

    def create(self, model: str, version: int = 0, session_id: str = "", ttl_seconds: int = 0,
               initial_state: Sequence[pb.Tensor] = ()) -> pb.Session:
        req = pb.CreateSessionRequest(model=model, version=version, session_id=session_id, ttl_seconds=ttl_seconds,
                                      initial_state=list(initial_state))
        return self.stub.CreateSession(req, timeout=self.timeout, metadata=self.metadata(session_id))

    def get(self, session_id: str, include_state: bool = False) -> pb.Session:
        return self.stub.GetSession(pb.GetSessionRequest(session_id=session_id, include_state=include_state),
                                    timeout=self.timeout, metadata=self.metadata(session_id))

    def delete(self, session_id: str) -> None:
        self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=self.timeout,
                                metadata=self.metadata(session_id))

    def fork(self, session_id: str, new_session_id: str = "", ttl_seconds: int = 0) -> pb.Session:
        req = pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id, ttl_seconds=ttl_seconds)
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
        start = self.get(session_id).offset
        chunks = [list(tokens[i : i + chunk]) for i in range(0, len(tokens), chunk)]
        replies: list[pb.StepResponse] = []
        offset = start
        failing_since: float | None = None  # retry_for counts from the first failure without progress
        progress_at, backoff = 0, 0.05
        lost = False  # a stream was lost: the next one that answers is a reconnect
        while len(replies) < len(chunks):
            requests: queue.Queue[pb.StepRequest | None] = queue.Queue()
            call = self.stub.Stream(iter(requests.get, None), metadata=self.metadata(session_id))
            try:
                while len(replies) < len(chunks):
                    body = chunks[len(replies)]
                    requests.put(pb.StepRequest(session_id=session_id, tokens=body, expected_offset=offset,
                                                request_id=str(len(replies)), **options))
                    reply = next(call)
                    if lost:  # the new stream reached a server: counted once per reconnection, not per attempt
                        self.reconnects += 1
                        lost = False
                    if reply.HasField("status"):
                        if reply.status.code in _RETRYABLE_VALUES:
                            raise _Retry(reply.status.code, reply.status.message)
                        raise ChunkRefused(reply.status.code, reply.status.message)
                    replies.append(reply)
                    offset = reply.offset
                    if on_reply is not None:
                        on_reply(reply)
                requests.put(None)
            except (grpc.RpcError, _Retry) as e:
                code = e.code()
                requests.put(None)
                call.cancel()
                if isinstance(e, grpc.RpcError) and not retryable(e):
                    raise
                lost = True
                if failing_since is None or progress_at != len(replies):
                    failing_since, progress_at, backoff = time.monotonic(), len(replies), 0.05
                if time.monotonic() - failing_since > retry_for:
                    if isinstance(e, _Retry):
                        raise ChunkRefused(e.code().value[0], str(e)) from None
                    raise
                log.warning("stream to %s dropped (%s); resuming at offset %d", self.target, code.name, offset)
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                try:
                    grpc.channel_ready_future(self.channel).result(timeout=retry_for)
                except grpc.FutureTimeoutError:
                    raise e from None
        return replies


def packed_request(session_ids: Sequence[str], chunks: Sequence[Any] | None = None, *, tokens: Any = None,
                   lengths: Any = None, features: Any = None, expected_offsets: Sequence[int] | None = None,
                   return_logits: bool = False, final_only: bool = False, top_k: int = 0,
                   request_id: str = "", **activations: Any) -> pb.PackedStepBatch:
    """A PackedStepBatch from numpy arrays (see RecurClient.step_packed); build them ahead for speed."""
    import numpy as np

    if chunks is not None:
        if tokens is not None or features is not None or lengths is not None:
            raise ValueError("give chunks, or tokens/features with lengths, not both")
        arrays = [np.asarray(c) for c in chunks]
        lengths = [len(a) for a in arrays]
        floats = bool(arrays) and arrays[0].dtype.kind == "f"
        joined = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        tokens, features = (None, joined) if floats else (joined, None)
    if lengths is None:
        raise ValueError("give lengths with tokens or features")
    req = pb.PackedStepBatch(session_ids=list(session_ids), lengths=np.asarray(lengths, np.int32).tolist(),
                             return_logits=return_logits, final_only=final_only, top_k=top_k, request_id=request_id,
                             **activations)
    if expected_offsets is not None:
        req.expected_offsets.extend(np.asarray(expected_offsets, np.int64).tolist())
    if tokens is not None:
        req.tokens = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
    if features is not None:
        req.features = np.ascontiguousarray(features, dtype="<f4").tobytes()
    return req


class PackedReply:
    """A PackedStepBatchResponse as numpy arrays. Rows follow the request's layout (one per chunk
    with final_only); a refused chunk's rows have argmax -1. `errors` maps a refused chunk's index
    to (gRPC status code, message)."""

    def __init__(self, reply: pb.PackedStepBatchResponse) -> None:
        import numpy as np

        self.reply = reply
        self.offsets = np.array(reply.offsets, np.int64)
        self.start_offsets = np.array(reply.start_offsets, np.int64)
        self.errors = {i: (s.code, s.message) for i, s in zip(reply.failed, reply.statuses)}
        self.replayed = set(reply.replayed)
        self.argmax = np.frombuffer(reply.argmax, "<i4")
        self.logits = np.frombuffer(reply.logits, "<f4").reshape(tuple(reply.logits_shape)) if reply.logits else None
        k = len(reply.top_ids) // 4 // max(1, len(self.argmax))
        self.top_ids = np.frombuffer(reply.top_ids, "<i4").reshape(-1, k) if reply.top_ids else None
        self.top_probs = np.frombuffer(reply.top_probs, "<f4").reshape(-1, k) if reply.top_probs else None
        self.request_id = reply.request_id
        # name (e.g. "h_l1") -> [rows, units]
        self.activations = {t.name: np.frombuffer(t.data, "<f4").reshape(tuple(t.shape)) for t in reply.activations}

    @classmethod
    def of(cls, reply: pb.PackedStepBatchResponse) -> PackedReply:
        return cls(reply)

    def ok(self, i: int) -> bool:
        return i not in self.errors


class _Retry(Exception):
    """A chunk answered with a retryable status inside a healthy stream."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return next(c for c in grpc.StatusCode if c.value[0] == self._code)
