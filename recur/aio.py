"""The asyncio client for recur, on grpc.aio: recur.client.RecurClient's methods as coroutines,
for gateways written with grpc.aio, FastAPI or aiohttp.

The retry policy, the backoff, `stream_sequence`'s resume bookkeeping, the metadata and the packed
batch's columns are recur._common's, shared with the synchronous client, so both resume the same
way: after a dropped connection the one unacknowledged chunk goes out again at its offset and the
server applies it or replays its recorded reply. Create the client inside the running event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from recur._common import (
    CHANNEL_OPTIONS,
    ChunkRefused,
    PackedReply,
    PathLike,
    Resume,
    RetryChunk,
    api_key_of,
    auth_metadata,
    call_metadata,
    channel_settings,
    create_request,
    fork_request,
    packed_request,
    retryable,
)
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc

__all__ = ["ChunkRefused", "PackedReply", "RecurClient", "open_channel", "packed_request", "retryable"]


def open_channel(target: str, *, tls: bool = False, tls_ca: PathLike = None, tls_cert: PathLike = None,
                 tls_key: PathLike = None, tls_server_name: str | None = None,
                 options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS) -> grpc.aio.Channel:
    """A plaintext grpc.aio channel, or TLS when `tls` or any tls_* file is given."""
    opts, creds = channel_settings(tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                   tls_server_name=tls_server_name, options=options)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, creds, options=opts)


class RecurClient:
    """recur.client.RecurClient for asyncio: the same methods and arguments, awaited; `generate` and
    `list_sessions` are async iterators. `async with` closes the channel."""

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

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> RecurClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def metadata(self, session_id: str = "") -> list[tuple[str, str]]:
        """Every call's metadata: the API key, and the session id that nginx routes on."""
        return call_metadata(self._auth, session_id)

    async def models(self) -> list[pb.ModelInfo]:
        reply = await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata())
        return list(reply.models)

    async def create(self, model: str, version: int = 0, session_id: str = "", ttl_seconds: int = 0,
                     initial_state: Sequence[pb.Tensor] = ()) -> pb.Session:
        req = create_request(model, version, session_id, ttl_seconds, initial_state)
        return await self.stub.CreateSession(req, timeout=self.timeout, metadata=self.metadata(session_id))

    async def get(self, session_id: str, include_state: bool = False) -> pb.Session:
        return await self.stub.GetSession(pb.GetSessionRequest(session_id=session_id, include_state=include_state),
                                          timeout=self.timeout, metadata=self.metadata(session_id))

    async def delete(self, session_id: str) -> None:
        await self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=self.timeout,
                                      metadata=self.metadata(session_id))

    async def fork(self, session_id: str, new_session_id: str = "", ttl_seconds: int = 0) -> pb.Session:
        req = fork_request(session_id, new_session_id, ttl_seconds)
        return await self.stub.ForkSession(req, timeout=self.timeout, metadata=self.metadata(session_id))

    async def export_session(self, session_id: str) -> bytes:
        """The session as a blob (model, sha256, offset, state, replay record, TTL) for import_session."""
        reply = await self.stub.ExportSession(pb.ExportSessionRequest(session_id=session_id), timeout=self.timeout,
                                              metadata=self.metadata(session_id))
        return reply.blob

    async def import_session(self, blob: bytes, session_id: str = "", force: bool = False) -> pb.Session:
        """Recreate an exported session here (under `session_id`, default its exported id)."""
        return await self.stub.ImportSession(pb.ImportSessionRequest(blob=blob, session_id=session_id, force=force),
                                             timeout=self.timeout, metadata=self.metadata(session_id))

    async def list_sessions_page(self, model: str = "", page_size: int = 0, page_token: str = ""
                                 ) -> pb.ListSessionsResponse:
        req = pb.ListSessionsRequest(model=model, page_size=page_size, page_token=page_token)
        return await self.stub.ListSessions(req, timeout=self.timeout, metadata=self.metadata())

    async def list_sessions(self, model: str = "", page_size: int = 0, limit: int = 0) -> AsyncIterator[pb.Session]:
        """The caller's live sessions ordered by id (of `model` only, unless empty), page after page;
        at most `limit` of them (0: all)."""
        token, n = "", 0
        while True:
            page = await self.list_sessions_page(model, page_size, token)
            for s in page.sessions:
                yield s
                n += 1
                if limit and n >= limit:
                    return
            token = page.next_page_token
            if not token:
                return

    async def step(self, session_id: str, **fields: Any) -> pb.StepResponse:
        """One chunk: tokens=[...], text="..." or features=bytes; expected_offset, top_k, ... as in StepRequest."""
        return await self.stub.Step(pb.StepRequest(session_id=session_id, **fields), timeout=self.timeout,
                                    metadata=self.metadata(session_id))

    async def step_packed(self, session_ids: Sequence[str], chunks: Sequence[Any] | None = None, *,
                          tokens: Any = None, lengths: Any = None, features: Any = None,
                          expected_offsets: Sequence[int] | None = None, return_logits: bool = False,
                          final_only: bool = False, top_k: int = 0, request_id: str = "",
                          **activations: Any) -> PackedReply:
        """Several sessions' chunks in one columnar message (StepPacked): see recur.client's step_packed."""
        req = packed_request(session_ids, chunks, tokens=tokens, lengths=lengths, features=features,
                             expected_offsets=expected_offsets, return_logits=return_logits, final_only=final_only,
                             top_k=top_k, request_id=request_id, **activations)
        return PackedReply.of(await self.stub.StepPacked(req, timeout=self.timeout, metadata=self.metadata()))

    def generate(self, session_id: str, **fields: Any) -> grpc.aio.UnaryStreamCall:
        """Tokens as they are made (`async for`): prompt=..., max_tokens, temperature, top_k, top_p, seed,
        stop. The call itself, as the blocking client returns it: `cancel()` stops a generation early."""
        return self.stub.Generate(pb.GenerateRequest(session_id=session_id, **fields),
                                  metadata=self.metadata(session_id))

    async def stream_sequence(self, session_id: str, tokens: Sequence[int], chunk: int = 16, *,
                              retry_for: float = 60.0,
                              on_reply: Callable[[pb.StepResponse], Awaitable[None] | None] | None = None,
                              **options: Any) -> list[pb.StepResponse]:
        """Feed `tokens` from the session's current offset; returns one reply per chunk, in order.

        Survives dropped connections, server restarts and replica failover for up to `retry_for`
        seconds each. `on_reply` (a function or a coroutine function) sees each reply as it arrives.
        """
        run = Resume(self.target, session_id, tokens, chunk, (await self.get(session_id)).offset, retry_for, options)
        while not run.done:
            call = self.stub.Stream(metadata=self.metadata(session_id))
            try:
                while not run.done:
                    await _send(call, run.request())
                    reply = await call.read()
                    if reply is grpc.aio.EOF:  # an OK end before the answer: only a server going away does that
                        raise _Lost("the stream ended before its chunk was answered")
                    assert isinstance(reply, pb.StepResponse)
                    seen = run.reconnections
                    try:
                        run.accept(reply)
                    finally:
                        self.reconnects += run.reconnections - seen
                    if on_reply is not None:
                        maybe = on_reply(reply)
                        if maybe is not None:
                            await maybe
                await call.done_writing()
            except (grpc.RpcError, RetryChunk) as e:
                call.cancel()
                await asyncio.sleep(run.failed(e))
                try:
                    await asyncio.wait_for(self.channel.channel_ready(), retry_for)
                except TimeoutError:
                    raise e from None
            except BaseException:  # a refused chunk, an on_reply that raised, the task cancelled: end the stream
                call.cancel()
                raise
        return run.replies



class _Lost(grpc.RpcError):
    """A stream the connection dropped under, with no status from the server: retried as UNAVAILABLE."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


async def _send(call: grpc.aio.StreamStreamCall, request: pb.StepRequest) -> None:
    """Write one chunk. grpc.aio reports a write the transport could not make (the connection died
    before the call had a status) as INTERNAL "Internal error from Core": a lost stream, not an
    answer; a call the server had already ended raises the server's own status."""
    ended = call.done()
    try:
        await call.write(request)
    except grpc.aio.AioRpcError as e:
        if ended or e.code() != grpc.StatusCode.INTERNAL:
            raise
        raise _Lost(f"the connection dropped while sending ({e.details()})") from e
