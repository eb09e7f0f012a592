"""Encrypted, authenticated peer connections (--password): real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nacl.pwhash.argon2id as argon2id
import pytest
from daemons import Cluster, cluster, free_ports, wait_for  # noqa: F401
from daemons import Node as Daemon
from test_cli import run
from test_mesh import MAX_FRAME, Node, until

from weaveipam.mesh import PROTOCOL_VERSION, MeshError, crypto
from weaveipam.mesh.frames import (
    Auth,
    ErrorFrame,
    FrameError,
    Hello,
    KeyExchange,
    decode_body,
    encode,
    read_frame,
)

PASSWORD = b"correct horse battery staple"

Hook = Callable[[int, int, bytes], list[bytes]]  # (connection no, frame no, frame) -> out


class Proxy:
    """A man in the middle between a dialler and a mesh: forwards whole frames, letting a
    hook alter, drop or repeat the frames going from the dialler to the listener."""

    def __init__(self, target_port: int, hook: Hook) -> None:
        self.target_port = target_port
        self.hook = hook
        self.conns = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        no = self.conns
        self.conns += 1
        ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, uwriter]
        up = asyncio.create_task(self._pump(reader, uwriter, lambda i, f: self.hook(no, i, f)))
        down = asyncio.create_task(self._pump(ureader, writer, lambda i, f: [f]))
        self.tasks |= {up, down}
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, uwriter):
            w.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    hook: Callable[[int, bytes], list[bytes]]) -> None:
        i = 0
        try:
            while True:
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big"))
                for out in hook(i, head + body):
                    writer.write(out)
                i += 1
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError):
            pass

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.transport.abort()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class World:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.proxies: list[Proxy] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def node(self, name: str, **kw: Any) -> Node:
        n = Node(name, **kw)
        await n.mesh.start()
        self.nodes.append(n)
        return n

    async def proxy(self, target: Node, hook: Hook) -> Proxy:
        p = Proxy(target.port, hook)
        await p.start()
        self.proxies.append(p)
        return p

    async def raw(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.writers.append(writer)
        return reader, writer

    async def close(self) -> None:
        for w in self.writers:
            w.transport.abort()
        for p in self.proxies:
            await p.close()
        for n in self.nodes:
            await n.mesh.stop()


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = World()
    try:
        yield w
    finally:
        await w.close()


def logged(caplog: pytest.LogCaptureFixture, *parts: str) -> bool:
    return any(all(p in r.getMessage() for p in parts) for r in caplog.records)


# ============================================================== pure parts


def test_seal_open_roundtrip_replay_and_tamper() -> None:
    secret = crypto.derive_secret(PASSWORD)
    assert secret == crypto.derive_secret(PASSWORD) != crypto.derive_secret(b"other")
    assert PASSWORD not in secret
    d2l, l2d = crypto.session_keys(secret, bytes(32), bytes(32))
    assert d2l != l2d
    sealer, opener = crypto.Sealer(d2l), crypto.Opener(d2l)
    frames = [encode(ErrorFrame(f"frame {i}")) for i in range(3)]
    sealed = [sealer.seal(f) for f in frames]
    assert len(sealed[0]) == len(frames[0]) + crypto.SEAL_OVERHEAD
    assert b"frame 0" not in sealed[0]
    assert opener.open(sealed[0][4:]) == frames[0][4:]
    with pytest.raises(crypto.ReplayError, match="counter 0, expected 1"):
        opener.open(sealed[0][4:])  # replay
    with pytest.raises(crypto.ReplayError, match="counter 2, expected 1"):
        opener.open(sealed[2][4:])  # skipped one
    bad = bytearray(sealed[1][4:])
    bad[-1] ^= 1
    with pytest.raises(FrameError, match="failed decryption"):
        opener.open(bytes(bad))
    assert opener.open(sealed[1][4:]) == frames[1][4:]  # a refused frame consumed nothing
    with pytest.raises(FrameError, match="failed decryption"):
        crypto.Opener(l2d).open(sealed[0][4:])  # the other direction's key
    with pytest.raises(MeshError):
        crypto.derive_secret(b"")


def test_hello_enc_flag_and_handshake_frames() -> None:
    plain = Hello(PROTOCOL_VERSION, "A", "a", 1, 6783, 2, 3)
    enc = Hello(PROTOCOL_VERSION, "A", "a", 1, 6783, 2, 3, encrypt=True)
    assert b"enc" not in encode(plain)  # byte-identical to hellos of before --password
    assert decode_body(encode(enc)[4:]) == enc
    assert decode_body(encode(plain)[4:]) == plain
    kx = KeyExchange(bytes(range(32)))
    assert decode_body(encode(kx)[4:]) == kx
    with pytest.raises(FrameError, match="kx.pub"):
        decode_body(encode(KeyExchange(b"short"))[4:])


def test_auth_tags_bind_role_and_transcript() -> None:
    secret = crypto.derive_secret(PASSWORD)
    th = crypto.transcript(b"h1", b"h2", b"p1", b"p2")
    assert th != crypto.transcript(b"h2", b"h1", b"p1", b"p2")
    tag = crypto.auth_tag(secret, th, crypto.DIALLER)
    assert crypto.check_tag(secret, th, crypto.DIALLER, tag)
    assert not crypto.check_tag(secret, th, crypto.LISTENER, tag)  # no reflection
    assert not crypto.check_tag(crypto.derive_secret(b"x"), th, crypto.DIALLER, tag)


def test_key_is_argon2id_salted_by_the_cluster_range() -> None:
    key = crypto.derive_secret(PASSWORD, "10.32.0.0/12")
    assert key == crypto.derive_secret(PASSWORD, "10.32.0.0/12")
    # two clusters with the same password get different keys
    assert key != crypto.derive_secret(PASSWORD, "10.40.0.0/12")
    assert key != crypto.derive_secret(b"other", "10.32.0.0/12")
    # the documented construction: Argon2id, 16-byte salt from the range, at least 16 MiB
    salt = crypto.cluster_salt("10.32.0.0/12")
    assert len(salt) == 16 and salt != crypto.cluster_salt("10.40.0.0/12")
    assert key == argon2id.kdf(32, PASSWORD, salt, opslimit=crypto.KDF_OPSLIMIT,
                               memlimit=crypto.KDF_MEMLIMIT)
    assert crypto.KDF_MEMLIMIT >= 16 << 20


def test_keyring_dials_with_the_first_and_accepts_either() -> None:
    old, new = b"old password", b"new password"
    ring = crypto.Keyring([new, old], "c")
    new_key, old_key = crypto.derive_secret(new, "c"), crypto.derive_secret(old, "c")
    assert ring.dial == new_key and ring.rotating
    th = crypto.transcript(b"h1", b"h2", b"p1", b"p2")
    old_tag = crypto.auth_tag(old_key, th, crypto.DIALLER)
    assert ring.match(th, crypto.DIALLER, old_tag) == old_key
    assert ring.match(th, crypto.DIALLER, old_tag, dial_only=True) is None
    assert ring.match(th, crypto.DIALLER, crypto.auth_tag(new_key, th, crypto.DIALLER)
                      ) == new_key
    assert ring.match(th, crypto.LISTENER, old_tag) is None  # bound to the role
    assert ring.match(th, crypto.DIALLER, crypto.auth_tag(
        crypto.derive_secret(b"third", "c"), th, crypto.DIALLER)) is None
    assert repr(ring) == "<Keyring of 2 secret(s)>" and not crypto.Keyring([new]).rotating
    with pytest.raises(MeshError, match="the second password is the same as the first"):
        crypto.Keyring([new, new])
    with pytest.raises(MeshError, match="give 1 to 2 passwords"):
        crypto.Keyring([new, old, b"x"])
    with pytest.raises(MeshError, match="give 1 to 2 passwords"):
        crypto.Keyring([])


# ============================================================== meshes


async def test_same_password_connects_encrypted_and_delivers(world: World) -> None:
    a = await world.node("A", password=PASSWORD)
    b = await world.node("B", password=PASSWORD)
    a.connect(b)
    await until(lambda: a.reach() == {"B"} and b.reach() == {"A"}, what="connected")
    assert a.mesh.encrypted and b.mesh.encrypted
    for n in (a, b):
        est = n.established()
        assert len(est) == 1 and est[0].encrypted
    assert a.mesh.send("B", {"k": "v", "blob": b"\x00" * 5000})
    b.mesh.broadcast({"hi": 1})
    await until(lambda: b.msgs and a.msgs, what="payloads")
    assert b.msgs == [("A", {"k": "v", "blob": b"\x00" * 5000})]
    assert a.msgs == [("B", {"hi": 1})]
    # a big payload near max_frame still fits once sealed
    assert a.mesh.send("B", {"big": b"x" * (MAX_FRAME - 100)})
    await until(lambda: len(b.msgs) == 2, what="big payload")
    await asyncio.sleep(0.5)  # heartbeats (sealed) keep it up
    assert a.reach() == {"B"}


async def test_three_encrypted_nodes_relay(world: World) -> None:
    a = await world.node("A", password=PASSWORD)
    b = await world.node("B", password=PASSWORD)
    c = await world.node("C", password=PASSWORD, conn_limit=1)
    a.connect(b)
    c.connect(b)
    await until(lambda: a.reach() == {"B", "C"} and c.reach() == {"A", "B"}, what="mesh")
    assert a.mesh.send("C", {"via": "relay"})
    await until(lambda: c.msgs == [("A", {"via": "relay"})], what="relayed")


async def test_wrong_password_refused_both_sides(world: World,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weaveipam.mesh")
    a = await world.node("A", password=PASSWORD)
    b = await world.node("B", password=b"not the same")
    a.connect(b)
    # B (the listener) refuses A's proof and tells it why; A gets no proof to check
    await until(lambda: logged(caplog, "from A(a)", "peer A(a) failed authentication: its "
                               "--password differs from ours")
                and logged(caplog, "to B(b)", "refused by peer: 'authentication failed: "
                           "every daemon needs the same --password"),
                what="both sides refuse")
    assert not a.reach() and not b.reach() and not a.established() and not b.established()
    assert not a.ups and not b.ups
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "password differs" in text and PASSWORD.decode() not in text


async def test_rotation_second_password_is_accepted_from_diallers_only(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weaveipam.mesh")
    old, new = b"old password", b"new password"
    swapped = await world.node("A", password=new, second_password=old)  # step 2
    added = await world.node("B", password=old, second_password=new)  # step 1
    before = await world.node("C", password=old)  # not touched yet
    swapped.connect(added)  # dials with new: accepted as B's second password
    before.connect(swapped)  # dials with old: accepted as A's second password
    await until(lambda: swapped.reach() == {"B", "C"} and before.reach() == {"A", "B"},
                what="all connected")
    assert all(c.encrypted for n in (swapped, added, before) for c in n.established())
    assert swapped.mesh.send("C", {"k": 1}) and before.mesh.send("A", {"k": 2})
    await until(lambda: ("A", {"k": 1}) in before.msgs and ("C", {"k": 2}) in swapped.msgs,
                what="delivered both ways")
    # the swapped daemon dials with the new password only: an old-only one refuses it
    stale = await world.node("D", password=old)
    swapped.connect(stale)
    await until(lambda: logged(caplog, "from A(a)", "peer A(a) failed authentication"),
                what="old-only listener refuses the new password")
    assert "A" not in stale.reach() and not stale.ups


async def test_same_password_other_range_is_refused(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weaveipam.mesh")
    a = await world.node("A", password=PASSWORD, cluster="10.32.0.0/12")
    b = await world.node("B", password=PASSWORD, cluster="10.40.0.0/12")
    a.connect(b)
    await until(lambda: logged(caplog, "from A(a)", "failed authentication", "or its "
                               "--ipalloc-range, which salts the key"), what="refused")
    assert not a.reach() and not b.reach()


async def test_password_vs_no_password_refused_both_ways(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weaveipam.mesh")
    a = await world.node("A", password=PASSWORD)
    b = await world.node("B")
    a.connect(b)  # the encrypting side dials
    await until(lambda: logged(caplog, "peer B(b) sent no encryption handshake: it has no "
                               "--password; give every daemon the same password")
                and logged(caplog, "peer A(a) requires encryption: start this daemon with "
                           "--password"), what="both messages (A dials)")
    caplog.clear()
    c = await world.node("C")
    d = await world.node("D", password=PASSWORD)
    c.connect(d)  # the plaintext side dials
    await until(lambda: logged(caplog, "to D(d)", "peer D(d) requires encryption")
                and logged(caplog, "from C(c)", "peer C(c) sent no encryption handshake"),
                what="both messages (C dials)")
    for n in (a, b, c, d):
        assert not n.reach() and not n.ups


async def test_tampered_ciphertext_closes_connection(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weaveipam.mesh")
    a = await world.node("A", password=PASSWORD)
    b = await world.node("B", password=PASSWORD)

    def flip(conn: int, i: int, frame: bytes) -> list[bytes]:
        # frames 0-2 are hello, kx, auth; 3 is the first sealed frame
        if conn == 0 and i == 4:
            bad = bytearray(frame)
            bad[len(bad) // 2 + 6] ^= 0x40
            return [bytes(bad)]
        return [frame]

    proxy = await world.proxy(b, flip)
    a.mesh.add_peer("127.0.0.1", proxy.port)
    await until(lambda: logged(caplog, "from A(a)", "failed decryption"), what="tamper seen")
    # the dialler reconnects (the proxy is honest from then on) and all is well again
    await until(lambda: a.reach() == {"B"} and proxy.conns >= 2, what="reconnected")
    assert a.mesh.send("B", {"after": True})
    await until(lambda: ("A", {"after": True}) in b.msgs, what="delivered")


async def test_replayed_frame_is_rejected(world: World,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weaveipam.mesh")
    a = await world.node("A", password=PASSWORD)
    b = await world.node("B", password=PASSWORD)

    def replay(conn: int, i: int, frame: bytes) -> list[bytes]:
        return [frame, frame] if conn == 0 and i == 3 else [frame]

    proxy = await world.proxy(b, replay)
    a.mesh.add_peer("127.0.0.1", proxy.port)
    await until(lambda: logged(caplog, "from A(a)", "replayed or reordered frame: counter 0, "
                               "expected 1"), what="replay rejected")


async def test_raw_replay_of_recorded_frame_into_new_connection(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Frames recorded from one connection mean nothing on another (fresh keys)."""
    caplog.set_level(logging.INFO, logger="weaveipam.mesh")
    a = await world.node("A", password=PASSWORD)
    b = await world.node("B", password=PASSWORD)
    recorded: list[bytes] = []

    def record(conn: int, i: int, frame: bytes) -> list[bytes]:
        if conn == 0:
            recorded.append(frame)
        return [frame]

    proxy = await world.proxy(b, record)
    a.mesh.add_peer("127.0.0.1", proxy.port)
    await until(lambda: b.reach() == {"A"} and len(recorded) >= 4, what="recorded")
    # an attacker replays the whole recorded dialler side into a fresh connection
    reader, writer = await world.raw(b.port)
    writer.write(b"".join(recorded[:4]))
    frames = []
    try:
        while True:
            frames.append(await read_frame(reader, MAX_FRAME, 3.0))
    except (asyncio.IncompleteReadError, FrameError, TimeoutError, OSError):
        pass
    assert any(isinstance(f, Hello) for f in frames)
    assert any(isinstance(f, ErrorFrame) and "authentication failed" in f.reason
               for f in frames)
    # the listener never proved anything to a dialler it refused: nothing to guess against
    assert not any(isinstance(f, Auth) for f in frames)
    assert logged(caplog, "peer A(a) failed authentication")
    assert b.reach() == {"A"}  # the real connection is untouched


async def test_handshake_timeouts(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weaveipam.mesh")
    a = await world.node("A", password=PASSWORD, handshake_timeout=0.5)
    # idle: connects and says nothing
    r1, _ = await world.raw(a.port)
    # half done: an encrypting hello, then nothing (no key exchange)
    r2, w2 = await world.raw(a.port)
    w2.write(encode(Hello(PROTOCOL_VERSION, "X", "x", 9, 0, 1, 1, encrypt=True)))
    for reader in (r1, r2):
        assert isinstance(await read_frame(reader, MAX_FRAME, 2.0), Hello)
        assert isinstance(await read_frame(reader, MAX_FRAME, 2.0), KeyExchange)
        last = await read_frame(reader, MAX_FRAME, 2.0)
        assert isinstance(last, ErrorFrame) and last.reason == "handshake timeout"
    await until(lambda: logged(caplog, "handshake timed out after 0.5s"), what="logged")


async def test_per_ip_cap_refuses_extra_connections(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weaveipam.mesh")
    a = await world.node("A", password=PASSWORD, max_per_ip=3, handshake_timeout=10.0)
    b = await world.node("B", password=PASSWORD)
    b.connect(a)  # one inbound connection from 127.0.0.1 at A
    await until(lambda: a.reach() == {"B"}, what="good peer up")
    readers = [(await world.raw(a.port))[0] for _ in range(5)]  # idle, half-open
    refused = 0
    for reader in readers:
        frame = await read_frame(reader, MAX_FRAME, 2.0)
        if isinstance(frame, ErrorFrame):
            assert "too many connections" in frame.reason
            refused += 1
    assert refused == 2  # 3 idle handshakes fill the cap of 3 (the good peer is in)
    assert logged(caplog, "too many connections from 127.0.0.1 (limit 3 per address")
    assert a.mesh.send("B", {"still": "working"})
    await until(lambda: ("A", {"still": "working"}) in b.msgs, what="good peer works")
    assert a.reach() == {"B"}


# ============================================================== daemons


def test_daemons_with_password_file(cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    secret = "s3cret-Pa55word-do-not-leak"
    pwfile = tmp_path / "pw"
    pwfile.write_text(secret + "\n")
    os.chmod(pwfile, 0o600)
    a, b = cluster.add(2, extra=["--password-file", str(pwfile)])
    ip = a.allocate("c1")
    assert ip.startswith("10.")
    assert b.allocate("c2").startswith("10.")
    wait_for(lambda: 'weave_connections{encryption="yes",state="established",type="tcp"} 1.0'
             in a.status("/metrics")[1], what="encrypted connection metric")
    code, text = a.status("/status")
    assert code == 200 and "Encryption: enabled" in text and " encrypted " in text
    rep = a.report()
    assert rep["connections"] and all(c["encrypted"] for c in rep["connections"]
                                      if c["state"] == "established")
    # a third daemon without a password is refused, with the message on both sides
    (c,) = cluster.add(1, init="observer", connect=False, start=False)
    c.peers = [a.peer_addr]
    c.start()
    wait_for(lambda: "requires encryption: start this daemon with --password"
             in c.log.read_text(errors="replace"), what="plaintext side message")
    wait_for(lambda: "sent no encryption handshake" in a.log.read_text(errors="replace"),
             what="encrypting side message")
    # the password is nowhere to be seen
    seen = []
    for node in (a, b):
        for path in ("/status", "/status/ipam", "/report", "/metrics", "/readyz"):
            seen.append(node.status(path)[1])
        for path in ("/ip", "/ip/c1", "/ipinfo/defaultsubnet", "/ring"):
            seen.append(str(node.api("GET", path)) + str(node.api("GET", path, unix=True)))
    for node in (a, b, c):
        seen.append(node.log.read_text(errors="replace"))
    blob = "\n".join(seen)
    assert ip in blob and "Encryption: enabled" in blob  # we did look at real output
    assert secret not in blob


async def test_bad_key_exchange_refused(world: World) -> None:
    a = await world.node("A", password=PASSWORD)
    reader, writer = await world.raw(a.port)
    writer.write(encode(Hello(PROTOCOL_VERSION, "X", "x", 9, 0, 1, 1, encrypt=True))
                 + encode(KeyExchange(bytes(32))))  # a low-order point: no shared secret
    frames = []
    try:
        while True:
            frames.append(await read_frame(reader, MAX_FRAME, 2.0))
    except (asyncio.IncompleteReadError, OSError):
        pass
    last = frames[-1]
    assert isinstance(last, ErrorFrame) and "kx.pub: unusable public key" in last.reason
    assert not a.reach()


# ============================================================== Kubernetes mode, rotation

KUBE_SECRET_HINT = "kubectl -n kube-system create secret generic weave-ipam-password"
# should a refused start ever go ahead, it binds only loopback and free ports
_LOCAL = ("--host", "127.0.0.1", "--port", "0", "--http-addr", "", "--status-addr", "")


def _kube_env() -> dict[str, str]:
    """What a pod sees; the address is ours (nothing listens on that loopback port)."""
    return {"KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(free_ports(1)[0]), "NODE_NAME": "node-a"}


def test_kubernetes_mode_without_password_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    r = run("daemon", *_LOCAL, "--data-dir", str(data), env=_kube_env())
    assert r.returncode == 2, r.stderr
    err = r.stderr
    assert err.startswith("weaveipam: refusing to start in Kubernetes "
                          "(KUBERNETES_SERVICE_HOST is set) without a peer password")
    for what_to_do in (KUBE_SECRET_HINT, "--password-file", "--insecure-peers",
                       "WEAVEIPAM_INSECURE_PEERS=1"):
        assert what_to_do in err
    assert "Traceback" not in err and not data.exists()  # nothing was started or written


def test_password_file_and_insecure_flag_mistakes_are_usage_errors(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    for content, message in [("Pw-1\nPw-2\nPw-3\n", "has 3 lines: give the password on "),
                             ("\nPw-2\n", "is empty (or its first line is)"),
                             ("Pw-1\nPw-1\n", "the second password is the same as the first"),
                             ("\n\n", "is empty")]:
        pw.write_text(content)
        r = run("daemon", *_LOCAL, "--data-dir", str(tmp_path / "d"), "--password-file", str(pw))
        assert r.returncode == 2 and message in r.stderr, (content, r.stderr)
        assert "Pw-" not in r.stderr  # a password is never echoed
    pw.write_text("fine\n")
    r = run("daemon", *_LOCAL, "--data-dir", str(tmp_path / "d"), "--password-file", str(pw),
            env={"WEAVEIPAM_INSECURE_PEERS": "1"})
    assert r.returncode == 2 and "drop --insecure-peers" in r.stderr, r.stderr
    r = run("daemon", *_LOCAL, "--data-dir", str(tmp_path / "d"),
            env={"WEAVEIPAM_INSECURE_PEERS": "maybe"})
    assert r.returncode == 2 and "WEAVEIPAM_INSECURE_PEERS='maybe': use 1 or 0" in r.stderr
    assert not (tmp_path / "d").exists()


def test_insecure_peers_starts_and_warns_at_every_start(cluster: Cluster) -> None:  # noqa: F811
    # --no-kube: no API server here; the peer-auth rule still sees KUBERNETES_SERVICE_HOST
    (n,) = cluster.add(1, init="consensus=1", extra=["--insecure-peers", "--no-kube"],
                       start=False)
    n.env = _kube_env()
    n.start()
    warning = "peer traffic is NOT authenticated or encrypted: anyone who can reach peer port"
    wait_for(lambda: warning in n.log.read_text(), what="warning")
    assert "Encryption: disabled (peers are not authenticated" in n.status("/status")[1]
    metrics = n.status("/metrics")[1]
    assert "weaveipam_peer_auth_enabled 0.0" in metrics
    assert "weaveipam_peer_auth_second_password 0.0" in metrics
    assert n.allocate("pod").startswith("10.")
    # the environment variable does the same, and the warning comes at every start
    assert n.stop() == 0
    n.extra, n.env = ["--no-kube"], {**_kube_env(), "WEAVEIPAM_INSECURE_PEERS": "1"}
    n.start()
    wait_for(lambda: n.log.read_text().count(warning) == 2, what="second warning")


def _write(path: Path, *lines: str) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))
    os.chmod(path, 0o600)


def _established(node: Daemon) -> set[str]:
    return {c["name"] for c in node.report()["connections"]
            if c["state"] == "established" and c["encrypted"]}


def test_rotation_one_daemon_at_a_time_keeps_the_cluster_up(
        cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    """The README's rollout (add the new password second, restart each daemon; swap the
    lines, restart each; drop the old one, restart each) never refuses a handshake,
    daemons that stay up never lose each other, and every daemon that is up keeps
    allocating; afterwards a daemon with only the old password is refused."""
    old, new = "old-Pa55word-rotated-away", "new-Pa55word-rotated-in"
    files = [tmp_path / f"pw{i}" for i in range(3)]
    for f in files:
        _write(f, old)
    nodes = cluster.add(3, start=False)
    for node, f in zip(nodes, files, strict=True):
        node.extra = ["--password-file", str(f)]
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_up()
    names = {node.name for node in nodes}
    wait_for(lambda: all(_established(n) == names - {n.name} for n in nodes), what="mesh")
    n_alloc = seen_down = 0

    def allocate_on(node: Daemon) -> None:
        nonlocal n_alloc
        n_alloc += 1
        assert node.allocate(f"pod-{n_alloc}", timeout=30).startswith("10.")

    for node in nodes:
        allocate_on(node)
    for step, lines in enumerate([(old, new), (new, old), (new,)], 1):
        for i, node in enumerate(nodes):
            others = [m for m in nodes if m is not node]
            marks = [len(m.log.read_text()) for m in others]
            _write(files[i], *lines)
            assert node.stop() == 0
            for m in others:  # the rest of the cluster allocates while it is down
                allocate_on(m)
            wait_for(lambda others=others: all(  # and stays connected
                _established(m) == {o.name for o in others if o is not m} for m in others),
                what=f"step {step}: the others connected while node{i} is down")
            node.start()
            wait_for(lambda node=node, others=others: _established(node) == names - {node.name}
                     and all(node.name in _established(m) for m in others),
                     what=f"step {step}: node{i} back in the mesh")
            allocate_on(node)
            for m, mark in zip(others, marks, strict=True):
                # daemons that stayed up never lost sight of each other
                since = m.log.read_text()[mark:]
                lost = [line for line in since.splitlines() if " unreachable" in line]
                assert all(f"peer {node.name} unreachable" in x for x in lost), lost
                seen_down += len(lost)
            expect = ("a second password is accepted too" if len(lines) == 2
                      else "enabled (peers authenticated)")
            assert expect in node.status("/status")[1]
            assert (f"weaveipam_peer_auth_second_password {float(len(lines) == 2)}"
                    in node.status("/metrics")[1])
    assert seen_down >= 9  # the check above did see the restarts (its lines are real)
    for node in nodes:
        text = node.log.read_text()
        assert "failed authentication" not in text and "refused by peer" not in text
        assert old not in text and new not in text
        assert "weaveipam_peer_auth_enabled 1.0" in node.status("/metrics")[1]
    # a daemon that still has only the old password is refused
    (late,) = cluster.add(1, init="observer", connect=False, start=False)
    stale = tmp_path / "stale"
    _write(stale, old)
    late.extra = ["--password-file", str(stale)]
    late.peers = [nodes[0].peer_addr]
    late.start()
    wait_for(lambda: f"peer {late.name}(node3) failed authentication"
             in nodes[0].log.read_text(), what="old password refused")
    wait_for(lambda: "refused by peer: 'authentication failed" in late.log.read_text(),
             what="the refused daemon is told why")
    assert _established(late) == set()
