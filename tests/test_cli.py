"""The `weaveipam` client commands against a real daemon over its unix socket."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemons import REPO, Cluster, Node, cluster, free_ports, wait_for  # noqa: F401

from weaveipam import __version__
from weaveipam.cli import DAEMON_FLAGS, build_parser

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
    r = cli(node, "prime")  # a sentence, not the engine's state token
    assert r.returncode == 0 and r.stdout.strip() == \
        "the ring is established: this peer can allocate", r.stdout
    r = run("ls", "--http", f"127.0.0.1:{node.http_port}")
    assert r.returncode == 0 and "pod-b" in r.stdout


def test_errors_exit_nonzero_and_change_nothing(node: Node) -> None:
    before = node.api("GET", "/ip")[1]
    for args, code in [(("alloc", "x", "10.33.1.0"), 2), (("alloc", "x", "nonsense/24"), 2),
                       (("alloc", "x", "10.32.0.0/33"), 2), (("alloc", "x", "banana"), 2),
                       (("alloc", "x", "10.32.0.5/24"), 2), (("claim", "x", "10.40.0.9/40"), 2),
                       (("alloc", "a/b"), 2), (("claim", "x", "not-an-ip"), 2),
                       (("release", "x", "999.1.1.1"), 2),
                       (("alloc", "x", "192.168.0.0/24"), 1),
                       (("claim", "x", "192.168.0.1"), 1),
                       (("release", "never"), 1), (("rmpeer", "ghost"), 1),
                       (("rmpeer", node.name), 1)]:
        r = cli(node, *args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert r.stderr.startswith("weaveipam: "), (args, r.stderr)
    for args in (("ls", "--http", "127.0.0.1:99999"), ("ls", "--http", "bad host")):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.startswith("weaveipam: --http "), r.stderr
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


# ---- usage: every bad value is refused before anything starts or is sent (exit 2) ----------

def test_every_flag_value_is_checked(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    d = ["--data-dir", str(tmp_path / "d")]
    cases = [
        (["--ipalloc-range", "banana"], "not an IP address"),
        (["--ipalloc-range", "10.32.0.0/33"], "/33 is longer than IPv4 allows"),
        (["--ipalloc-range", "fd00::/129"], "/129 is longer than IPv6 allows"),
        (["--ipalloc-range", "10.32.0.0/32"], "holds only 1 address"),
        (["--ipalloc-range", "10.32.0.1/12"], "host bits are set: did you mean 10.32.0.0/12"),
        (["--ipalloc-default-subnet", "10.99.0.0/16"], "not inside --ipalloc-range"),
        (["--op-timeout", "-1"], "greater than 0"),
        (["--op-timeout", "nan"], "greater than 0"),
        (["--log-level", "chatty"], "debug, info, warning, error"),
        (["--name", "notamac"], "MAC-like"),
        (["--nickname", "two words"], "without spaces"),
        (["--port", "99999"], "1 to 65535"),
        (["--conn-limit", "-3"], "whole number"),
        (["--status-addr", "127.0.0.1:99999"], "bad port"),
        (["--host", "not a host"], "not an IP address or host name"),
        (["--peer", "[::1"], "missing ']'"),
        (["--data-dir", str(afile)], "not a directory"),
        (["--socket", "/tmp/" + "s" * 120], "at most 107 bytes"),
        (["--kubeconfig", str(tmp_path / "no-kubeconfig")], "no such file"),
        (["--kubeconfig", str(tmp_path)], "not a file"),
        (["--node-name", "Node_1"], "not a Kubernetes Node name"),
        (["--kube-address-type", "internalip"], "use one of InternalIP, ExternalIP"),
    ]
    for args, why in cases:
        r = run("daemon", *d, *args) if args[0] != "--data-dir" else run("daemon", *args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert r.stderr.startswith("weaveipam: ") and why in r.stderr, (args, r.stderr)
        assert r.stderr.count(args[-1]) == 1, r.stderr  # the value is quoted once
        assert "Traceback" not in r.stderr and "stopped" not in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()  # nothing was started or created
    # the environment is checked the same way
    r = run("daemon", *d, env={"WEAVEIPAM_OP_TIMEOUT": "soon"})
    assert r.returncode == 2, r.stderr
    assert "argument --op-timeout: 'soon' (from WEAVEIPAM_OP_TIMEOUT)" in r.stderr, r.stderr
    r = run("daemon", *d, env={"PEERS": "127.0.0.1:6783 [::1"})
    assert r.returncode == 2 and "PEERS" in r.stderr, r.stderr
    for var in ("WEAVEIPAM_POD_ROUTES", "WEAVEIPAM_INSECURE_PEERS"):
        r = run("daemon", *d, env={var: "maybe"})
        assert r.returncode == 2 and f"{var}='maybe': use 1 or 0" in r.stderr, r.stderr
    r = run("daemon", *d, env={"NODE_NAME": "Node_1"})
    assert r.returncode == 2 and "'Node_1' (from NODE_NAME)" in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()


def test_version_help_and_no_arguments() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"weaveipam {__version__}"
    r = run()
    assert r.returncode == 2 and "usage: weaveipam" in r.stderr and "daemon" in r.stderr
    assert "Exit codes" in r.stderr
    r = run("daemon", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for f in DAEMON_FLAGS:  # every flag, its variable and its default are in the help
        assert f.names[0] in text and (f.env is None or f"env {f.env}" in text), f.names
        if f.default is not None:
            assert f"default {f.default}" in text, f.names
    assert "PEER" in text and "Exit codes: 0 done" in text
    r = run("wait", "--help")
    assert r.returncode == 0 and "--timeout" in r.stdout


def test_readme_lists_every_flag_env_and_exit_code() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Command line"):readme.index("## HTTP API")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    for f in DAEMON_FLAGS:
        row = next((r for r in rows if f"`{f.names[0]}`" in r.split("|")[1]), None)
        assert row is not None, f"README's flag table lacks {f.names[0]}"
        if f.env:
            assert f"`{f.env}`" in row, (f.names[0], f.env, row)
        if f.default is not None:
            assert f"`{f.default}`" in row, (f.names[0], f.default, row)
    for var in ("WEAVEIPAM_SOCKET", "WEAVEIPAM_HTTP", "WEAVEIPAM_DATA_DIR", "WEAVE_IPAM_SOCKET"):
        assert f"`{var}`" in readme, var
    for code in ("0 done", "1 refused", "2 bad usage", "3 no daemon"):
        assert code in section, code
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd in sub.choices:  # every command the CLI has is in the README
        assert f"`{cmd}" in readme or f"`weaveipam {cmd}" in readme, cmd


# ---- start-up errors: what is wrong, which flag, and no "stopped" for what never started ---

def test_startup_errors_name_the_flag(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    peer, http, status = free_ports(3)
    try:
        base = ["daemon", "--data-dir", str(tmp_path / "d"), "--host", "127.0.0.1",
                "--http-addr", f"127.0.0.1:{http}", "--status-addr", f"127.0.0.1:{status}"]
        r = run(*base, "--port", str(port))
        assert r.returncode == 1, r.stderr
        assert "--port" in r.stderr and str(port) in r.stderr, r.stderr
        assert "stopped" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        r = run(*base[:-2], "--status-addr", f"127.0.0.1:{port}", "--port", str(peer))
        assert r.returncode == 1 and "--status-addr" in r.stderr, r.stderr
        assert "daemon: stopped" not in r.stderr, r.stderr  # the daemon never started
    finally:
        busy.close()


# ---- status, wait, prime, rmpeer against real daemons ----------------------------------------

def test_status_states_once_and_draws_the_ring(cluster: Cluster) -> None:
    nodes = cluster.add(3)
    for n in nodes:
        r = cli(n, "wait", "--timeout", "60")
        assert r.returncode == 0, r.stderr
    a = nodes[0]
    r = cli(a, "status")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("Status: ready") == 1, out
    assert "Peers: 3 (with 2 established connections)" in out, out
    strip = next(line for line in out.splitlines() if line.strip().startswith("Ring:"))
    letters = strip.split(":", 1)[1].strip()
    assert len(letters) == 64 and set(letters) == {"A", "B", "C"}, strip
    # the letters cover the range in the owners' shares (to one column)
    shares = {line[0]: float(line.split("(")[2].split("%")[0])
              for line in out.splitlines() if line[:2] in ("A ", "B ", "C ")}
    assert set(shares) == {"A", "B", "C"} and out.count(f"A {a.name}(node0)") == 1, out
    for letter, pct in shares.items():
        assert abs(letters.count(letter) - pct * 64 / 100) <= 1, (letter, pct, letters)

    # one dies: Peers still counts it (as the ring does), it is marked, its connection
    # names it, and the advice is printed once
    dead = nodes[2]
    dead.kill()
    wait_for(lambda: "unreachable!" in cli(a, "status").stdout, timeout=30, what="unreachable")
    out = cli(a, "status").stdout
    assert "Peers: 3 (with 1 established connection, 1 unreachable)" in out, out
    assert out.count("Status: ready") == 1 and out.count("weaveipam rmpeer NAME") == 1, out
    line = next(x for x in out.splitlines() if f" {dead.name}(node2) " in x)
    assert line.endswith(" - unreachable!"), out
    assert f"{dead.name}()" not in out, out
    conn = next(line for line in out.splitlines() if f":{dead.peer_port} " in line)
    assert f"{dead.name}(node2)" in conn, conn

    r = cli(a, "rmpeer", "node2")
    assert r.returncode == 0, r.stderr
    said = re.fullmatch(rf"\d+ IPs taken over from {dead.name} by (\S+)\n", r.stdout)
    assert said and said.group(1) in (f"{a.name}(node0)", f"{nodes[1].name}(node1)"), r.stdout
    wait_for(lambda: "Peers: 2 " in cli(a, "status").stdout, what="removed peer not counted")


def test_wait_exit_codes_and_client_data_dir(cluster: Cluster, tmp_path: Path) -> None:
    (n,) = cluster.add(1, init="consensus=3", start=False)
    n.start(wait=False)
    # waits through the start (no socket yet), then reports why it is not ready
    r = run("wait", "--timeout", "6", "--socket", str(n.socket))
    assert r.returncode == 1 and "not ready" in r.stderr and "consensus=3" in r.stderr, r.stderr
    r = run("wait", "--timeout", "0.5", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 3 and "no weaveipam daemon answered" in r.stderr, r.stderr
    # the client finds the daemon of a data dir whatever its socket (also as root)
    r = run("status", "--data-dir", str(n.data_dir))
    assert r.returncode == 0 and n.name in r.stdout, r.stderr


def test_idle_text_for_consensus_waiting_for_peers(cluster: Cluster) -> None:
    (n,) = cluster.add(1, init="consensus=3", extra=["--op-timeout", "1"])
    r = cli(n, "alloc", "pod")  # times out: no quorum
    assert r.returncode == 1, r.stderr
    out = cli(n, "status").stdout
    assert "seeded at the first allocation" not in out, out
    assert "waiting for peers (consensus=3, quorum: 2, reachable: 1)" in out, out
    r = cli(n, "prime")  # waits --op-timeout for a ring, then says why there is none
    assert r.returncode == 1, r.stdout
    assert "no ring yet: awaiting consensus (quorum: 2, known: 1)" in r.stderr, r.stderr


def test_status_watch_redraws(node: Node) -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "WEAVEIPAM_SOCKET": str(node.socket)}
    p = subprocess.Popen([sys.executable, "-m", "weaveipam", "status", "--watch",
                          "--interval", "0.2"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout is not None
        seen = ""
        deadline = time.monotonic() + 60
        while seen.count("\x1b[2J") < 3 and time.monotonic() < deadline:
            seen += p.stdout.read(1)
        assert seen.count("\x1b[2J") >= 3, seen
        assert seen.count("Status: ready") >= 2 and "Ring:" in seen, seen
    finally:
        p.send_signal(signal.SIGINT)  # by PID: our own child
        assert p.wait(20) == 0
