"""The CNI service's kube-node networks: addresses from this node's own ranges.

`"ranges": "podCIDRs"` or `"annotation": KEY` in a network's `ipam` (parsed by
weaveipam/kube/noderanges.py) takes this node's ranges from its Node object, which Kubernetes
mode keeps current through its Node watch.  The allocation itself is sans-IO
(weaveipam/kube/nodealloc.py); this shell reads the Node, makes each change durable in the
daemon's store before it answers (as every ring allocation), and reports range changes.
Until the Node has been read (the API server is down at a restart), the ranges last used
are used: API server trouble never stops allocation.
"""

from __future__ import annotations

import logging
from typing import Any

from ..core.addr import CIDR, fmt
from ..kube.nodealloc import (
    Key,
    NodeAllocations,
    NodeRangeFull,
    NodeRecord,
    gateway_of,
    key_text,
    ranges_text,
)
from ..kube.noderanges import NodeRangeSpec, changed, for_pod, node_ranges
from ..store import StoreError
from .config import E_NO_NODE_RANGES, E_TRY_AGAIN, CniError, NetConf

log = logging.getLogger("weaveipam.cni")


class NodeLocal:
    def __init__(self, d: Any) -> None:
        self.d = d
        self.alloc = NodeAllocations()
        try:
            self.alloc.restore(*d.store.load_node())
        except StoreError as e:
            from ..daemon import StartupError

            raise StartupError(f"cannot read the kube-node allocations: {e}") from e

    @staticmethod
    def of(d: Any) -> NodeLocal | None:
        """The daemon's one NodeLocal (made with its CNI service); None without a store
        (the in-process tests' fake daemon)."""
        if getattr(d, "store", None) is None:
            return None
        if getattr(d, "node_local", None) is None:
            d.node_local = NodeLocal(d)
        return d.node_local  # type: ignore[no-any-return]

    # ---- the node's ranges ----------------------------------------------------------------

    def _node(self) -> tuple[bool, Any]:
        kube = self.d.kube
        if kube is None:
            return False, None
        known, node = kube.own_node()
        return known, node

    def ranges(self, spec: NodeRangeSpec, what: str) -> tuple[CIDR, ...]:
        """This node's ranges for `spec`, checked; CniError says what is missing."""
        kube = self.d.kube
        if kube is None:
            raise CniError(E_NO_NODE_RANGES, f"{what}: ipam {spec.option()} takes this node's "
                           f"{spec.where()} from its Node object, but this weaveipam daemon "
                           "is not in Kubernetes mode",
                           "run the daemon in a Pod (KUBERNETES_SERVICE_HOST set) or with "
                           "--kubeconfig and --node-name, or drop ipam.ranges/annotation "
                           "to allocate from the cluster range")
        known, node = self._node()
        name = kube.settings.node_name
        if node is None:
            last = self.alloc.sources.get(spec.where())
            if not known and last is not None:
                return last[0]  # the API server has not answered yet: the last ones used
            if not known:
                raise CniError(E_TRY_AGAIN, f"{what}: Node {name} has not been read from the "
                               "Kubernetes API server yet", "retry shortly; `weaveipam status` "
                               "says what is wrong with the API server")
            raise CniError(E_NO_NODE_RANGES, f"{what}: there is no Node {name} in the "
                           "Kubernetes API", "check --node-name / NODE_NAME (the downward "
                           "API's spec.nodeName)")
        try:
            out = tuple(node_ranges(node, spec))
        except ValueError as e:
            raise CniError(E_NO_NODE_RANGES, f"{what}: {e}") from None
        universe = self.d.allocator.universe
        for c in out:
            if c.bits == universe.bits and c.range.overlaps(universe.range):
                raise CniError(E_NO_NODE_RANGES, f"{what}: Node {name} {spec.where()} {c} "
                               f"overlaps the cluster range {universe}, whose addresses "
                               "other nodes hand out", "give the Node ranges outside "
                               "--ipalloc-range, or shrink --ipalloc-range")
        return out

    # ---- commands -------------------------------------------------------------------------

    async def add(self, ident: str, conf: NetConf, namespace: str | None, note: str,
                  what: str) -> dict[str, Any]:
        from .config import result_of

        spec = conf.node
        assert spec is not None
        ranges = self.ranges(spec, what)
        fams = for_pod(list(ranges), namespace, spec)
        if not fams:
            raise CniError(E_NO_NODE_RANGES, f"{what}: Node {self.node_name()} "
                           f"{spec.where()} has only IPv4 ({ranges_text(ranges)}), and "
                           f"namespace {namespace or '(none)'} is not in ipam.ipv4-namespaces",
                           "add the namespace to ipam.ipv4-namespaces, or give the Node an "
                           "IPv6 range")
        recs = self.alloc.note_ranges(spec.where(), ranges)
        try:
            got, more = self.alloc.allocate(ident, fams, note)
        except NodeRangeFull as e:
            if recs:
                await self.commit(recs, what)
            raise CniError(E_TRY_AGAIN, f"{what}: {e}", "free addresses by deleting pods "
                           "on this node, or give the Node larger ranges") from None
        if recs and self.alloc.sources[spec.where()][1]:
            log.warning("%s", self.alloc.warnings(self.node_name())[0])
        await self.commit(recs + more, what)
        log.info("CNI %s: %s from %s%s", what, ", ".join(fmt(a, c.bits) for a, c in got),
                 spec.where(), f" ({note})" if note else "")
        return result_of(conf, [(a, c.prefix, c.bits,
                                 gateway_of(c) if conf.wants_gateway else None)
                                for a, c in got])

    def held(self, ident: str) -> list[Key]:
        return self.alloc.held(ident)

    async def release(self, ident: str, what: str) -> None:
        gone, recs = self.alloc.release(ident)
        await self.commit(recs, what)
        if gone:
            log.info("CNI %s: freed %s", what, ", ".join(map(key_text, gone)))

    def idents(self) -> list[str]:
        return self.alloc.idents()

    def in_ranges(self, k: Key) -> bool:
        """Is the address in any range a kube-node network here allocated from?"""
        return any(c.bits == k[0] and k[1] in c for cur, prev in self.alloc.sources.values()
                   for c in (*cur, *prev))

    def free_for(self, conf: NetConf, what: str) -> str | None:
        """None if an ADD would be served, else why not (STATUS)."""
        assert conf.node is not None
        ranges = self.ranges(conf.node, what)
        fams = for_pod(list(ranges), None, NodeRangeSpec(conf.node.annotation))
        return self.alloc.has_free(fams)

    async def commit(self, recs: list[NodeRecord], what: str) -> None:
        """Durable before the answer; a failed store stops the daemon's answers, as for
        the ring's allocations (memory may be ahead of the disk)."""
        try:
            await self.d.store.commit(recs)  # no records: a barrier behind earlier ones
        except (StoreError, OSError) as e:
            self.d.fail_store(e)
            raise CniError(E_TRY_AGAIN, f"{what}: {self.d.store_error}") from None

    # ---- status ---------------------------------------------------------------------------

    def node_name(self) -> str:
        kube = self.d.kube
        return str(kube.settings.node_name) if kube is not None else "(no Kubernetes mode)"

    def warnings(self) -> list[str]:
        """Old ranges still in use, and Node ranges that changed since the last ADD."""
        name = self.node_name()
        out = self.alloc.warnings(name)
        _, node = self._node()
        if node is not None:
            for src, (cur, _) in sorted(self.alloc.sources.items()):
                try:
                    now = tuple(node_ranges(node, NodeRangeSpec.of(src)))
                except ValueError as e:
                    out.append(f"{e} (allocations from {src} fail until it is set)")
                    continue
                text = changed(list(cur), list(now), name, src)
                if text:
                    out.append(text)
        return out

    def status(self) -> dict[str, Any]:
        return {"ranges": {src: {"ranges": ranges_text(cur), "previous": ranges_text(prev),
                                 "used": self.alloc.used_in((*cur, *prev))}
                           for src, (cur, prev) in sorted(self.alloc.sources.items())},
                "warnings": self.warnings()}

    def lines(self) -> list[str]:
        rows = [f"kube-node {s}" for s in self.alloc.summary()]
        rows += [f"WARNING: {w}" for w in self.warnings()]
        return rows
