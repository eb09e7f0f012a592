"""What peer encryption (--password) costs.

allocate+release over the local API never touches peer crypto, so this measures the
peer path itself:

0. the key derivation at start-up (Argon2id, once per process): CPU-seconds from
   time.process_time(), for one password and for two (while rotating); budget 0.1 s;
1. seal+open of one frame in isolation (XSalsa20-Poly1305 via PyNaCl), per payload size;
2. engine payloads/s and MB/s from one mesh to another over loopback, plaintext vs
   encrypted, same payloads (a window of in-flight messages keeps the bounded send queue
   from overflowing);
3. handshake: connections/s set up between two meshes, plaintext vs encrypted;
4. optionally a cluster's consensus time (start N daemons to all allocated) with and
   without --password.

    python benchmarks/bench_crypto.py [--seconds 3] [--nodes 3] [--runs 3] [--skip-cluster]
    python benchmarks/bench_crypto.py --kdf-only [--kdf-runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from daemons import Cluster  # noqa: E402

from weaveipam.mesh import Mesh, crypto  # noqa: E402
from weaveipam.mesh.frames import Message, encode, encode_payload  # noqa: E402

PASSWORD = b"benchmark password"
SIZES = (64, 1024, 16384, 262144)
WINDOW = 256  # messages in flight (fewer for big payloads)


KDF_BUDGET = 0.1  # CPU-seconds a daemon may spend deriving its keys at start-up


def bench_kdf(runs: int) -> None:
    """CPU of what a daemon does once at start: build its Keyring (Argon2id per password)."""
    print(f"Argon2id opslimit={crypto.KDF_OPSLIMIT} memlimit={crypto.KDF_MEMLIMIT >> 20} MiB")
    for passwords in ([PASSWORD], [PASSWORD, b"previous " + PASSWORD]):
        took = []
        for _ in range(runs):
            t0 = time.process_time()
            crypto.Keyring(passwords, "10.32.0.0/12")
            took.append(time.process_time() - t0)
        took.sort()
        worst = took[-1]
        print(f"key derivation, {len(passwords)} password(s): median {took[len(took) // 2]:.3f}"
              f" CPU-s, min {took[0]:.3f}, max {worst:.3f} ({runs} runs; budget "
              f"{KDF_BUDGET} s: {'ok' if worst < KDF_BUDGET else 'OVER'})")


def bench_seal(seconds: float) -> None:
    secret = crypto.derive_secret(PASSWORD)
    key, _ = crypto.session_keys(secret, bytes(32), bytes(32))
    for size in SIZES:
        frame = encode(Message("A", "B", 64, encode_payload({"p": b"x" * size})))
        sealer, opener = crypto.Sealer(key), crypto.Opener(key)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / len(SIZES):
            for _ in range(100):
                opener.open(sealer.seal(frame)[4:])
            n += 100
        el = time.perf_counter() - t0
        print(f"seal+open {size:>7} B payload: {n / el:>10.0f} frames/s "
              f"{n * len(frame) / el / 1e6:8.1f} MB/s  ({el / n * 1e6:6.1f} us/frame)")


class _Pair:
    def __init__(self, password: bytes | None) -> None:
        self.got = 0
        self.event = asyncio.Event()
        kw: dict[str, Any] = dict(host="127.0.0.1", port=0, password=password,
                                  max_frame=1 << 20, send_queue=4 * WINDOW,
                                  on_peer_up=lambda p: None, on_peer_down=lambda n: None)
        self.a = Mesh(name="A", nickname="a", uid=1, on_message=lambda s, p: None, **kw)
        self.b = Mesh(name="B", nickname="b", uid=2, on_message=self._recv, **kw)

    def _recv(self, src: str, payload: dict[str, Any]) -> None:
        self.got += 1
        self.event.set()

    async def start(self) -> None:
        await self.a.start()
        await self.b.start()
        self.a.add_peer("127.0.0.1", self.b.listen_port)
        while not self.a.reachable() or not self.b.reachable():
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        await self.a.stop()
        await self.b.stop()


async def _throughput(password: bytes | None, size: int, seconds: float) -> tuple[float, float]:
    pair = _Pair(password)
    await pair.start()
    payload = {"p": b"x" * size}
    window = max(4, min(WINDOW, (2 << 20) // size))  # within the send queue's byte cap
    try:
        sent, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            while sent - pair.got < window:
                assert pair.a.send("B", payload), "send queue overflow"
                sent += 1
            pair.event.clear()
            await pair.event.wait()
        while pair.got < sent:
            pair.event.clear()
            await pair.event.wait()
        el = time.perf_counter() - t0
    finally:
        await pair.stop()
    return sent / el, sent * size / el / 1e6


async def bench_mesh(seconds: float) -> None:
    for size in SIZES:
        plain = await _throughput(None, size, seconds)
        enc = await _throughput(PASSWORD, size, seconds)
        print(f"mesh {size:>7} B payloads: plaintext {plain[0]:>8.0f} msg/s "
              f"{plain[1]:7.1f} MB/s | encrypted {enc[0]:>8.0f} msg/s {enc[1]:7.1f} MB/s "
              f"({100 * (enc[0] / plain[0] - 1):+.0f}%)")


async def _handshakes(password: bytes | None, n: int) -> float:
    pair = _Pair(password)
    await pair.start()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            for conn in list(pair.a._conns):  # drop it; the dialler re-dials at once
                conn.close("bench")
            while pair.a.reachable():
                await asyncio.sleep(0)
            for t in pair.a._targets.values():
                t.next_try = 0.0
            pair.a._wake.set()
            while not pair.a.reachable() or not pair.b.reachable():
                await asyncio.sleep(0.001)
        return n / (time.perf_counter() - t0)
    finally:
        await pair.stop()


async def bench_handshake(n: int) -> None:
    plain = await _handshakes(None, n)
    enc = await _handshakes(PASSWORD, n)
    print(f"reconnect+handshake: plaintext {plain:6.0f}/s, encrypted {enc:6.0f}/s")


def bench_consensus(n: int, password: bool) -> float:
    root = Path(tempfile.mkdtemp(prefix="wb-"))
    extra: list[str] = []
    if password:
        pw = root / "pw"
        pw.write_bytes(PASSWORD)
        extra = ["--password-file", str(pw)]
    c = Cluster(root)
    try:
        t0 = time.perf_counter()
        nodes = c.add(n, start=False, extra=extra)
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_up(60)
        with ThreadPoolExecutor(n) as ex:
            addrs = list(ex.map(lambda nd: nd.allocate(f"first-{nd.idx}"), nodes))
        assert len(set(addrs)) == n
        return time.perf_counter() - t0
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--handshakes", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3, help="cluster runs each way")
    ap.add_argument("--skip-cluster", action="store_true")
    ap.add_argument("--kdf-runs", type=int, default=20)
    ap.add_argument("--kdf-only", action="store_true", help="only the key derivation")
    args = ap.parse_args()
    bench_kdf(args.kdf_runs)
    if args.kdf_only:
        return
    bench_seal(args.seconds)
    asyncio.run(bench_mesh(args.seconds))
    asyncio.run(bench_handshake(args.handshakes))
    if not args.skip_cluster:
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.runs):  # alternating, so load changes hit both alike
            for password in (False, True):
                times[password].append(bench_consensus(args.nodes, password))
        for password, took in times.items():
            print(f"consensus={args.nodes} start to all allocated, "
                  f"{'with' if password else 'without'} --password: median "
                  f"{sorted(took)[len(took) // 2]:5.2f} s (runs: "
                  + ", ".join(f"{t:.2f}" for t in took) + ")")


if __name__ == "__main__":
    main()
