"""Helpers for the CNI tests and benchmarks: the built shim, running plugins as a runtime
does, network namespaces and bridges that are always removed.

No tests here.  Everything created on the host is named `wi-test-*` / `wibr*` with a random
suffix and removed by the fixtures' finalizers, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIM_DIR = REPO / "cni-shim"
SHIM = SHIM_DIR / "weave-ipam"
REF = Path("/usr/lib/cni")
BRIDGE = REF / "bridge"
HOST_LOCAL = REF / "host-local"
CONFLIST = REPO / "docker" / "10-weave-ipam.conflist"   # as shipped


def shim_binary() -> Path:
    """The shim, built with `make -C cni-shim` if missing or older than its source."""
    src = SHIM_DIR / "shim.c"
    if not SHIM.exists() or SHIM.stat().st_mtime < src.stat().st_mtime:
        r = subprocess.run(["make", "-C", str(SHIM_DIR)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, f"building the shim failed:\n{r.stdout}\n{r.stderr}"
    return SHIM


def reference_plugins() -> None:
    """Fail (not skip) without the reference plugins: CI installs them."""
    assert BRIDGE.exists() and HOST_LOCAL.exists(), (
        f"{BRIDGE} not found: run `apt-get install -y containernetworking-plugins`")


def netns_unavailable() -> str | None:
    """Why network namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, bridge)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    name = f"wi-test-probe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@dataclass
class CniRun:
    rc: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out) if self.out.strip() else None

    @property
    def code(self) -> int | None:
        j = self.json
        return j.get("code") if isinstance(j, dict) else None

    def __str__(self) -> str:
        return f"rc={self.rc} stdout={self.out.strip()!r} stderr={self.err.strip()!r}"


def run_plugin(binary: Path, command: str | None, stdin: bytes | str | dict[str, Any], *,
               container_id: str | None = None, netns: str | None = None,
               ifname: str | None = None, args: str | None = None,
               cni_path: str | None = None, socket: Path | str | None = None,
               extra_env: dict[str, str] | None = None, timeout: float = 90.0,
               in_netns: str | None = None) -> CniRun:
    """Execute a plugin as a runtime does: CNI_* in a clean environment, config on stdin;
    `in_netns`: as a runtime on the node that namespace stands for."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    for k, v in (("CNI_COMMAND", command), ("CNI_CONTAINERID", container_id),
                 ("CNI_NETNS", netns), ("CNI_IFNAME", ifname), ("CNI_ARGS", args),
                 ("CNI_PATH", cni_path),
                 ("WEAVE_IPAM_SOCKET", str(socket) if socket is not None else None)):
        if v is not None:
            env[k] = v
    env.update(extra_env or {})
    data = (json.dumps(stdin).encode() if isinstance(stdin, dict)
            else stdin.encode() if isinstance(stdin, str) else stdin)
    argv = [str(binary)] if in_netns is None else ["ip", "netns", "exec", in_netns,
                                                    str(binary)]
    r = subprocess.run(argv, input=data, env=env, capture_output=True, timeout=timeout)
    return CniRun(r.returncode, r.stdout.decode(errors="replace"),
                  r.stderr.decode(errors="replace"))


def ip(*argv: str, check: bool = True) -> str:
    r = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"ip {' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


@dataclass
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def addrs(self, dev: str = "eth0") -> list[str]:
        """Global addresses on `dev` inside the namespace, as address/prefix."""
        out = ip("-n", self.name, "-j", "addr", "show", "dev", dev, check=False)
        if not out.strip():
            return []
        return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out)
                for a in link.get("addr_info", []) if a.get("scope") == "global"]

    def has_link(self, dev: str) -> bool:
        return bool(ip("-n", self.name, "link", "show", "dev", dev, check=False).strip())


@dataclass
class HostScratch:
    """Namespaces and bridges made by one test or module; remove() takes them all away."""

    netns: list[Netns] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)

    def new_netns(self) -> Netns:
        ns = Netns(f"wi-test-{secrets.token_hex(4)}")
        ip("netns", "add", ns.name)
        self.netns.append(ns)
        return ns

    def new_bridge_name(self) -> str:
        name = f"wibr{secrets.token_hex(4)}"  # 12 characters: under IFNAMSIZ
        self.bridges.append(name)
        return name

    def remove(self) -> None:
        for ns in self.netns:
            ip("netns", "del", ns.name, check=False)  # its veth ends go with it
        for br in self.bridges:
            if ip("link", "show", "dev", br, check=False).strip():
                ip("link", "del", "dev", br, check=False)
        self.netns.clear()
        self.bridges.clear()


@contextlib.contextmanager
def host_scratch() -> Iterator[HostScratch]:
    h = HostScratch()
    try:
        yield h
    finally:
        h.remove()


class BridgeNet:
    """The reference `bridge` plugin delegating to weave-ipam (or host-local), driven as
    libcni drives it: the ADD result is passed back as prevResult to CHECK and DEL."""

    def __init__(self, scratch: HostScratch, *, socket: Path | None, version: str = "1.0.0",
                 name: str = "testnet", ipam: dict[str, Any] | None = None,
                 shim_dir: Path = SHIM_DIR) -> None:
        self.socket = socket
        self.version = version
        self.name = name
        self.bridge = scratch.new_bridge_name()
        self.ipam = ipam or {"type": "weave-ipam"}
        self.cni_path = f"{shim_dir}:{REF}"

    def conf(self, prev: Any = None) -> dict[str, Any]:
        c: dict[str, Any] = {"cniVersion": self.version, "name": self.name, "type": "bridge",
                             "bridge": self.bridge, "isGateway": False, "ipMasq": False,
                             "ipam": self.ipam}
        if prev is not None:
            c["prevResult"] = prev
        return c

    def run(self, command: str, ns: Netns | None, cid: str, *, ifname: str = "eth0",
            prev: Any = None, args: str | None = None,
            conf: dict[str, Any] | None = None) -> CniRun:
        return run_plugin(BRIDGE, command, conf or self.conf(prev), container_id=cid,
                          netns=ns.path if ns is not None else "", ifname=ifname, args=args,
                          cni_path=self.cni_path, socket=self.socket)

    def add(self, ns: Netns, cid: str, **kw: Any) -> CniRun:
        return self.run("ADD", ns, cid, **kw)

    def check(self, ns: Netns, cid: str, prev: Any, **kw: Any) -> CniRun:
        return self.run("CHECK", ns, cid, prev=prev, **kw)

    def delete(self, ns: Netns | None, cid: str, prev: Any = None, **kw: Any) -> CniRun:
        return self.run("DEL", ns, cid, prev=prev, **kw)


def ips_of(result: Any) -> list[str]:
    return [ipc["address"] for ipc in result.get("ips", [])]


@pytest.fixture(scope="module")
def shim() -> Path:
    return shim_binary()
