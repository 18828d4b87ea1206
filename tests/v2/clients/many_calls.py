"""Many concurrent ModelInfer calls on one tritonclient.grpc.aio client (one channel), no retry:
none may be reset by the transport. Prints the sequence offsets as JSON."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import tritonclient.grpc.aio as aioclient
from common import args

a = args()


async def main() -> list[int]:
    c = aioclient.InferenceServerClient(a["target"])

    async def one(i: int) -> int:
        offset = 0
        for step in range(a["steps"]):
            data = np.array([[i % 50, (i + step) % 50]], dtype=np.int64)
            x = aioclient.InferInput("tokens", list(data.shape), "INT64")
            x.set_data_from_numpy(data)
            r = await c.infer(a["model"], [x], sequence_id=1000 + i, sequence_start=step == 0,
                              request_id=f"{i}:{step}")
            offset = r.get_response().parameters["sequence_offset"].int64_param
        return offset

    try:
        return await asyncio.gather(*(one(i) for i in range(a["calls"])))
    finally:
        await c.close()


print(json.dumps(asyncio.run(main())))
