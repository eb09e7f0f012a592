"""The shipped conflist through a real runtime: a private containerd runs busybox containers
with `ctr run --cni`, Debian's `bridge` and `portmap`, our static shim and two real daemons
sharing one ring on loopback.

Each node's network is a namespace made here (test_cni_runtime.py says how the runtime is
kept away from the host); the daemons' range is 198.18.64.0/24 and its addresses exist only
in those namespaces and the containers'.  `docker/10-weave-ipam.conflist` is used as
shipped, bridge name included: the bridge lives in the node's namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import Node, temp_cluster, wait_for
from test_cni_bridge import owner_of
from test_cni_runtime import Containerd, containerd, describe, runtime_missing
from test_cni_runtime import Node as RtNode
from test_cni_support import CONFLIST, REPO, shim_binary

RANGE = "198.18.64.0/24"


@pytest.fixture(scope="module")
def daemons() -> Iterator[list[Node]]:
    missing = runtime_missing()
    if missing:
        why = "the containerd test needs " + "; ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    shim_binary()
    with temp_cluster("wictr-d-") as c:
        yield c.add(2, range_=RANGE, init="consensus=2")


@pytest.fixture
def runtime() -> Iterator[Containerd]:
    with containerd() as rt:
        yield rt
    assert rt.leftovers() == []


def ls(n: Node) -> dict[str, list[str]]:
    """`weaveipam ls` as a user runs it: ident -> addresses."""
    r = subprocess.run([sys.executable, "-m", "weaveipam", "ls", "--socket", str(n.socket)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, describe(r)
    out = {}
    for line in r.stdout.splitlines():
        ident, addrs, *_ = line.split("\t")
        out[ident] = [a.split("/")[0] for a in addrs.split()]
    return out


def ident(rt: Containerd, cid: str) -> str:
    """The daemon's key: the conflist's network name, ctr's `<namespace>-<id>`, eth0."""
    return f"cni:weave-ipam:{rt.ns}-{cid}:eth0"


def running_pod(node: RtNode, cid: str) -> tuple[subprocess.Popen[str], str]:
    p = node.start(cid, "sleep", "300")
    return p, node.pod_addr(cid, p)


def host(a: str) -> str:
    return a.split("/")[0]


# The conflist shipped before routed pods (issue 15): `bridge` with isGateway, whose first
# pod got the bridge's own address when the IPAM result carried no gateway.
BRIDGE_CONFLIST = {"cniVersion": "1.0.0", "name": "weave-ipam", "plugins": [
    {"type": "bridge", "bridge": "weave-ipam0", "isGateway": True, "ipMasq": False,
     "hairpinMode": True, "ipam": {"type": "weave-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": True}}]}


@pytest.mark.parametrize("conflist", ["shipped", "bridge"])
def test_pods_through_a_real_runtime(daemons: list[Node], runtime: Containerd,
                                     conflist: str) -> None:
    """The shipped conflist (routed: `ptp`) and the `bridge` one: the host side's address
    is the node's gateway, never a pod's; pods reach each other and the gateway."""
    d1, d2 = daemons
    rt = runtime
    text = CONFLIST.read_text() if conflist == "shipped" else json.dumps(BRIDGE_CONFLIST)
    kind = json.loads(text)["plugins"][0]["type"]
    shim = shim_binary()
    n1 = rt.node("n1", d1.socket, text, shim)
    n2 = rt.node("n2", d2.socket, text, shim)

    # two pods running side by side on node 1
    pa, addr_a = running_pod(n1, "pod-a")
    pb, addr_b = running_pod(n1, "pod-b")
    (gw,) = n1.host_addrs()
    assert addr_a != addr_b and host(gw) not in (host(addr_a), host(addr_b))
    assert gw.endswith("/32" if kind == "ptp" else "/24")  # ptp: on each veth; bridge: pods'
    for a in (addr_a, addr_b, gw):
        assert ipaddress.ip_interface(a).ip in ipaddress.ip_network(RANGE)
    assert addr_a.endswith("/24") and addr_b.endswith("/24")
    # the host side's address is this node's gateway: held by the daemon, in its segment
    held = ls(d1)
    assert held["weave:expose"] == [host(gw)]
    assert owner_of(d1, host(gw)) == d1.name
    assert held[ident(rt, "pod-a")] == [host(addr_a)]
    assert held[ident(rt, "pod-b")] == [host(addr_b)]
    if kind == "ptp":
        r = n1.exec("pod-a", "ip", "-4", "route")
        assert f"default via {host(gw)}" in r.stdout, describe(r)
        assert f"{RANGE} via {host(gw)}" in r.stdout, describe(r)

    # nobody else answers for a pod's address; the check itself sees a real holder
    dad = n1.exec("pod-a", "arping", "-D", "-c", "2", "-w", "3", "-I", "eth0", host(addr_a))
    assert dad.returncode == 0, describe(dad)
    for taken in [gw] + ([addr_b] if kind == "bridge" else []):  # ptp: b is behind the host
        dad = n1.exec("pod-a", "arping", "-D", "-c", "2", "-w", "3", "-I", "eth0",
                      host(taken))
        assert dad.returncode == 1, f"{taken}: {describe(dad)}"
    for target in (addr_b, gw):
        r = n1.exec("pod-a", "ping", "-c", "1", "-W", "5", host(target))
        assert r.returncode == 0, f"ping {target}: {describe(r)}"

    # the runtime's DEL (ctr run --rm, after the task is killed) frees the addresses
    for cid, p in (("pod-a", pa), ("pod-b", pb)):
        n1.kill(cid)
        out, err = p.communicate(timeout=60)
        assert p.returncode is not None, err
    held = ls(d1)
    assert ident(rt, "pod-a") not in held and ident(rt, "pod-b") not in held
    assert held["weave:expose"] == [host(gw)]

    # later pods on node 1: fresh addresses, never the gateway's
    later = []
    for cid in ("pod-c", "pod-d"):
        r = n1.run(cid, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
        assert r.returncode == 0, describe(r)
        later.append(r.stdout.split("inet ")[1].split()[0])
    assert len({host(a) for a in later} | {host(addr_a), host(addr_b), host(gw)}) == 5
    assert n1.host_addrs() <= {gw}  # ptp: the veths went with their pods

    # node 2: its own gateway, from its own segment
    r = n2.run("pod-e", "sh", "-c", "ip -4 -o addr show dev eth0; ip -4 route")
    assert r.returncode == 0, describe(r)
    addr_e = r.stdout.split("inet ")[1].split()[0]
    gw2 = d2.lookup("weave:expose")
    assert len(gw2) == 1 and gw2[0] != host(gw) and gw2[0] != host(addr_e)
    assert owner_of(d2, gw2[0]) == d2.name and owner_of(d1, gw2[0]) == d2.name
    if kind == "ptp":  # the pod's routes point at node 2's gateway (its veth is gone now)
        assert f"default via {gw2[0]}" in r.stdout, describe(r)
    else:
        assert n2.host_addrs() == {f"{gw2[0]}/24"}
    assert host(addr_e) not in {host(a) for a in [*later, addr_a, addr_b, gw]}
    wait_for(lambda: not [i for i in ls(d1) | ls(d2) if i.startswith("cni:")],
             timeout=20, what="every pod's address released")


def test_cleanup_after_a_failure(daemons: list[Node]) -> None:
    """A test that fails with a pod still running leaves nothing behind either."""
    d1, _ = daemons
    rt = Containerd()
    try:
        rt.start()
        n1 = rt.node("f1", d1.socket, CONFLIST.read_text(), shim_binary())
        running_pod(n1, "pod-left")
        assert ls(d1)[ident(rt, "pod-left")]
    finally:
        rt.close()
    assert rt.leftovers() == []
    assert not Path(f"/run/netns/{n1.netns}").exists()
