"""How long a hostile frame can hold the mesh's event loop.

A frame of ~1 M empty msgpack arrays is refused by the object-count scan before any
decoding.  This measures, in one run: the CPU-seconds this process needs to decode one such
frame (what an unscanned mesh would block its loop for), and the longest event-loop stall
while a live mesh refuses `--bombs` of them over loopback.  tests/test_mesh.py checks the
refusal itself (its reason), not these times.

    python benchmarks/bench_mesh_hostile.py [--bombs 5] [--frame-mb 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weaveipam.mesh import Mesh  # noqa: E402


def bomb(frame_bytes: int) -> bytes:
    body: bytes = msgpack.packb({"t": "hb", "x": [[]] * (frame_bytes - 64)}, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def decode_cpu_s(frame: bytes, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.process_time()
        msgpack.unpackb(frame[4:], raw=False)
        best = min(best, time.process_time() - t0)
    return best


async def stall_s(frame: bytes, bombs: int) -> float:
    mesh = Mesh(name="A", nickname="a", uid=1, host="127.0.0.1", port=0,
                max_frame=len(frame), on_message=lambda s, p: None,
                on_peer_up=lambda p: None, on_peer_down=lambda n: None)
    await mesh.start()
    loop = asyncio.get_running_loop()
    lag, stop = 0.0, False

    async def ticker() -> None:
        nonlocal lag
        while not stop:
            t = loop.time()
            await asyncio.sleep(0)
            lag = max(lag, loop.time() - t)

    tick = asyncio.create_task(ticker())
    try:
        for _ in range(bombs):
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.listen_port)
            writer.write(frame)
            while await reader.read(65536):
                pass
            writer.close()
    finally:
        stop = True
        await tick
        await mesh.stop()
    return lag


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bombs", type=int, default=5)
    ap.add_argument("--frame-mb", type=float, default=1.0)
    a = ap.parse_args()
    frame = bomb(int(a.frame_mb * (1 << 20)))
    decode = decode_cpu_s(frame)
    lag = asyncio.run(stall_s(frame, a.bombs))
    print(f"decoding one {len(frame) >> 10} KiB object bomb: {decode * 1000:.1f} ms CPU; "
          f"longest loop stall while {a.bombs} were refused: {lag * 1000:.1f} ms "
          f"({lag / decode:.2f} of one decode)")


if __name__ == "__main__":
    main()
