"""A frame connection over a real socket: frames of every size in any split, and why it stopped."""

from __future__ import annotations

import asyncio
import struct

import mlx.core as mx

from mlxring import aio
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import End, Forward, Tensor
from mlxring.transport.conn import ConnectionClosed, FrameConnection


async def _frames_from(data: bytes, max_frame: int = wire.DEFAULT_MAX_FRAME) -> list[object]:
    """What a FrameConnection reads from a socket that sends `data` and closes: the frames,
    then the error the connection ended with."""
    got: list[object] = []
    done = asyncio.get_running_loop().create_future()

    def opened(conn: FrameConnection) -> None:
        async def read_all() -> None:
            while True:
                try:
                    got.append(await conn.read(5))
                except (wire.FrameError, ConnectionClosed) as e:
                    got.append(e)
                    done.set_result(None)
                    return

        asyncio.get_running_loop().create_task(read_all())

    server = await asyncio.get_running_loop().create_server(
        lambda: FrameConnection(max_frame, opened), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.close()
    await aio.wait_for(done, 5)
    server.close()
    return got


async def test_a_connection_reads_frames_and_says_why_it_stopped() -> None:
    end = wire.encode_bytes(End("r"))
    big = wire.encode_bytes(Forward("r", 1, (7,), True, h=mx.ones((1, 300, 512), mx.bfloat16)))
    # Small frames cut from one buffer, a large one received apart, in any split.
    got = await _frames_from(end + big + end + big)
    assert got[0] == End("r") and got[2] == End("r") and isinstance(got[4], ConnectionClosed)
    for f in (got[1], got[3]):
        assert isinstance(f, Forward) and isinstance(f.h, Tensor)
        assert mx.array_equal(wire.to_array(f.h), mx.ones((1, 300, 512), mx.bfloat16)).item()
    (e,) = await _frames_from(struct.pack(">I", 10_000) + b"x", max_frame=1000)
    assert isinstance(e, wire.FrameError) and "over the maximum" in str(e)
    for cut in (end[:-2], big[:-2]):
        got = await _frames_from(end + cut)
        assert got[0] == End("r") and "truncated" in str(got[1])
    (e,) = await _frames_from(struct.pack(">I", 0))
    assert isinstance(e, wire.FrameError) and "empty" in str(e)
    (e,) = await _frames_from(b"")
    assert isinstance(e, ConnectionClosed)
