"""The real client: the reference `bridge` plugin delegating to our shim, against real
daemon processes, configuring network namespaces made (and always removed) here.

Addresses come from 198.18.0.0/15 only and live only inside our namespaces; no traffic is
sent.  cniVersion 1.1.0 (and its STATUS and GC) go to the shim directly, as a 1.1 runtime
would, when the installed bridge predates 1.1.0.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from capability import missing
from daemons import Cluster, Node, temp_cluster
from test_cni_support import (
    BRIDGE,
    CONFLIST,
    REPO,
    BridgeNet,
    CniRun,
    HostScratch,
    host_scratch,
    ips_of,
    netns_unavailable,
    reference_plugins,
    run_plugin,
    shim,  # noqa: F401
    shim_binary,
)

from weaveipam.cni.config import plugin_wants_gateway

__all__ = ["shim"]

RANGE = "198.18.0.0/24"
OLD_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]


@pytest.fixture(scope="module", autouse=True)
def _host_ok() -> None:
    why = netns_unavailable()
    if why:
        missing(why)
    reference_plugins()
    shim_binary()


@pytest.fixture(scope="module")
def cluster_root() -> Iterator[Cluster]:
    with temp_cluster("wc-") as c:
        yield c


@pytest.fixture(scope="module")
def node(cluster_root: Cluster) -> Node:
    """One ready daemon on a small range."""
    (n,) = cluster_root.add(1, range_=RANGE, init="consensus=1", connect=False)
    return n


@pytest.fixture
def scratch() -> Iterator[HostScratch]:
    with host_scratch() as h:
        yield h


def cid() -> str:
    return secrets.token_hex(16)


def owned(n: Node) -> dict[str, list[str]]:
    code, body = n.api("GET", "/ip", json_=True)
    assert code == 200, body
    return {o["containerid"]: [a.split("/")[0] for a in o["addrs"]]
            for o in json.loads(body)["owned"]}


def ident(c: str, ifname: str = "eth0", net: str = "testnet") -> str:
    return f"cni:{net}:{c}:{ifname}"


def bridge_versions() -> list[str]:
    r = run_plugin(BRIDGE, "VERSION", {"cniVersion": "0.4.0"})
    return list(r.json["supportedVersions"]) if r.rc == 0 else []


def ok(r: CniRun) -> Any:
    assert r.rc == 0, str(r)
    return r.json


def err(r: CniRun, code: int) -> dict[str, Any]:
    assert r.rc != 0, str(r)
    j = r.json
    assert isinstance(j, dict) and j.get("code") == code, str(r)
    return j


# ---- the whole life of an attachment, in every version ---------------------------------------

@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_add_check_del_through_bridge(node: Node, scratch: HostScratch, version: str) -> None:
    ns = scratch.new_netns()
    net = BridgeNet(scratch, socket=node.socket, version=version)
    c = cid()
    res = ok(net.add(ns, c, args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;"
                                  "K8S_POD_NAME=web-1"))
    assert res["cniVersion"] == version
    (addr,) = ips_of(res)
    assert ipaddress.ip_interface(addr).ip in ipaddress.ip_network(RANGE)
    assert addr.endswith("/24")  # the subnet's prefix
    if version < "1.0.0":
        assert [i.get("version") for i in res["ips"]] == ["4"]
    else:
        assert "version" not in res["ips"][0]
    assert ns.addrs() == [addr]  # configured inside the namespace
    ip_only = addr.split("/")[0]
    assert owned(node)[ident(c)] == [ip_only]
    code, body = node.api("GET", "/ip", json_=True)
    assert "default/web-1" in body  # the pod, as `weaveipam ls` shows it

    if version >= "0.4.0":
        ok(net.check(ns, c, res))
    ok(net.delete(ns, c, res))
    assert not ns.has_link("eth0")
    assert ident(c) not in owned(node)
    assert all(ip_only not in addrs for addrs in owned(node).values())
    ok(net.delete(ns, c, res))  # DEL twice: still a success
    if version >= "0.4.0":
        j = err(net.check(ns, c, res), 3)  # CHECK after DEL: nothing held
        assert "no address is held" in j["msg"]


def test_version_1_1_0(node: Node, scratch: HostScratch, shim: Path) -> None:
    """1.1.0 through bridge if it speaks 1.1.0, else straight to the shim as a runtime."""
    c = cid()
    if "1.1.0" in bridge_versions():
        ns = scratch.new_netns()
        net = BridgeNet(scratch, socket=node.socket, version="1.1.0")
        res = ok(net.add(ns, c))
        assert ns.addrs() == ips_of(res)
        ok(net.check(ns, c, res))
        ok(net.delete(ns, c, res))
    else:
        conf = {"cniVersion": "1.1.0", "name": "testnet", "ipam": {"type": "weave-ipam"}}
        kw: dict[str, Any] = {"container_id": c, "netns": "/run/netns/none", "ifname": "eth0",
                              "socket": node.socket}
        res = ok(run_plugin(shim, "ADD", conf, **kw))
        assert res["cniVersion"] == "1.1.0" and "version" not in res["ips"][0]
        ok(run_plugin(shim, "CHECK", {**conf, "prevResult": res}, **kw))
        ok(run_plugin(shim, "DEL", {**conf, "prevResult": res}, **kw))
    assert ident(c) not in owned(node)


def test_repeated_add_interfaces_and_networks(node: Node, shim: Path) -> None:
    """Same key: same address.  Another interface or another network: its own address."""
    c = cid()
    conf = {"cniVersion": "1.0.0", "name": "testnet", "ipam": {"type": "weave-ipam"}}

    def add(ifname: str, name: str = "testnet") -> str:
        r = run_plugin(shim, "ADD", {**conf, "name": name}, container_id=c,
                       netns="/run/netns/x", ifname=ifname, socket=node.socket)
        (a,) = ips_of(ok(r))
        return str(a)

    first = add("eth0")
    assert add("eth0") == first
    second = add("net1")
    multus = add("eth0", "macvlan-secondary")
    assert len({first, second, multus}) == 3
    held = owned(node)
    assert ident(c, "net1") in held and ident(c, "eth0", "macvlan-secondary") in held
    for ifname, name in (("eth0", "testnet"), ("net1", "testnet"),
                         ("eth0", "macvlan-secondary")):
        ok(run_plugin(shim, "DEL", {**conf, "name": name}, container_id=c, netns="",
                      ifname=ifname, socket=node.socket))
    assert not [k for k in owned(node) if c in k]


def test_del_without_add_and_without_netns(node: Node, scratch: HostScratch) -> None:
    net = BridgeNet(scratch, socket=node.socket)
    ok(net.delete(None, cid()))  # never added, namespace already gone


# ---- a cluster --------------------------------------------------------------------------------

def test_two_daemons_give_different_addresses(scratch: HostScratch) -> None:
    root = Path(tempfile.mkdtemp(prefix="wc2-"))
    c = Cluster(root)
    try:
        a, b = c.add(2, range_="198.18.1.0/24", init="consensus=2")
        got = []
        for n in (a, b):
            ns = scratch.new_netns()
            net = BridgeNet(scratch, socket=n.socket)
            res = ok(net.add(ns, cid()))
            assert ns.addrs() == ips_of(res)
            got.append(ips_of(res)[0])
        assert got[0] != got[1]
        assert all(ipaddress.ip_interface(g).ip in ipaddress.ip_network("198.18.1.0/24")
                   for g in got)
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def shipped_plugin(name: str = "weave-ipam") -> dict[str, Any]:
    """The first plugin of the shipped conflist as a runtime hands it to IPAM."""
    conflist = json.loads(CONFLIST.read_text())
    return {"cniVersion": conflist["cniVersion"], "name": conflist["name"],
            **conflist["plugins"][0]}


def owner_of(n: Node, addr: str) -> str:
    """The peer whose ring segment holds addr, from the node's /report."""
    a = int(ipaddress.ip_address(addr))
    for e in n.report()["entries"]:
        start = int(ipaddress.ip_address(e["token"]))
        if start <= a < start + e["size"]:
            return str(e["peer"])
    raise AssertionError(f"{addr} is in no ring entry")


def test_every_node_has_its_own_gateway_in_its_own_segment(shim: Path) -> None:
    """The shipped conflist's plugin (it puts a gateway on the host side) on a 3-node ring:
    each node's gateway lies in that node's segment, they differ, no pod gets one, and a
    restart keeps it."""
    conf = shipped_plugin()
    assert plugin_wants_gateway(conf)
    with temp_cluster("wcg-") as c:
        nodes = c.add(3, range_="198.18.8.0/22", init="consensus=3")
        gws, pods = [], []
        for n in nodes:
            for _ in range(2):
                res = ok(run_plugin(shim, "ADD", conf, container_id=cid(), netns="/x",
                                    ifname="eth0", socket=n.socket))
                (ipc,) = res["ips"]
                assert ipc["address"].endswith("/22")
                pods.append(ipc["address"].split("/")[0])
            gws.append(ipc["gateway"])
            assert n.lookup("weave:expose") == [ipc["gateway"]]
            assert owner_of(n, ipc["gateway"]) == n.name
        assert len(set(gws)) == 3 and not set(gws) & set(pods)
        assert len(set(pods)) == 6

        n = nodes[1]
        assert n.stop() == 0
        n.start()
        res = ok(run_plugin(shim, "ADD", conf, container_id=cid(), netns="/x", ifname="eth0",
                            socket=n.socket))
        assert res["ips"][0]["gateway"] == gws[1]


def test_api_cannot_touch_the_gateway(node: Node, shim: Path) -> None:
    res = ok(run_plugin(shim, "ADD", shipped_plugin(), container_id=cid(), netns="/x",
                        ifname="eth0", socket=node.socket))
    gw = res["ips"][0]["gateway"]
    for method, path in (("DELETE", "/ip/weave:expose"), ("DELETE", f"/ip/weave:expose/{gw}"),
                         ("POST", "/ip/weave:expose"), ("PUT", "/ip/weave:gateway/198.18.0.9/24"),
                         ("POST", "/ip/weave:mine/198.18.0.0/24")):
        code, body = node.api(method, path)
        assert code == 400 and "reserved" in body, (method, path, code, body)
    assert node.lookup("weave:expose") == [gw]  # reading is fine
    assert owned(node)["weave:expose"] == [gw]
    r = subprocess.run([sys.executable, "-m", "weaveipam", "release", "weave:expose",
                        "--socket", str(node.socket)], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 1 and "reserved" in r.stderr + r.stdout, r
    assert node.lookup("weave:expose") == [gw]


# ---- the daemon away ----------------------------------------------------------------------------

def test_daemon_down_try_again_and_no_leak(scratch: HostScratch) -> None:
    root = Path(tempfile.mkdtemp(prefix="wc3-"))
    c = Cluster(root)
    try:
        (n,) = c.add(1, range_="198.18.2.0/24", init="consensus=1", connect=False)
        net = BridgeNet(scratch, socket=n.socket)
        ns1, ns2 = scratch.new_netns(), scratch.new_netns()
        c1, c2 = cid(), cid()
        res1 = ok(net.add(ns1, c1))
        a1 = ips_of(res1)[0].split("/")[0]
        assert n.stop() == 0

        j = err(net.delete(ns1, c1, res1), 11)  # must not succeed: that would leak a1
        assert str(n.socket) in j["msg"]
        j = err(net.add(ns2, c2), 11)
        assert "try again" in j["msg"] and j.get("details")
        # the runtime cleans up the failed ADD; that DEL fails too while the daemon is away
        err(net.delete(ns2, c2), 11)

        n.start()
        assert owned(n)[ident(c1)] == [a1]  # still held: the failed DEL freed nothing
        ok(net.delete(ns1, c1, res1))       # the runtime's retry
        assert ident(c1) not in owned(n)
        ok(net.delete(ns2, c2))
        res2 = ok(net.add(ns2, c2))         # ADD after the restart
        assert ns2.addrs() == ips_of(res2)
        assert ident(c2) in owned(n)
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def test_version_without_daemon(shim: Path) -> None:
    r = run_plugin(shim, "VERSION", {"cniVersion": "0.4.0"}, socket="/nonexistent/x.sock")
    assert ok(r) == {"cniVersion": "0.4.0",
                     "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


# ---- bad input changes nothing ------------------------------------------------------------------

def test_bad_input_right_code_nothing_allocated(node: Node, scratch: HostScratch,
                                                shim: Path) -> None:
    before = owned(node)
    c = cid()
    base = {"cniVersion": "1.0.0", "name": "testnet", "ipam": {"type": "weave-ipam"}}
    kw: dict[str, Any] = {"container_id": c, "netns": "/run/netns/x", "ifname": "eth0",
                          "socket": node.socket}
    err(run_plugin(shim, "ADD", "this is not json", **kw), 6)
    err(run_plugin(shim, "ADD", b"", **kw), 6)
    err(run_plugin(shim, "ADD", base, **{**kw, "container_id": None}), 4)
    err(run_plugin(shim, "ADD", base, **{**kw, "netns": None}), 4)
    err(run_plugin(shim, None, base, **kw), 4)
    err(run_plugin(shim, "ADD", base, **{**kw, "container_id": "-bad id"}), 4)
    err(run_plugin(shim, "ADD", base, **{**kw, "args": "K8S_POD_NAME"}), 4)
    err(run_plugin(shim, "ADD", base, **{**kw, "args": "IP=198.18.0.77\nX-Evil: 1"}), 4)
    err(run_plugin(shim, "ADD", {**base, "cniVersion": "0.2.0"}, **kw), 1)
    err(run_plugin(shim, "ADD", {**base, "ipam": {"type": "weave-ipam",
                                                  "ranges": [[{"subnet": "10.0.0.0/8"}]]}},
                   **kw), 2)
    err(run_plugin(shim, "ADD", {**base, "name": "bad name"}, **kw), 7)
    # through bridge: a subnet outside the range
    ns = scratch.new_netns()
    net = BridgeNet(scratch, socket=node.socket,
                    ipam={"type": "weave-ipam", "subnet": "198.19.0.0/24"})
    j = err(net.add(ns, c), 7)
    assert "198.19.0.0/24" in j["msg"] and RANGE in j["msg"]
    assert ns.addrs() == []
    ok(net.delete(ns, c))  # DEL reads only the key: a bad ipam section never blocks it
    assert owned(node) == before


def test_subnet_gateway_routes_dns_and_static(node: Node, scratch: HostScratch,
                                              shim: Path) -> None:
    ns = scratch.new_netns()
    ipam = {"type": "weave-ipam", "subnet": "198.18.0.128/25", "gateway": "198.18.0.129",
            "routes": [{"dst": "198.18.0.0/24"}],
            "dns": {"nameservers": ["198.18.0.53"], "search": ["svc.local"]}}
    net = BridgeNet(scratch, socket=node.socket, ipam=ipam)
    c = cid()
    res = ok(net.add(ns, c))
    (addr,) = ips_of(res)
    assert addr.endswith("/25") and ipaddress.ip_interface(addr).ip in \
        ipaddress.ip_network("198.18.0.128/25")
    assert addr != "198.18.0.129/25"
    assert res["ips"][0]["gateway"] == "198.18.0.129"
    assert ns.addrs() == [addr]
    # the gateway was the subnet's next free address: it is now reserved, never a pod's
    assert owned(node).get("weave:gateway") == ["198.18.0.129"]
    # bridge puts its own dns in its result: see ours straight from the shim
    direct = ok(run_plugin(shim, "ADD", {"cniVersion": "1.0.0", "name": "testnet",
                                         "ipam": ipam}, container_id=c, netns=ns.path,
                           ifname="eth0", socket=node.socket))
    assert ips_of(direct) == [addr]
    assert direct["dns"] == {"nameservers": ["198.18.0.53"], "search": ["svc.local"]}
    assert direct["routes"] == [{"dst": "198.18.0.0/24"}]
    ok(net.delete(ns, c, res))

    # static addresses: CNI_ARGS IP=, args.cni.ips, runtimeConfig.ips
    ns2 = scratch.new_netns()
    net2 = BridgeNet(scratch, socket=node.socket)
    c2 = cid()
    res2 = ok(net2.add(ns2, c2, args="IgnoreUnknown=1;IP=198.18.0.200"))
    assert ips_of(res2) == ["198.18.0.200/24"] and ns2.addrs() == ["198.18.0.200/24"]
    # the same address for another container: refused (101), nothing changes
    c3 = cid()
    conf = {"cniVersion": "1.0.0", "name": "testnet", "ipam": {"type": "weave-ipam"},
            "runtimeConfig": {"ips": ["198.18.0.201/24", "198.18.0.200/24"]}}
    before = owned(node)
    j = err(run_plugin(shim, "ADD", conf, container_id=c3, netns="/x", ifname="eth0",
                       socket=node.socket), 101)
    assert "198.18.0.200" in j["msg"]
    assert owned(node) == before  # the .201 it claimed first was given back
    conf["runtimeConfig"] = {"ips": ["198.18.0.201/24"]}
    assert ips_of(ok(run_plugin(shim, "ADD", conf, container_id=c3, netns="/x",
                                ifname="eth0", socket=node.socket))) == ["198.18.0.201/24"]
    ok(run_plugin(shim, "DEL", conf, container_id=c3, netns="", ifname="eth0",
                  socket=node.socket))
    ok(net2.delete(ns2, c2, res2))


# ---- STATUS and GC (1.1.0) ----------------------------------------------------------------------

def test_status(cluster_root: Cluster, node: Node, shim: Path) -> None:
    conf = {"cniVersion": "1.1.0", "name": "testnet", "ipam": {"type": "weave-ipam"}}
    assert run_plugin(shim, "STATUS", conf, socket=node.socket).rc == 0
    (stuck,) = cluster_root.add(1, range_="198.18.3.0/24", init="consensus=3",
                                extra=["--op-timeout", "2"], connect=False)
    j = err(run_plugin(shim, "STATUS", conf, socket=stuck.socket), 50)
    assert "consensus" in j["msg"]
    (full,) = cluster_root.add(1, range_="198.18.4.0/30", init="consensus=1", connect=False)
    assert run_plugin(shim, "STATUS", conf, socket=full.socket).rc == 0
    full.allocate("fill-1")
    full.allocate("fill-2")
    j = err(run_plugin(shim, "STATUS", conf, socket=full.socket), 50)
    assert "no free address" in j["msg"]
    err(run_plugin(shim, "STATUS", conf, socket="/nonexistent/x.sock"), 50)
    err(run_plugin(shim, "STATUS", {**conf, "cniVersion": "1.0.0"}, socket=node.socket), 1)


def test_gc(node: Node, shim: Path) -> None:
    conf = {"cniVersion": "1.1.0", "name": "gcnet", "ipam": {"type": "weave-ipam"}}
    other = {**conf, "name": "gcother"}
    a, b, d = cid(), cid(), cid()
    for c, cf in ((a, conf), (b, conf), (d, conf), (a, other)):
        ok(run_plugin(shim, "ADD", cf, container_id=c, netns="/x", ifname="eth0",
                      socket=node.socket))
    ok(run_plugin(shim, "ADD", conf, container_id=a, netns="/x", ifname="net1",
                  socket=node.socket))
    err(run_plugin(shim, "GC", conf, socket=node.socket), 7)  # no list: refuse, free nothing
    assert ident(b, net="gcnet") in owned(node)
    keep = [{"containerID": a, "ifname": "eth0"}, {"containerID": d, "ifname": "eth0"}]
    r = run_plugin(shim, "GC", {**conf, "cni.dev/valid-attachments": keep}, socket=node.socket)
    assert r.rc == 0 and r.out == "", str(r)
    held = owned(node)
    assert ident(a, net="gcnet") in held and ident(d, net="gcnet") in held
    assert ident(b, net="gcnet") not in held and ident(a, "net1", "gcnet") not in held
    assert ident(a, net="gcother") in held  # another network's: untouched
    # older libcni's key
    ok(run_plugin(shim, "GC", {**conf, "cni.dev/attachments": keep[:1]}, socket=node.socket))
    assert ident(d, net="gcnet") not in owned(node)
    ok(run_plugin(shim, "GC", {**other, "cni.dev/valid-attachments": []},
                  socket=node.socket))
    ok(run_plugin(shim, "GC", {**conf, "cni.dev/valid-attachments": []}, socket=node.socket))
    assert not [k for k in owned(node) if k.startswith(("cni:gcnet:", "cni:gcother:"))]


def test_unicode_and_long_values_reach_the_daemon(node: Node, shim: Path) -> None:
    """Escaped headers arrive intact: a pod name in UTF-8, a long CNI_PATH."""
    c = cid()
    conf = {"cniVersion": "1.0.0", "name": "testnet", "ipam": {"type": "weave-ipam"}}
    r = run_plugin(shim, "ADD", conf, container_id=c, netns="/x", ifname="eth0",
                   args="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pöd 1%", cni_path="/p" * 1300,
                   socket=node.socket)
    ok(r)
    code, body = node.api("GET", "/ip", json_=True)
    notes = {o["containerid"]: o["notes"] for o in json.loads(body)["owned"]}
    assert notes[ident(c)] == ["ns/pöd 1%"]
    ok(run_plugin(shim, "DEL", conf, container_id=c, netns="", ifname="eth0",
                  socket=node.socket))


def test_oversized_config_is_refused_whole(node: Node, shim: Path) -> None:
    """Over the daemon's body limit: a config error (7), not a retry, nothing allocated."""
    before = owned(node)
    conf = {"cniVersion": "1.0.0", "name": "testnet", "ipam": {"type": "weave-ipam"},
            "padding": "x" * 100_000}
    j = err(run_plugin(shim, "ADD", conf, container_id=cid(), netns="/x", ifname="eth0",
                       socket=node.socket), 7)
    assert "413" in j["details"]
    assert owned(node) == before
