"""kube-node networks end to end: a real daemon in Kubernetes mode against the fake API
server, driven through the real `weave-ipam` shim (and the reference `bridge` plugin) as a
runtime drives it.  Ranges come from the daemon's own Node: `spec.podCIDRs` (dual-stack),
an annotation, IPv4 only for `ipv4-namespaces`; ADD, CHECK, DEL, GC, a restart (with the
API server down), a range change with its warning, and the errors when ranges are missing.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from capability import missing
from daemons import Cluster, free_ports, temp_cluster, wait_for
from kubefake import FakeKube, running
from test_cni_support import (
    BRIDGE,
    REPO,
    CniRun,
    host_scratch,
    ips_of,
    netns_unavailable,
    reference_plugins,
    run_plugin,
    shim_binary,
)
from test_kube_daemon import KubeNode

PODS = ["198.18.64.0/24", "fd00:198:18:64::/64"]
NET1 = "kube-node.nordix.org/net1"


@pytest.fixture
def kube() -> Iterator[tuple[FakeKube, Cluster]]:
    with running() as fake, temp_cluster("wkn-") as c:
        yield fake, c


def node(fake: FakeKube, c: Cluster, pod_cidrs: list[str] | None,
         annotations: dict[str, str] | None = None) -> KubeNode:
    """One daemon whose Node has these ranges; started, its Node read."""
    (port,) = free_ports(1)
    n = KubeNode(len(c.nodes) + 1, c.root, ip=f"127.0.0.{40 + len(c.nodes)}", port=port,
                 kubeconfig=fake.kubeconfig(c.root / "kubeconfig"))
    fake.add_node(n.node_name, n.ip, pod_cidrs, annotations)
    c.nodes.append(n)  # killed at cleanup
    n.start(wait=False)
    n.wait_up(timeout=60)  # deadlines that catch a hang: the machine is shared
    wait_for(lambda: n.kube().get("nodes") == 1, timeout=60, what="its Node read")
    return n


def conf(name: str, version: str = "1.0.0", **ipam: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": name, "type": "bridge", "isGateway": True,
            "ipam": {"type": "weave-ipam", **ipam}}


def cni(n: Any, cmd: str, c: dict[str, Any], cid: str, *, ns: str = "default",
        prev: Any = None) -> CniRun:
    if prev is not None:
        c = {**c, "prevResult": prev}
    return run_plugin(shim_binary(), cmd, c, container_id=cid, netns="/run/netns/wkn-none",
                      ifname="eth0", args=f"K8S_POD_NAMESPACE={ns};K8S_POD_NAME=p-{cid}",
                      socket=n.socket)


def ok(r: CniRun) -> Any:
    assert r.rc == 0, str(r)
    return r.json


def refused(r: CniRun, code: int, words: str) -> str:
    assert r.rc != 0 and r.code == code and words in r.json["msg"], str(r)
    return str(r.json["msg"])


def used(n: KubeNode) -> dict[str, int]:
    return {src: v["used"] for src, v in n.kube()["node_ranges"]["ranges"].items()}


def test_pod_cidrs_annotation_namespaces_check_del_gc_and_restart(
        kube: tuple[FakeKube, Cluster]) -> None:
    fake, c = kube
    n = node(fake, c, PODS, {NET1: "198.18.65.0/24, fd00:198:18:65::/96"})
    pods = conf("kn", ranges="podCIDRs")
    a = ok(cni(n, "ADD", pods, "c1"))
    assert ips_of(a) == ["198.18.64.2/24", "fd00:198:18:64::2/64"]  # dual-stack
    assert [i["gateway"] for i in a["ips"]] == ["198.18.64.1", "fd00:198:18:64::1"]
    assert ok(cni(n, "ADD", pods, "c1")) == a  # a repeated ADD: the same answer
    b = ok(cni(n, "ADD", pods, "c2"))
    assert ips_of(b) == ["198.18.64.3/24", "fd00:198:18:64::3/64"]
    # the annotation's ranges, for a Multus secondary network
    m = ok(cni(n, "ADD", conf("net1", annotation=NET1), "c1"))
    assert ips_of(m) == ["198.18.65.2/24", "fd00:198:18:65::2/96"]
    # IPv4 only for the namespaces listed
    v6only = conf("kn6", ranges="podCIDRs", **{"ipv4-namespaces": ["kube-system"]})
    assert ips_of(ok(cni(n, "ADD", v6only, "c3"))) == ["fd00:198:18:64::4/64"]
    assert ips_of(ok(cni(n, "ADD", v6only, "c4", ns="kube-system"))) == [
        "198.18.64.4/24", "fd00:198:18:64::5/64"]
    assert used(n) == {"spec.podCIDRs": 7, f"annotation {NET1}": 2}
    ok(run_plugin(shim_binary(), "STATUS", conf("kn", "1.1.0", ranges="podCIDRs"),
                  socket=n.socket))

    # CHECK against what the runtime kept; a prevResult that differs is a mismatch
    ok(cni(n, "CHECK", pods, "c1", prev=a))
    wrong = json.loads(json.dumps(a))
    wrong["ips"][1]["address"] = "fd00:198:18:64::9/64"
    refused(cni(n, "CHECK", pods, "c1", prev=wrong), 100, "fd00:198:18:64::2")
    # DEL frees, and is idempotent; CHECK then knows nothing
    ok(cni(n, "DEL", pods, "c1"))
    ok(cni(n, "DEL", pods, "c1"))
    refused(cni(n, "CHECK", pods, "c1", prev=a), 3, "no address is held")
    # GC frees this network's attachments the runtime no longer has, no other network's
    gc = {**conf("kn6", "1.1.0", ranges="podCIDRs"),
          "cni.dev/valid-attachments": [{"containerID": "c4", "ifname": "eth0"}]}
    ok(run_plugin(shim_binary(), "GC", gc, socket=n.socket))
    refused(cni(n, "CHECK", v6only, "c3", prev={"ips": []}), 3, "no address is held")
    assert used(n) == {"spec.podCIDRs": 4, f"annotation {NET1}": 2}

    # a restart keeps everything (durable), and does not hand out what was just freed;
    # with the API server down it allocates from the ranges it last used
    n.stop()
    fake.down()
    try:
        n.start(wait=False)
        n.wait_up(timeout=60)
        ok(cni(n, "CHECK", pods, "c2", prev=b))
        ok(cni(n, "CHECK", conf("net1", annotation=NET1), "c1", prev=m))
        d = ok(cni(n, "ADD", pods, "c5"))
        assert ips_of(d) == ["198.18.64.5/24", "fd00:198:18:64::6/64"]
    finally:
        fake.up()
    # the Node list is retried with back-off (up to 30 s) while the API server is down
    wait_for(lambda: n.kube().get("nodes") == 1, timeout=90, what="the Node read again")
    assert used(n) == {"spec.podCIDRs": 6, f"annotation {NET1}": 2}


def test_missing_ranges_are_a_clear_error_and_a_change_warns(
        kube: tuple[FakeKube, Cluster]) -> None:
    fake, c = kube
    n = node(fake, c, None, {NET1: "198.18.66.0/24", "example.com/ring": "10.33.0.0/24"})
    pods = conf("kn", ranges="podCIDRs")
    msg = refused(cni(n, "ADD", pods, "c1"), 103, "has no spec.podCIDRs")
    assert n.node_name in msg and "--allocate-node-cidrs" in msg
    refused(run_plugin(shim_binary(), "STATUS", conf("kn", "1.1.0", ranges="podCIDRs"),
                       socket=n.socket), 50, "has no spec.podCIDRs")
    # a Node range inside the ring's range would clash with other nodes' pods
    refused(cni(n, "ADD", conf("r", annotation="example.com/ring"), "c1"), 103,
            "overlaps the cluster range 10.32.0.0/12")
    assert n.kube()["node_ranges"]["ranges"] == {}  # no state change
    bad = conf("kn", ranges="podCIDRs", subnet="10.32.0.0/16")
    refused(cni(n, "ADD", bad, "c1"), 7, "cannot be combined")
    # the real server lets podCIDRs go from none to set (only): new ADDs use them
    code, _ = fake.patch_node(n.node_name, {"spec": {"podCIDRs": ["198.18.67.0/24"]}})
    assert code == 200
    wait_for(lambda: cni(n, "ADD", pods, "c1").rc == 0, timeout=60, what="podCIDRs seen")

    net1 = conf("net1", annotation=NET1)
    first = ok(cni(n, "ADD", net1, "c1"))
    assert ips_of(first) == ["198.18.66.2/24"]
    # the annotation changes: status warns at once, naming old and new ranges
    assert fake.patch_node(n.node_name, {"metadata": {"annotations": {
        NET1: "198.18.68.0/24"}}})[0] == 200
    wait_for(lambda: any("198.18.66.0/24 to 198.18.68.0/24" in w
                         for w in n.kube()["node_ranges"]["warnings"]),
             timeout=60, what="the change in the status")
    # existing pods keep theirs, new ones come from the new range
    assert ips_of(ok(cni(n, "ADD", net1, "c2"))) == ["198.18.68.2/24"]
    ok(cni(n, "CHECK", net1, "c1", prev=first))
    text = n.status("/status")[1]
    assert "WARNING: Node node-1 annotation kube-node.nordix.org/net1 changed from " \
        "198.18.66.0/24 to 198.18.68.0/24" in text and "1 address(es) still held" in text, text
    cli = subprocess.run([sys.executable, "-m", "weaveipam", "status", "--socket",
                          str(n.socket)], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert cli.returncode == 0 and "198.18.66.0/24 to 198.18.68.0/24" in cli.stdout, cli
    ok(cni(n, "DEL", net1, "c1"))  # the last pod of the old range: no more warning
    assert n.kube()["node_ranges"]["warnings"] == []
    # an annotation removed: a clear error, and nothing changes
    fake.patch_node(n.node_name, {"metadata": {"annotations": {NET1: None}}})
    wait_for(lambda: cni(n, "ADD", net1, "c3").code == 103, timeout=60,
             what="the annotation gone")
    refused(cni(n, "ADD", net1, "c3"), 103, f"has no annotation {NET1}")


def test_without_kubernetes_mode_the_config_is_refused(kube: tuple[FakeKube, Cluster]) -> None:
    _, c = kube
    (n,) = c.add(1, range_="198.18.80.0/24", init="consensus=1", connect=False)
    r = cni(n, "ADD", conf("kn", ranges="podCIDRs"), "c1")
    refused(r, 103, "not in Kubernetes mode")
    assert "--kubeconfig" in r.json["details"], str(r)


def test_dual_stack_pod_through_the_bridge_plugin(kube: tuple[FakeKube, Cluster]) -> None:
    """The reference `bridge`, run inside a node namespace, configures both addresses of a
    pod namespace from the Node's podCIDRs, and its gateways on the bridge."""
    why = netns_unavailable()
    if why:
        missing(why)
    reference_plugins()
    fake, c = kube
    n = node(fake, c, PODS)
    with host_scratch() as h:
        host, pod = h.new_netns(), h.new_netns()
        br = f"wkn{secrets.token_hex(4)}"
        cfg = {**conf("kn", ranges="podCIDRs"), "bridge": br, "ipMasq": False}
        cid = secrets.token_hex(8)
        env = {"cni_path": f"{shim_binary().parent}:{BRIDGE.parent}", "socket": n.socket,
               "in_netns": host.name, "container_id": cid, "ifname": "eth0"}
        r = ok(run_plugin(BRIDGE, "ADD", cfg, netns=pod.path, **env))
        want = ["198.18.64.2/24", "fd00:198:18:64::2/64"]
        assert ips_of(r) == want
        assert sorted(pod.addrs()) == sorted(want)
        assert set(host.addrs(br)) >= {"198.18.64.1/24", "fd00:198:18:64::1/64"}
        ok(run_plugin(BRIDGE, "DEL", cfg, netns=pod.path, **env))
        assert used(n) == {"spec.podCIDRs": 0}
