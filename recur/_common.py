"""What the synchronous client (recur.client) and the asyncio client (recur.aio) share, so the two
cannot drift: which failures are retried and how long to wait, `stream_sequence`'s resume
bookkeeping (offsets, progress, reconnects), call metadata, TLS options, request building, and the
packed batch's columns. Nothing here touches a channel: each client does its own I/O around it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import grpc

from recur.v1 import recur_pb2 as pb

log = logging.getLogger("recur.client")

# nginx hashes on this header, so a session keeps landing on the same replica.
SESSION_HEADER = "x-session-id"
AUTH_HEADER = "authorization"
API_KEY_ENV = "RECUR_API_KEY"
# Codes that mean "not now" rather than "no": the same chunk may succeed later.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED})
RETRYABLE_VALUES = frozenset(c.value[0] for c in RETRYABLE)
# Short reconnect backoff: after a replica restarts or fails over, resume within a second or two.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
# stream_sequence's wait between tries of one chunk: doubles from the first to the last.
FIRST_BACKOFF, LAST_BACKOFF = 0.05, 1.0

PathLike = str | os.PathLike[str] | None


def lost_in_transit(e: grpc.RpcError) -> bool:
    """A stream the transport reset, not a status the server sent: when nginx loses the replica
    behind a stream it resets the client's HTTP/2 stream, which gRPC reports as INTERNAL "Stream
    removed (RST_STREAM ...)". A server's own INTERNAL ("internal error ...") is not this."""
    code, details = e.code(), e.details() or ""
    return code == grpc.StatusCode.INTERNAL and "RST_STREAM" in details


def retryable(e: grpc.RpcError) -> bool:
    """Whether `stream_sequence` resumes after this error (see recur.client's docstring)."""
    return e.code() in RETRYABLE or lost_in_transit(e)


def status_code(code: int) -> grpc.StatusCode | None:
    """The grpc.StatusCode of a ChunkStatus's code number (None for a number gRPC does not define)."""
    return next((c for c in grpc.StatusCode if c.value[0] == code), None)


class ChunkRefused(Exception):
    """A chunk on a Stream was answered with a status that retrying will not fix."""

    def __init__(self, code: int, message: str) -> None:
        known = status_code(code)
        super().__init__(f"{known.name}: {message}" if known else message)
        self.code, self.message = code, message


class RetryChunk(Exception):
    """A chunk answered with a retryable status inside a healthy stream."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self._code = code

    def code(self) -> grpc.StatusCode:
        known = status_code(self._code)
        assert known is not None  # only made for RETRYABLE_VALUES
        return known


# -- channels and metadata -----------------------------------------------------------------------


def api_key_of(api_key: str | None) -> str | None:
    """The key to send: the argument, else the RECUR_API_KEY variable; None for no key."""
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None


def auth_metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [(AUTH_HEADER, f"Bearer {api_key}")] if api_key else []


def call_metadata(auth: list[tuple[str, str]], session_id: str = "") -> list[tuple[str, str]]:
    """Every call's metadata: the API key, and the session id that nginx routes on (only an id
    the server could accept: a huge one would overflow the metadata before the server refuses it)."""
    routable = session_id and len(session_id) <= 128 and session_id.isprintable()
    return [*auth, (SESSION_HEADER, session_id)] if routable else list(auth)


def _read(path: PathLike, what: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it ({e.strerror or type(e).__name__})") from None


def channel_credentials(tls_ca: PathLike = None, tls_cert: PathLike = None,
                        tls_key: PathLike = None) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: `tls_ca` to verify the server (None: the system's roots),
    `tls_cert` and `tls_key` (both or neither) for a client certificate."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca, "TLS CA"),
                                        private_key=_read(tls_key, "TLS key"),
                                        certificate_chain=_read(tls_cert, "TLS certificate"))


def channel_settings(*, tls: bool, tls_ca: PathLike, tls_cert: PathLike, tls_key: PathLike,
                     tls_server_name: str | None, options: Sequence[tuple[str, Any]]
                     ) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """A channel's options, and its TLS credentials (None: plaintext, when no tls_* is given)."""
    opts = list(options)
    if not (tls or tls_ca or tls_cert or tls_key):
        return opts, None
    if tls_server_name:  # the name the server's certificate is checked against, when not the target's host
        opts.append(("grpc.ssl_target_name_override", tls_server_name))
    return opts, channel_credentials(tls_ca, tls_cert, tls_key)


# -- requests ------------------------------------------------------------------------------------


def create_request(model: str, version: int = 0, session_id: str = "", ttl_seconds: int = 0,
                   initial_state: Sequence[pb.Tensor] = ()) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(model=model, version=version, session_id=session_id, ttl_seconds=ttl_seconds,
                                   initial_state=list(initial_state))


def fork_request(session_id: str, new_session_id: str = "", ttl_seconds: int = 0) -> pb.ForkSessionRequest:
    return pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id, ttl_seconds=ttl_seconds)


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


# -- stream_sequence's bookkeeping ---------------------------------------------------------------


class Resume:
    """One `stream_sequence`: the chunks, the replies so far, the offset the next chunk expects, and
    the retry window. A client loops: send `request()`, pass the answer to `accept`; on a failure
    call `failed`, wait the seconds it returns, open a new stream and go on from `request()` again:
    the one unacknowledged chunk goes out again at its offset, so the server applies it or replays it.

    retry_for counts from the first failure without progress: a stream that keeps dying but moves
    forward between deaths is never given up on."""

    def __init__(self, target: str, session_id: str, tokens: Sequence[int], chunk: int, start: int,
                 retry_for: float, options: dict[str, Any]) -> None:
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self.target, self.session_id, self.retry_for, self.options = target, session_id, retry_for, options
        self.chunks = [list(tokens[i : i + chunk]) for i in range(0, len(tokens), chunk)]
        self.replies: list[pb.StepResponse] = []
        self.offset = start
        self._failing_since: float | None = None
        self._progress_at, self._backoff = 0, FIRST_BACKOFF
        self._lost = False  # a stream was lost: the next one that answers is a reconnect
        self.reconnections = 0  # streams that reached a server after a lost one

    @property
    def done(self) -> bool:
        return len(self.replies) >= len(self.chunks)

    def request(self) -> pb.StepRequest:
        """The next chunk, at the offset it expects; its index is the request id."""
        n = len(self.replies)
        return pb.StepRequest(session_id=self.session_id, tokens=self.chunks[n], expected_offset=self.offset,
                              request_id=str(n), **self.options)

    def accept(self, reply: pb.StepResponse) -> bool:
        """Take the reply to `request()`; raises RetryChunk or ChunkRefused for a refused chunk.
        True when this reply is the first on a stream after a lost one (a reconnection)."""
        # counted once per reconnection, not per attempt, also when the new stream answers a refusal
        reconnected, self._lost = self._lost, False
        self.reconnections += reconnected
        if reply.HasField("status"):
            if reply.status.code in RETRYABLE_VALUES:
                raise RetryChunk(reply.status.code, reply.status.message)
            raise ChunkRefused(reply.status.code, reply.status.message)
        self.replies.append(reply)
        self.offset = reply.offset
        return reconnected

    def failed(self, e: grpc.RpcError | RetryChunk) -> float:
        """After a stream failed with `e`: raises it when retrying cannot help or the window is over;
        else the seconds to wait before the next stream."""
        if isinstance(e, grpc.RpcError) and not retryable(e):
            raise e
        self._lost = True
        if self._failing_since is None or self._progress_at != len(self.replies):
            self._failing_since, self._progress_at, self._backoff = time.monotonic(), len(self.replies), FIRST_BACKOFF
        if time.monotonic() - self._failing_since > self.retry_for:
            if isinstance(e, RetryChunk):
                raise ChunkRefused(e.code().value[0], str(e)) from None
            raise e
        log.warning("stream to %s dropped (%s); resuming at offset %d", self.target, e.code().name, self.offset)
        wait, self._backoff = self._backoff, min(LAST_BACKOFF, self._backoff * 2)
        return wait
