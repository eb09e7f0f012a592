"""kube-node allocations, sans-IO, and their rows in the store: one address per family,
gateway never handed out, no immediate reuse (also across a restart), all or nothing when
full, range changes kept while old addresses are held."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from weaveipam.core.addr import CIDR
from weaveipam.kube.nodealloc import (
    DelNodeAddress,
    NodeAllocations,
    NodeRangeFull,
    PutNodeAddress,
    SetNodeRanges,
    key_text,
)
from weaveipam.store import Store

V4, V6 = CIDR.parse("10.244.1.0/24"), CIDR.parse("fd00:10:244:1::/64")


def texts(got: list[tuple[int, CIDR]]) -> list[str]:
    return [f"{c.fmt_addr(a)}/{c.prefix}" for a, c in got]


def test_dual_stack_one_per_family_same_again_and_gateway_kept_out() -> None:
    n = NodeAllocations()
    got, recs = n.allocate("cni:net:c1:eth0", {32: [V4], 128: [V6]}, "default/web")
    # .1 / ::1 are the ranges' gateways: never a pod's
    assert texts(got) == ["10.244.1.2/24", "fd00:10:244:1::2/64"]
    assert recs == [PutNodeAddress("cni:net:c1:eth0", 32, got[0][0], "default/web"),
                    PutNodeAddress("cni:net:c1:eth0", 128, got[1][0], "default/web")]
    again, recs = n.allocate("cni:net:c1:eth0", {32: [V4], 128: [V6]}, "default/web")
    assert again == got and recs == []
    other, _ = n.allocate("cni:net:c2:eth0", {128: [V6]}, "")
    assert texts(other) == ["fd00:10:244:1::3/64"]


def test_no_immediate_reuse_and_all_or_nothing_when_full() -> None:
    n = NodeAllocations()
    small = CIDR.parse("10.9.0.0/29")  # .1 gateway, .2-.6 for pods
    a = [n.allocate(f"p{i}", {32: [small]}, "")[0][0][0] for i in range(3)]
    gone, recs = n.release("p0")
    assert [key_text(k) for k in gone] == ["10.9.0.2"] and recs == [
        DelNodeAddress("p0", 32, a[0])]
    nxt = n.allocate("p3", {32: [small]}, "")[0][0][0]
    assert nxt != a[0] and small.fmt_addr(nxt) == "10.9.0.5"
    n.allocate("p4", {32: [small]}, "")
    assert small.fmt_addr(n.allocate("p5", {32: [small]}, "")[0][0][0]) == "10.9.0.2"
    before = {i: n.held(i) for i in n.idents()}
    with pytest.raises(NodeRangeFull, match="10.9.0.0/29"):
        n.allocate("p6", {32: [small], 128: [V6]}, "")
    assert {i: n.held(i) for i in n.idents()} == before  # the IPv6 was not taken either
    assert n.has_free({32: [small]}) is not None and n.has_free({128: [V6]}) is None


def test_range_change_keeps_old_addresses_and_warns_until_they_are_gone() -> None:
    n = NodeAllocations()
    assert n.note_ranges("spec.podCIDRs", (V4,)) == [
        SetNodeRanges("spec.podCIDRs", "10.244.1.0/24", "")]
    n.allocate("old", {32: [V4]}, "")
    new = CIDR.parse("10.244.9.0/24")
    recs = n.note_ranges("spec.podCIDRs", (new,))
    assert recs == [SetNodeRanges("spec.podCIDRs", "10.244.9.0/24", "10.244.1.0/24")]
    (w,) = n.warnings("node-a")
    assert "from 10.244.1.0/24 to 10.244.9.0/24" in w and "1 address(es) still held" in w
    got, _ = n.allocate("new", {32: [new]}, "")
    assert texts(got) == ["10.244.9.2/24"]
    again, recs = n.allocate("old", {32: [new]}, "")  # a repeated ADD of an old pod
    assert texts(again) == ["10.244.1.2/24"] and recs == []
    assert [key_text(k) for k in n.held("old")] == ["10.244.1.2"]
    _, recs = n.release("old")
    assert recs[-1] == SetNodeRanges("spec.podCIDRs", "10.244.9.0/24", "")
    assert n.warnings("node-a") == []


def test_store_keeps_them_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ipam.db"
    n = NodeAllocations()
    recs = list(n.note_ranges("spec.podCIDRs", (V4, V6)))
    for i in range(3):
        recs += n.allocate(f"p{i}", {32: [V4], 128: [V6]}, f"ns/p{i}")[1]
    recs += n.release("p2")[1]  # its addresses are the last handed out
    with Store(path) as s:
        s.commit_sync(recs)
        assert s.load().allocations == {}  # the ring's allocations are another matter
    with Store(path) as s:
        rows, sources, cursors = s.load_node()
    m = NodeAllocations()
    m.restore(rows, sources, cursors)
    assert {i: m.held(i) for i in m.idents()} == {i: n.held(i) for i in n.idents()}
    assert m.sources == n.sources
    assert m.allocs["p1"] == {(32, V4.start + 3): "ns/p1", (128, V6.start + 3): "ns/p1"}
    got, _ = m.allocate("p9", {32: [V4]}, "")
    assert texts(got) == ["10.244.1.5/24"]  # not .4, freed just before the restart


def test_a_store_from_before_gets_the_tables(tmp_path: Path) -> None:
    path = tmp_path / "ipam.db"
    with Store(path):
        pass
    with sqlite3.connect(path) as db:  # as an older weaveipam made it
        db.execute("DROP TABLE node_allocations")
        db.execute("DROP TABLE node_ranges")
        db.execute("DROP TABLE node_cursor")
    with Store(path) as s:
        s.commit_sync([PutNodeAddress("p", 32, V4.start + 2, "")])
        assert s.load_node() == ([("p", 32, V4.start + 2, "")], {}, {32: V4.start + 2})
        s.wipe()
        assert s.load_node() == ([], {}, {})
