"""The `weaveipam` client commands against a real daemon over its unix socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from daemons import REPO, Cluster, Node, cluster, wait_for  # noqa: F401

__all__ = ["cluster"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "weaveipam", *args], capture_output=True,
                          text=True, timeout=60, env=e)


def cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return run(*args, env={"WEAVEIPAM_SOCKET": str(node.socket)})


@pytest.fixture
def node(cluster: Cluster) -> Node:
    (n,) = cluster.add(1, init="consensus=1")
    return n


def test_alloc_claim_ls_release_status(node: Node) -> None:
    r = cli(node, "alloc", "pod-a")
    assert r.returncode == 0, r.stderr
    addr = r.stdout.strip()
    assert addr.startswith("10.32.") and addr.endswith("/12")
    r = cli(node, "alloc", "pod-b", "10.33.1.0/24")
    assert r.returncode == 0 and r.stdout.startswith("10.33.1."), r.stderr
    r = run("claim", "pod-c", "10.40.0.9", "--socket", str(node.socket))
    assert r.returncode == 0, r.stderr
    r = cli(node, "ls")
    assert r.returncode == 0
    lines = dict(line.split("\t")[:2] for line in r.stdout.splitlines())
    assert lines["pod-a"] == addr and lines["pod-c"] == "10.40.0.9/12"
    r = cli(node, "release", "pod-c", "10.40.0.9")
    assert r.returncode == 0 and "10.40.0.9" in r.stdout, r.stderr
    r = cli(node, "release", "pod-a")
    assert r.returncode == 0
    r = cli(node, "status")
    assert r.returncode == 0 and "Status: ready" in r.stdout and f"{node.name}(node0)" in r.stdout
    r = cli(node, "status", "--json")
    assert json.loads(r.stdout)["name"] == node.name
    r = cli(node, "prime")
    assert r.returncode == 0 and r.stdout.strip() == "ready"
    r = run("ls", "--http", f"127.0.0.1:{node.http_port}")
    assert r.returncode == 0 and "pod-b" in r.stdout


def test_errors_exit_nonzero_and_change_nothing(node: Node) -> None:
    before = node.api("GET", "/ip")[1]
    for args, code in [(("alloc", "x", "10.33.1.0"), 2), (("alloc", "x", "nonsense/24"), 2),
                       (("alloc", "a/b"), 2), (("claim", "x", "not-an-ip"), 2),
                       (("release", "x", "999.1.1.1"), 2),
                       (("alloc", "x", "192.168.0.0/24"), 1),
                       (("claim", "x", "192.168.0.1"), 1),
                       (("release", "never"), 1), (("rmpeer", "ghost"), 1),
                       (("rmpeer", node.name), 1)]:
        r = cli(node, *args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert r.stderr.startswith("weaveipam: "), (args, r.stderr)
    assert node.api("GET", "/ip")[1] == before
    r = run("bogus-command")
    assert r.returncode == 2


def test_no_daemon(tmp_path: os.PathLike[str]) -> None:
    r = run("status", "--socket", f"{tmp_path}/none.sock")
    assert r.returncode == 3 and "cannot reach the weaveipam daemon" in r.stderr
    r = run("reset", "--socket", f"{tmp_path}/none.sock")
    assert r.returncode == 3 and "--data-dir" in r.stderr
    r = run("reset", "--socket", f"{tmp_path}/none.sock", "--data-dir", f"{tmp_path}/d")
    assert r.returncode == 0 and "nothing to discard" in r.stdout


def test_password_refused(tmp_path: os.PathLike[str]) -> None:
    r = run("daemon", "--password", "", "--data-dir", f"{tmp_path}/d")
    assert r.returncode == 2 and "empty" in r.stderr
    r = run("daemon", "--ipalloc-init", "consensus=0", "--data-dir", f"{tmp_path}/d")
    assert r.returncode == 2 and "consensus" in r.stderr
    r = run("daemon", "--ipalloc-range", "10.32.0.1/12", "--data-dir", f"{tmp_path}/d")
    assert r.returncode == 2 and "10.32.0.1/12" in r.stderr


def test_reset_hands_ranges_away_and_discards_state(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    a.allocate("a1")
    b.allocate("b1")
    share = a.report()["size"]
    r = cli(b, "reset")  # b1 is still allocated: refused, nothing changed
    assert r.returncode == 1 and "still allocated" in r.stderr and "--force" in r.stderr
    assert b.lookup("b1")
    r = cli(b, "reset", "--force")
    assert r.returncode == 0, r.stderr
    assert "handed" in r.stdout and "dropped 1 allocations" in r.stdout
    assert b.proc is not None and b.proc.wait(20) == 0
    assert not b.socket.exists()
    # a owns the whole range now, and b's state is gone
    wait_for(lambda: {e["peer"] for e in a.report()["entries"]} == {a.name}, what="handover")
    assert sum(e["size"] for e in a.report()["entries"]) == share
    b.start()
    assert b.lookup("b1") == []
    assert b.allocate("b2") != a.lookup("a1")[0]
