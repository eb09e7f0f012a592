"""kube-node ranges (issue 10 item 5), the sans-IO part: which CIDRs a pod gets from.

A CNI config's `ipam` may say `"ranges": "podCIDRs"` (this node's `spec.podCIDRs`, one
IPv4 and one IPv6 address per pod on a dual-stack node) or `"annotation": KEY`
(comma-separated CIDRs in that annotation of this node, for Multus secondary networks),
and `"ipv4-namespaces": [...]` (IPv4 only for pods in those namespaces).  These ranges
are the node's alone: no ring, no consensus.  Not wired into the CNI service yet: this
module parses and decides, with the errors a user can act on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.addr import CIDR, AddrError

if TYPE_CHECKING:  # the reconciler is imported only in Kubernetes mode (start-up cost)
    from .reconcile import NodeInfo

KEYS = ("ranges", "annotation", "ipv4-namespaces")
_NAME = r"[a-z0-9A-Z]([-a-z0-9A-Z_.]{0,61}[a-z0-9A-Z])?"
_ANNOTATION = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class NodeRangeSpec:
    annotation: str | None  # None: spec.podCIDRs
    ipv4_namespaces: frozenset[str] | None = None  # None: every pod gets IPv4

    def where(self) -> str:
        return f"annotation {self.annotation}" if self.annotation else "spec.podCIDRs"

    def option(self) -> str:
        """The CNI config option that asked for these ranges."""
        return f'annotation "{self.annotation}"' if self.annotation else 'ranges "podCIDRs"'

    @staticmethod
    def of(where: str) -> NodeRangeSpec:
        """The spec (without ipv4-namespaces) whose where() this is."""
        if where.startswith("annotation "):
            return NodeRangeSpec(where.removeprefix("annotation "))
        return NodeRangeSpec(None)


def parse_spec(ipam: Mapping[str, Any]) -> NodeRangeSpec | None:
    """The kube-node options of an `ipam` object; None if it has none.  ValueError says
    what is wrong and what to write instead."""
    if not any(k in ipam for k in KEYS):
        return None
    ranges, annotation = ipam.get("ranges"), ipam.get("annotation")
    if ranges is not None and annotation is not None:
        raise ValueError('ipam: give either "ranges": "podCIDRs" or "annotation": KEY, '
                         "not both")
    if ranges is not None and ranges != "podCIDRs":
        raise ValueError(f'ipam.ranges: {str(ranges)[:80]!r} is not supported; weave-ipam '
                         'takes "podCIDRs" (this node\'s spec.podCIDRs) or, with '
                         '"annotation", CIDRs from a node annotation')
    if annotation is not None and (not isinstance(annotation, str)
                                   or not _ANNOTATION.match(annotation)):
        raise ValueError(f"ipam.annotation: {str(annotation)[:80]!r} is not an annotation "
                         "key like kube-node.nordix.org/net1")
    if ranges is None and annotation is None:
        raise ValueError('ipam.ipv4-namespaces needs "ranges": "podCIDRs" or "annotation"')
    v4ns = ipam.get("ipv4-namespaces")
    if v4ns is not None:
        if not isinstance(v4ns, list) or not all(
                isinstance(n, str) and _NAMESPACE.match(n) for n in v4ns):
            raise ValueError("ipam.ipv4-namespaces is not a list of namespace names like "
                             '["default", "kube-system"]')
        return NodeRangeSpec(annotation, frozenset(v4ns))
    return NodeRangeSpec(annotation)


def node_ranges(node: NodeInfo, spec: NodeRangeSpec) -> list[CIDR]:
    """The node's CIDRs for this spec, in the order given.  ValueError if the node has
    none, or a value is not a CIDR (the message names the node and where it looked)."""
    if spec.annotation is None:
        texts = list(node.pod_cidrs)
    else:
        raw = dict(node.annotations).get(spec.annotation)
        texts = [t.strip() for t in (raw or "").split(",") if t.strip()]
    if not texts:
        how = (f"annotate the Node (kubectl annotate node {node.name} "
               f"{spec.annotation}=CIDR[,CIDR])" if spec.annotation else
               "have the controller-manager assign them (--allocate-node-cidrs) or set them "
               "when the Node is registered")
        raise ValueError(f"Node {node.name} has no {spec.where()}: {how}, or drop "
                         f"ipam.{'annotation' if spec.annotation else 'ranges'} to "
                         "allocate from the cluster range")
    out = []
    for t in texts:
        try:
            out.append(CIDR.parse(t))
        except AddrError as e:
            raise ValueError(f"Node {node.name} {spec.where()}: {t[:60]!r} is not a CIDR "
                             f"({e})") from None
    return out


def for_pod(ranges: list[CIDR], namespace: str | None, spec: NodeRangeSpec
            ) -> dict[int, list[CIDR]]:
    """Per address family (32, 128), the CIDRs a pod in `namespace` gets one address
    from, in order.  IPv4 only for the `ipv4-namespaces` when that list is given."""
    out: dict[int, list[CIDR]] = {}
    for c in ranges:
        if c.bits == 32 and spec.ipv4_namespaces is not None \
                and namespace not in spec.ipv4_namespaces:
            continue
        out.setdefault(c.bits, []).append(c)
    return out


def changed(old: list[CIDR], new: list[CIDR], node: str, where: str) -> str | None:
    """The status warning when the node's ranges changed (`where`: NodeRangeSpec.where());
    old allocations stay."""
    if old == new:
        return None
    return (f"Node {node} {where} changed from {', '.join(map(str, old)) or 'none'} "
            f"to {', '.join(map(str, new)) or 'none'}: existing pods keep their addresses, "
            "new ones come from the new ranges")
