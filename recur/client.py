"""Python client for recur: grpc and the generated stubs only.

`stream_sequence` feeds a long sequence chunk by chunk over a Stream, each chunk
naming the offset it expects. When the connection drops it reconnects and re-sends
the one unacknowledged chunk at that offset: if the server had applied it, the
recorded reply comes back (`replayed`); if not, it applies now. No step is lost or
applied twice.
"""

from __future__ import annotations

import logging
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
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


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


class RecurClient:
    def __init__(self, target: str, *, timeout: float = 30.0) -> None:
        self.target, self.timeout = target, timeout
        # Short reconnect backoff: after a replica restarts or fails over, resume within a second or two.
        self.channel = grpc.insecure_channel(target, options=[("grpc.initial_reconnect_backoff_ms", 200),
                                                              ("grpc.min_reconnect_backoff_ms", 100),
                                                              ("grpc.max_reconnect_backoff_ms", 2000)])
        self.stub = recur_pb2_grpc.RecurStub(self.channel)
        self.reconnects = 0  # times stream_sequence lost its stream and resumed

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RecurClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _md(session_id: str) -> list[tuple[str, str]]:
        return [(SESSION_HEADER, session_id)] if session_id else []

    def models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def create(self, model: str, version: int = 0, session_id: str = "", ttl_seconds: int = 0,
               initial_state: Sequence[pb.Tensor] = ()) -> pb.Session:
        req = pb.CreateSessionRequest(model=model, version=version, session_id=session_id, ttl_seconds=ttl_seconds,
                                      initial_state=list(initial_state))
        return self.stub.CreateSession(req, timeout=self.timeout, metadata=self._md(session_id))

    def get(self, session_id: str, include_state: bool = False) -> pb.Session:
        return self.stub.GetSession(pb.GetSessionRequest(session_id=session_id, include_state=include_state),
                                    timeout=self.timeout, metadata=self._md(session_id))

    def delete(self, session_id: str) -> None:
        self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=self.timeout,
                                metadata=self._md(session_id))

    def fork(self, session_id: str, new_session_id: str = "", ttl_seconds: int = 0) -> pb.Session:
        req = pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id, ttl_seconds=ttl_seconds)
        return self.stub.ForkSession(req, timeout=self.timeout, metadata=self._md(session_id))

    def step(self, session_id: str, **fields: Any) -> pb.StepResponse:
        """One chunk: tokens=[...], text="..." or features=bytes; expected_offset, top_k, ... as in StepRequest."""
        return self.stub.Step(pb.StepRequest(session_id=session_id, **fields), timeout=self.timeout,
                              metadata=self._md(session_id))

    def generate(self, session_id: str, **fields: Any) -> Iterator[pb.GenerateResponse]:
        """Tokens as they are made: prompt=..., max_tokens, temperature, top_k, top_p, seed, stop."""
        return self.stub.Generate(pb.GenerateRequest(session_id=session_id, **fields), metadata=self._md(session_id))

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
        while len(replies) < len(chunks):
            requests: queue.Queue[pb.StepRequest | None] = queue.Queue()
            call = self.stub.Stream(iter(requests.get, None), metadata=self._md(session_id))
            try:
                while len(replies) < len(chunks):
                    body = chunks[len(replies)]
                    requests.put(pb.StepRequest(session_id=session_id, tokens=body, expected_offset=offset,
                                                request_id=str(len(replies)), **options))
                    reply = next(call)
                    if reply.HasField("status"):
                        if _code_tuple(reply.status.code) in {c.value for c in RETRYABLE}:
                            raise _Retry(reply.status.message)
                        raise ChunkRefused(reply.status.code, reply.status.message)
                    replies.append(reply)
                    offset = reply.offset
                    if on_reply is not None:
                        on_reply(reply)
                requests.put(None)
            except (grpc.RpcError, _Retry) as e:
                code = e.code() if isinstance(e, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
                self.reconnects += 1
                requests.put(None)
                call.cancel()
                if code not in RETRYABLE:
                    raise
                if failing_since is None or progress_at != len(replies):
                    failing_since, progress_at, backoff = time.monotonic(), len(replies), 0.05
                if time.monotonic() - failing_since > retry_for:
                    raise
                log.warning("stream to %s dropped (%s); resuming at offset %d", self.target, code.name, offset)
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                try:
                    grpc.channel_ready_future(self.channel).result(timeout=retry_for)
                except grpc.FutureTimeoutError:
                    raise e from None
        return replies


class _Retry(Exception):
    pass
