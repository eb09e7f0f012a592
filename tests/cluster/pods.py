"""The chaos run's final pod-to-pod probe (issue 16): after the faults, a pod on every
node, made as a runtime makes it (the shipped conflist `docker/10-weave-ipam.conflist`:
the reference `ptp` plugin with our shim as its IPAM, then `portmap`), and a ping from
every pod to every pod on another node, across the daemons' `--pod-routes`.

A pod that could not be made is a violation of kind `pod-add-failed`; a pod that does not
answer a ping (3 tries) one of kind `pod-unreachable`.  The pods' namespaces are
`wi-test-*` (tests/test_cni_support.py) and removed after, also when the probe fails.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from typing import Any

from .harness import REPO, ChaosNode

sys.path.insert(0, str(REPO / "tests"))  # also when run as `python -m tests.cluster.run`
from test_cni_runtime import BUSYBOX  # noqa: E402
from test_cni_support import REF, host_scratch, run_plugin, shim_binary  # noqa: E402

CONFLIST = REPO / "docker" / "10-weave-ipam.conflist"
TRIES = 3


def pods_unavailable() -> str | None:
    """What the probe needs and this machine lacks, or None."""
    plugins = [p["type"] for p in json.loads(CONFLIST.read_text())["plugins"]]
    lacking = [str(REF / p) for p in plugins if not (REF / p).exists()]
    if lacking:
        return (f"reference CNI plugins {', '.join(lacking)} (apt-get install "
                "containernetworking-plugins)")
    if not BUSYBOX.exists():
        return f"{BUSYBOX} (apt-get install busybox-static) to ping from the pods"
    if shutil.which("cc") is None and not (REPO / "cni-shim" / "weave-ipam").exists():
        return "a C compiler to build the CNI shim (cni-shim/)"
    return None


def add_pod(node: ChaosNode, netns: str, cni_path: str) -> tuple[str | None, str]:
    """Run the shipped conflist's ADD chain for a pod in `netns` on `node`: (its address,
    "") or (None, what failed)."""
    conflist = json.loads(CONFLIST.read_text())
    cid = secrets.token_hex(8)
    prev: Any = None
    for plugin in conflist["plugins"]:
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
        if prev is not None:
            conf["prevResult"] = prev
        r = run_plugin(REF / plugin["type"], "ADD", conf, container_id=cid,
                       netns=f"/run/netns/{netns}", ifname="eth0", socket=node.socket,
                       cni_path=cni_path, in_netns=node.ns, timeout=60.0)
        if r.rc != 0:
            return None, f"{plugin['type']} ADD: {r}"[:300]
        prev = r.json
    ips = prev.get("ips", []) if isinstance(prev, dict) else []
    if not ips:
        return None, f"no address in the result: {prev}"[:300]
    return ips[0]["address"].split("/")[0], ""


def ping(pod_ns: str, addr: str) -> str:
    """"" once `addr` answers from `pod_ns`, else what the last try said."""
    said = ""
    for i in range(TRIES):
        r = subprocess.run(["ip", "netns", "exec", pod_ns, str(BUSYBOX), "ping", "-c", "1",
                            "-W", "2", addr], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return ""
        said = (r.stdout + r.stderr).strip()[-200:]
        if i + 1 < TRIES:
            time.sleep(1.0)
    return said or "no answer"


def probe(nodes: list[ChaosNode]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Violations, and a summary: each node's pod address and the pings that answered."""
    cni_path = f"{shim_binary().parent}:{REF}"
    v: list[dict[str, Any]] = []
    pods: dict[int, tuple[str, str]] = {}
    with host_scratch() as h:
        for n in nodes:
            ns = h.new_netns().name
            addr, err = add_pod(n, ns, cni_path)
            if addr is None:
                v.append({"kind": "pod-add-failed", "node": n.idx, "detail": err})
            else:
                pods[n.idx] = (ns, addr)
        answered = 0
        for i, (ns, src) in pods.items():
            for j, (_, dst) in pods.items():
                if i == j:
                    continue
                said = ping(ns, dst)
                if said:
                    v.append({"kind": "pod-unreachable", "node": i, "address": dst,
                              "from": [i, src], "to": [j, dst], "detail": said})
                else:
                    answered += 1
    total = len(pods) * (len(pods) - 1)
    return v, {"pods": {i: a for i, (_, a) in pods.items()},
               "pings_answered": f"{answered}/{total}"}
