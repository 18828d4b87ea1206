#!/usr/bin/env node
// A Node.js client of recur with stubs loaded from protos/ alone (@grpc/proto-loader, no codegen).
//
// 1. Streams a text file through one session over the bidirectional Stream, each chunk naming the
//    offset it expects. When the connection drops (a server restarted, a replica gone) it waits for
//    the channel, opens a new stream and sends the one unacknowledged chunk again at its offset: the
//    server applies it, or replays its recorded reply. Nothing is lost or applied twice.
// 2. Shows the replay rule and a refusal on a unary Step: the same chunk again at its old offset is
//    `replayed`; other content at that offset is FAILED_PRECONDITION naming the actual offset.
// 3. Sends one StepPacked: two sessions' chunks in one message, tokens as one little-endian int32
//    blob, expected offsets with -1 for "not checked", and the reply's blobs decoded.
//
// Prints one JSON object on stdout (progress on stderr). docs/clients.md describes the wire format.
//
//   node recur_stream.js --target localhost:50051 --model pylm --file some.py [--chunk 64]
//        [--session-id ID] [--retry-for 60]      (RECUR_API_KEY: sent as authorization: Bearer KEY)
"use strict";

const path = require("node:path");
const fs = require("node:fs");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
// Codes that mean "not now" rather than "no": the same chunk may succeed later (as the Python client).
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.ABORTED, grpc.status.DEADLINE_EXCEEDED]);

function loadRecur() {
  const definition = protoLoader.loadSync("recur/v1/recur.proto", {
    includeDirs: [PROTOS],
    keepCase: true, // field names as in the .proto: session_id, expected_offset
    longs: Number, // int64 offsets as numbers (exact below 2^53)
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).recur.v1;
}

function metadataFor(sessionId) {
  const md = new grpc.Metadata();
  if (process.env.RECUR_API_KEY) md.set("authorization", `Bearer ${process.env.RECUR_API_KEY}`);
  if (sessionId) md.set("x-session-id", sessionId); // the balancer hashes on it
  return md;
}

function unary(client, method, request, sessionId = "") {
  return new Promise((resolve, reject) => {
    client[method](request, metadataFor(sessionId), { deadline: Date.now() + 30_000 }, (err, reply) =>
      err ? reject(err) : resolve(reply));
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function waitForReady(client, ms) {
  return new Promise((resolve, reject) => client.waitForReady(Date.now() + ms, (err) => (err ? reject(err) : resolve())));
}

// A status the transport made when a proxy reset the stream, not one the server sent.
const lostInTransit = (e) => e.code === grpc.status.INTERNAL && /RST_STREAM/.test(e.details || "");
const retryable = (e) => RETRYABLE.has(e.code) || lostInTransit(e);

// Feed `tokens` from the session's current offset; one reply per chunk, in order.
async function streamSequence(client, sessionId, tokens, chunk, retryForMs) {
  let offset = (await unary(client, "GetSession", { session_id: sessionId }, sessionId)).offset;
  const chunks = [];
  for (let i = 0; i < tokens.length; i += chunk) chunks.push(tokens.slice(i, i + chunk));
  const replies = [];
  let reconnects = 0;
  let lost = false;
  let failingSince = null; // retryForMs counts from the first failure without progress
  let progressAt = 0;
  let backoff = 50;
  while (replies.length < chunks.length) {
    const call = client.Stream(metadataFor(sessionId));
    call.on("error", () => {}); // errors arrive through the iterator; this keeps a late one from throwing
    const answers = call[Symbol.asyncIterator]();
    try {
      while (replies.length < chunks.length) {
        call.write({ session_id: sessionId, tokens: chunks[replies.length], expected_offset: offset,
                     return_logits: true, request_id: String(replies.length) });
        const { value: reply, done } = await answers.next();
        if (done) throw Object.assign(new Error("stream ended early"), { code: grpc.status.UNAVAILABLE });
        if (lost) { reconnects += 1; lost = false; }
        if (reply.status) { // this chunk was refused; the stream itself carries on
          const e = Object.assign(new Error(reply.status.message), { code: reply.status.code, details: reply.status.message });
          if (RETRYABLE.has(e.code)) throw e;
          throw Object.assign(e, { fatal: true });
        }
        replies.push(reply);
        offset = reply.offset;
      }
      call.end();
    } catch (e) {
      call.cancel();
      if (e.fatal || !retryable(e)) throw e;
      lost = true;
      if (failingSince === null || progressAt !== replies.length) {
        failingSince = Date.now(); progressAt = replies.length; backoff = 50;
      }
      if (Date.now() - failingSince > retryForMs) throw e;
      console.error(`stream dropped (${grpc.status[e.code] ?? e.code}); resuming at offset ${offset}`);
      await sleep(backoff);
      backoff = Math.min(1000, backoff * 2);
      await waitForReady(client, retryForMs);
    }
  }
  return { replies, reconnects };
}

// StepPacked: chunk i is session_ids[i], lengths[i] steps taken in order from one int32 blob.
async function stepPacked(client, sessionIds, chunks, expectedOffsets) {
  const flat = Int32Array.from(chunks.flat());
  const tokens = Buffer.alloc(flat.length * 4);
  flat.forEach((t, i) => tokens.writeInt32LE(t, i * 4)); // little-endian whatever the host
  const reply = await unary(client, "StepPacked", {
    session_ids: sessionIds, lengths: chunks.map((c) => c.length), tokens,
    expected_offsets: expectedOffsets, return_logits: true,
  });
  const argmax = [];
  for (let i = 0; i < reply.argmax.length; i += 4) argmax.push(reply.argmax.readInt32LE(i));
  return {
    offsets: reply.offsets, start_offsets: reply.start_offsets, failed: reply.failed,
    statuses: reply.statuses.map((s) => ({ code: s.code, message: s.message })),
    replayed: reply.replayed, argmax, logits_shape: reply.logits_shape,
    logits_b64: reply.logits.toString("base64"), // little-endian float32 [rows, classes]
  };
}

async function main() {
  const { values: args } = parseArgs({ options: {
    target: { type: "string", default: "localhost:50051" }, model: { type: "string", default: "pylm" },
    file: { type: "string" }, chunk: { type: "string", default: "64" }, "session-id": { type: "string", default: "" },
    "retry-for": { type: "string", default: "60" },
  } });
  if (!args.file) throw new Error("give --file: the text to stream");
  const recur = loadRecur();
  const client = new recur.Recur(args.target, grpc.credentials.createInsecure(), {
    "grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 2000,
  });

  // The model's vocabulary turns the file's characters into token ids (unknown ones: unk_id).
  const models = (await unary(client, "ListModels", {})).models;
  const model = models.find((m) => m.name === args.model);
  if (!model) throw new Error(`no model ${args.model}`);
  const ids = new Map(model.vocabulary.map((s, i) => [s, i]));
  const tokens = Array.from(fs.readFileSync(args.file, "utf8"), (ch) => ids.get(ch) ?? model.unk_id);

  const created = await unary(client, "CreateSession", { model: args.model, session_id: args["session-id"] },
    args["session-id"]);
  const sid = created.session_id;
  const { replies, reconnects } = await streamSequence(client, sid, tokens, Number(args.chunk),
    Number(args["retry-for"]) * 1000);
  const final = await unary(client, "GetSession", { session_id: sid }, sid);

  // The replay rule on a unary Step, in a session of its own.
  const other = (await unary(client, "CreateSession", { model: args.model })).session_id;
  const head = tokens.slice(0, 5);
  const first = await unary(client, "Step", { session_id: other, tokens: head, expected_offset: 0 }, other);
  const again = await unary(client, "Step", { session_id: other, tokens: head, expected_offset: 0 }, other);
  let stale = null;
  try {
    await unary(client, "Step", { session_id: other, tokens: [head[0] === 1 ? 2 : 1], expected_offset: 0 }, other);
  } catch (e) {
    stale = { code: e.code, details: e.details };
  }

  // One packed call: a new session checked at offset 0, and `other` not checked (-1).
  const fresh = (await unary(client, "CreateSession", { model: args.model })).session_id;
  const packed = await stepPacked(client, [fresh, other], [tokens.slice(0, 7), tokens.slice(5, 9)], [0, -1]);

  const logits = Buffer.concat(replies.map((r) => r.logits));
  console.log(JSON.stringify({
    session_id: sid, offset: final.offset, reconnects, tokens,
    start_offsets: replies.map((r) => r.start_offset), replayed: replies.filter((r) => r.replayed).length,
    argmax: replies.flatMap((r) => r.argmax), classes: model.classes,
    logits_b64: logits.toString("base64"), // little-endian float32 [steps, classes]
    replay: { first: first.replayed, again: again.replayed, offset: again.offset, start_offset: again.start_offset },
    stale, packed: { sessions: [fresh, other], ...packed },
  }));
  client.close();
}

main().catch((e) => {
  console.error(`error: ${grpc.status[e.code] ?? ""} ${e.details ?? e.message}`);
  process.exit(1);
});
