"""Daemons in their own network namespaces joined by veth pairs to one bridge.

The bridge lives in a namespace of its own (`wic-<run>-br`), so nothing but namespaces is
created on the host.  Node i has 198.18.<run>.<i+1>/24 on its `eth0`; the daemons' range is
never configured anywhere.  Processes are tracked by PID (`ip netns exec` execs the daemon,
so the PID is the daemon's) and killed at close().
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEER_PORT = 6783


def sh(*argv: str, check: bool = True, timeout: float = 30.0) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def netns_unavailable() -> str | None:
    """Why the namespace cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, bridge, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    name = f"wic-probe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", name, "iptables", "-S"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"iptables does not work in a namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def mac(run: int, idx: int, gen: int) -> str:
    return f"02:c5:{run:02x}:{gen & 0xff:02x}:00:{idx + 1:02x}"


class ChaosNode:
    """One daemon in namespace `ns`, its data dir and API socket on the shared filesystem."""

    def __init__(self, net: Net, idx: int, root: Path, range_: str, consensus: int) -> None:
        self.net = net
        self.idx = idx
        self.ns = f"wic-{net.tag}-{idx}"
        self.addr = f"198.18.{net.run}.{idx + 1}"
        self.nickname = f"node{idx}"
        self.gen = 0
        self.name = mac(net.run, idx, 0)
        self.dir = root / f"n{idx}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.socket = self.dir / "api.sock"
        self.log = self.dir / "log"
        self.range = range_
        self.consensus = consensus
        self.init: str | None = None  # another --ipalloc-init for the next start
        self.pod_routes = False
        self.peers: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns, sys.executable, "-m", "weaveipam", "daemon",
                *self.peers, "--name", self.name, "--nickname", self.nickname,
                "--ipalloc-range", self.range,
                "--ipalloc-init", self.init or f"consensus={self.consensus}",
                "--host", self.addr, "--port", str(PEER_PORT),
                "--data-dir", str(self.data_dir), "--socket", str(self.socket),
                "--http-addr", "", "--status-addr", "127.0.0.1:6782", "--op-timeout", "5",
                *(["--pod-routes"] if self.pod_routes else [])]

    def start(self) -> None:
        assert not self.running(), "already running"
        self.starts += 1
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with open(self.log, "ab") as logf:
            logf.write(f"--- start {self.starts} gen {self.gen} {time.time():.3f}\n".encode())
            logf.flush()
            env = dict(os.environ, PYTHONPATH=str(REPO))
            for k in ("PEERS", "IPALLOC_RANGE", "IPALLOC_INIT", "WEAVEIPAM_SOCKET",
                      "WEAVEIPAM_DATA_DIR"):
                env.pop(k, None)
            self.proc = subprocess.Popen(self.argv(), stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=self.dir)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)  # by PID: only our own child

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def wipe(self) -> None:
        """Forget everything: a fresh node with a new peer name (the old one was removed)."""
        assert not self.running()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.gen += 1
        self.name = mac(self.net.run, self.idx, self.gen)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ---- faults inside this namespace ------------------------------------------------

    def ipt(self, *args: str) -> None:
        sh("ip", "netns", "exec", self.ns, "iptables", "-w", *args)


class Net:
    """Namespaces, a bridge and veths; remove() takes everything away (idempotent)."""

    CHAINS = ("WICPART", "WICLOSS")

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.run = 100 + secrets.randbelow(150)   # 198.18.<run>.0/24
        self.brns = f"wic-{self.tag}-br"
        self.bridge = f"wicbr{secrets.token_hex(4)}"
        self.namespaces: list[str] = []

    def setup(self, n: int) -> list[str]:
        """Creates the bridge namespace and n node namespaces; returns their names."""
        sh("ip", "netns", "add", self.brns)
        self.namespaces.append(self.brns)
        sh("ip", "-n", self.brns, "link", "add", self.bridge, "type", "bridge")
        sh("ip", "-n", self.brns, "link", "set", self.bridge, "up")
        names = []
        for i in range(n):
            ns = f"wic-{self.tag}-{i}"
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name",
               f"v{i}", "netns", self.brns)
            sh("ip", "-n", ns, "addr", "add", f"198.18.{self.run}.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", self.brns, "link", "set", f"v{i}", "master", self.bridge)
            sh("ip", "-n", self.brns, "link", "set", f"v{i}", "up")
            for chain, hook in (("WICPART", "INPUT"), ("WICLOSS", "INPUT")):
                sh("ip", "netns", "exec", ns, "iptables", "-w", "-N", chain)
                sh("ip", "netns", "exec", ns, "iptables", "-w", "-A", hook, "-j", chain)
            names.append(ns)
        return names

    def remove(self) -> None:
        for ns in reversed(self.namespaces):
            # veth pairs and the bridge go with their namespaces; so do iptables rules
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


class ChaosCluster:
    def __init__(self, n: int, root: Path, range_: str = "10.32.0.0/16") -> None:
        self.net = Net()
        self.root = root
        self.nodes: list[ChaosNode] = []
        self.n = n
        self.range = range_

    def setup(self) -> None:
        self.net.setup(self.n)
        self.nodes = [ChaosNode(self.net, i, self.root, self.range, self.n)
                      for i in range(self.n)]
        for node in self.nodes:
            node.pod_routes = True  # the routed pod network, probed pod to pod at the end
            node.peers = [f"{m.addr}:{PEER_PORT}" for m in self.nodes if m is not node]

    def close(self) -> None:
        try:
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    node.kill()
        finally:
            self.net.remove()
