"""kube-node ranges, the decisions: options, a Node's CIDRs, families per namespace."""

from __future__ import annotations

import json

import pytest
from kubefake import recordings

from weaveipam.core.addr import CIDR
from weaveipam.kube.noderanges import NodeRangeSpec, changed, for_pod, node_ranges, parse_spec
from weaveipam.kube.reconcile import NodeInfo


def recorded_nodes() -> dict[str, NodeInfo]:
    ex = {x["name"]: x for x in json.loads((recordings() / "nodes-crud.json").read_text())
          ["exchanges"] if "request" in x}
    items = ex["list-nodes"]["response"]["body_json"]["items"]
    out = {}
    for obj in items:
        n = NodeInfo.from_json(obj)
        assert n is not None
        out[n.name] = n
    return out


def test_options() -> None:
    assert parse_spec({"type": "weave-ipam"}) is None
    assert parse_spec({"ranges": "podCIDRs"}) == NodeRangeSpec(None)
    assert parse_spec({"annotation": "kube-node.nordix.org/net1",
                       "ipv4-namespaces": ["default"]}) == \
        NodeRangeSpec("kube-node.nordix.org/net1", frozenset({"default"}))
    for bad, words in (({"ranges": "host-local"}, "podCIDRs"),
                       ({"ranges": "podCIDRs", "annotation": "a/b"}, "not both"),
                       ({"annotation": "no spaces/x y"}, "annotation key"),
                       ({"ipv4-namespaces": ["default"]}, "needs"),
                       ({"ranges": "podCIDRs", "ipv4-namespaces": "default"}, "list")):
        with pytest.raises(ValueError, match=words):
            parse_spec(bad)


def test_recorded_dual_stack_node_gives_one_range_per_family() -> None:
    a = recorded_nodes()["node-a"]
    spec = NodeRangeSpec(None)
    ranges = node_ranges(a, spec)
    assert [str(c) for c in ranges] == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    fam = for_pod(ranges, "default", spec)
    assert {b: [str(c) for c in cs] for b, cs in fam.items()} == {
        32: ["10.244.1.0/24"], 128: ["fd00:10:244:1::/64"]}
    only6 = for_pod(ranges, "web", NodeRangeSpec(None, frozenset({"default"})))
    assert list(only6) == [128]


def test_annotation_ranges_and_errors() -> None:
    a = recorded_nodes()["node-a"]
    key = "weave-ipam.example/peer-name"  # a recorded annotation that is not CIDRs
    with pytest.raises(ValueError, match="not a CIDR"):
        node_ranges(a, NodeRangeSpec(key))
    with pytest.raises(ValueError, match="has no annotation kube-node.nordix.org/net1"):
        node_ranges(a, NodeRangeSpec("kube-node.nordix.org/net1"))
    n = NodeInfo("n1", "u", annotations=(("kube-node.nordix.org/net1",
                                          "192.168.5.0/24, fd00:5::/96,192.168.6.0/24"),))
    got = for_pod(node_ranges(n, NodeRangeSpec("kube-node.nordix.org/net1")), None,
                  NodeRangeSpec("kube-node.nordix.org/net1"))
    assert [str(c) for c in got[32]] == ["192.168.5.0/24", "192.168.6.0/24"]
    assert [str(c) for c in got[128]] == ["fd00:5::/96"]


def test_changed_ranges_warn() -> None:
    old = [CIDR.parse("10.244.1.0/24")]
    assert changed(old, old, "n1", NodeRangeSpec(None).where()) is None
    text = changed(old, [CIDR.parse("10.244.9.0/24")], "n1", NodeRangeSpec(None).where())
    assert text is not None and "existing pods keep" in text and "10.244.9.0/24" in text


def test_cni_config_with_node_ranges() -> None:
    """The CNI config's kube-node options: parsed with the network, refused with what to do
    when combined with options of the ring."""
    from weaveipam.cni.config import CniError, Env, parse_config

    u = CIDR.parse("10.32.0.0/12")
    env = Env("ADD", "c1", "/run/netns/x", "eth0", {"K8S_POD_NAMESPACE": "default"})

    def conf(ipam: dict[str, object], **top: object) -> dict[str, object]:
        return {"cniVersion": "1.0.0", "name": "kn", "type": "ptp",
                "ipam": {"type": "weave-ipam", **ipam}, **top}

    c = parse_config(conf({"ranges": "podCIDRs", "routes": [{"dst": "0.0.0.0/0"}]}),
                     "1.0.0", env, u, u)
    assert c.node == NodeRangeSpec(None) and c.wants_gateway and c.routes
    for obj, code, words in (
            (conf({"ranges": "podCIDRs", "gateway": "10.32.0.1"}), 7, "cannot be combined"),
            (conf({"annotation": "a/b"}, runtimeConfig={"ips": ["10.244.1.9"]}), 7,
             "static addresses"),
            (conf({"ranges": "host-local"}), 2, "podCIDRs"),
            (conf({"annotation": "a/b", "ipv4-namespaces": "default"}), 7, "list")):
        with pytest.raises(CniError, match=words) as e:
            parse_config(obj, "1.0.0", env, u, u)
        assert e.value.code == code
