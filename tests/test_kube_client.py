"""The lightkube side (weaveipam.kube.client) against the fake API server, in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubefake import FakeKube, running
from test_mesh import until as mesh_until

from weaveipam.kube.client import Driver, make_client
from weaveipam.kube.config import KubeError, settings
from weaveipam.kube.reconcile import MapEntry

ME = "02:00:00:00:00:01"


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with running() as f:
        yield f


async def until(pred: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    await mesh_until(pred, timeout, what)


class Harness:
    def __init__(self, fake: FakeKube, tmp: Path, node: str = "node-a") -> None:
        s = settings(no_kube=False, kubeconfig=str(fake.kubeconfig(tmp / "kubeconfig")),
                     node_name=node, address_type=None)
        assert s is not None
        self.peers: frozenset[str] = frozenset()
        self.rmpeers: list[str] = []
        self.heir = ME
        self.driver = Driver(s, make_client(s), peer_name=ME, set_peers=self._set,
                             rmpeer=self._rmpeer, ring=lambda: (True, lambda _d: self.heir))

    def _set(self, p: frozenset[str]) -> None:
        self.peers = p

    async def _rmpeer(self, peer: str) -> tuple[str, str]:
        self.rmpeers.append(peer)
        return "done", "4096 IPs taken over"


def test_settings_need_a_node_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert settings(no_kube=False, kubeconfig=None, node_name=None, address_type=None) is None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert settings(no_kube=True, kubeconfig=None, node_name=None, address_type=None) is None
    with pytest.raises(KubeError, match="NODE_NAME"):
        settings(no_kube=False, kubeconfig=None, node_name=None, address_type=None)
    s = settings(no_kube=False, kubeconfig=None, node_name="n1", address_type="ExternalIP")
    assert s is not None and s.address_types[0] == "ExternalIP" and s.kubeconfig is None


def test_in_cluster_without_service_account_files_says_so(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    s = settings(no_kube=False, kubeconfig=None, node_name="n1", address_type=None)
    assert s is not None
    s.service_account = tmp_path / "nope"
    with pytest.raises(KubeError, match="in-cluster"):
        make_client(s)


async def test_peers_map_and_reclaim_through_lightkube(fake: FakeKube, tmp_path: Path) -> None:
    fake.add_node("node-a", "198.18.0.11")
    fake.add_node("node-b", "198.18.0.12")
    h = Harness(fake, tmp_path)
    h.driver.start()
    try:
        await until(lambda: h.peers == {"198.18.0.12"}, what="peers from the Node list")
        await until(lambda: fake.configmap() is not None, what="the map created")
        cm = fake.configmap()
        assert cm is not None
        mine = MapEntry.decode(cm["data"]["node-a"])
        assert mine is not None and mine.peer == ME
        assert mine.uid == fake.nodes["node-a"]["metadata"]["uid"] or mine.uid == ""
        # another daemon registers between our read and write: 409, re-read, both kept
        uid_c = fake.add_node("node-c", "198.18.0.13")
        await until(lambda: h.peers == {"198.18.0.12", "198.18.0.13"}, what="node-c dialled")
        other = "02:00:00:00:00:03"
        with fake._lock:
            c = fake.configmaps[(fake.namespace, "weave-ipam-peers")]
            c["data"]["node-c"] = MapEntry(other, uid_c).encode()
            c["metadata"]["resourceVersion"] = fake._bump()
        fake.delete_node("node-c")
        await until(lambda: other in h.rmpeers, what="node-c's peer reclaimed")
        await until(lambda: "node-c" not in (fake.configmap() or {}).get("data", {}),
                    what="node-c's entry removed after the rmpeer")
        assert h.rmpeers == [other]
        assert h.peers == {"198.18.0.12"}
        assert "node-a" in (fake.configmap() or {})["data"]
        assert h.driver.status()["reclaimed_total"] == 1
    finally:
        await h.driver.stop()


async def test_expired_watch_relists_and_outage_is_reported(fake: FakeKube,
                                                            tmp_path: Path) -> None:
    fake.add_node("node-a", "198.18.0.11")
    h = Harness(fake, tmp_path)
    h.driver.start()
    try:
        await until(lambda: h.driver.rec.nodes_known and fake.configmap(), what="started")
        fake.down()
        await until(lambda: "nodes" in h.driver.rec.problems, what="the outage noticed")
        assert "cannot reach" in h.driver.rec.problems["nodes"]
        with fake._lock:  # while it is down, more writes than the watch cache holds
            for i in range(60):
                fake._create_node(fake.node_object(f"n{i}", f"198.18.1.{i}"))
                fake._delete_node(f"n{i}")
            fake._create_node(fake.node_object("node-z", "198.18.0.26"))
        lists_before = sum(1 for m, p, _ in fake.requests if p == "/api/v1/nodes")
        fake.up()
        await until(lambda: h.peers == {"198.18.0.26"}, timeout=40, what="re-listed")
        assert sum(1 for m, p, _ in fake.requests if p == "/api/v1/nodes") > lists_before
        assert any("resourceVersion" in p and "watch" in p and s == 200
                   for _, p, s in fake.requests)
        await until(lambda: "nodes" not in h.driver.rec.problems, what="problem cleared")
    finally:
        await h.driver.stop()


async def test_forbidden_map_write_names_verb_and_resource(fake: FakeKube,
                                                           tmp_path: Path) -> None:
    fake.add_node("node-a", "198.18.0.11")
    fake.forbidden.add(("create", "configmaps"))
    h = Harness(fake, tmp_path)
    h.driver.start()
    try:
        await until(lambda: "peer map" in h.driver.rec.problems, what="the 403 reported")
        text = h.driver.rec.problems["peer map"]
        assert "'create'" in text and "'configmaps'" in text and "403" in text
        fake.forbidden.clear()  # granted: it recovers by itself
        await until(lambda: fake.configmap() is not None, timeout=40, what="map created")
        await until(lambda: "peer map" not in h.driver.rec.problems, what="problem cleared")
        assert json.dumps(h.driver.status())  # status is plain JSON
    finally:
        await h.driver.stop()


async def test_manifest_rbac_covers_exactly_what_the_daemon_uses(fake: FakeKube,
                                                                 tmp_path: Path) -> None:
    """The fake authorizes by the manifest's Roles; the daemon's calls all pass, and every
    rule is used (nothing granted that the daemon does not need)."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    docs = [d for d in yaml.safe_load_all(
        (root / "docker" / "weave-ipam-daemonset.yaml").read_text()) if d]
    fake.use_rbac(docs)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]  # applied with the manifest
    fake.configmaps[(cm["metadata"]["namespace"], cm["metadata"]["name"])] = {
        "kind": "ConfigMap", "apiVersion": "v1",
        "metadata": {**cm["metadata"], "uid": "u", "resourceVersion": fake._bump()}}
    fake.add_node("node-a", "198.18.0.11")
    fake.add_node("node-b", "198.18.0.12")
    h = Harness(fake, tmp_path)
    h.driver.start()
    try:
        await until(lambda: "node-a" in ((fake.configmap() or {}).get("data") or {}),
                    what="our entry written")
        await until(lambda: any("watch=" in p for _, p, _ in fake.requests), what="watching")
        fake.delete_node("node-b")  # a map re-read and its reclaim path
        await until(lambda: h.peers == frozenset(), what="node-b gone")
        await asyncio.sleep(0.5)
    finally:
        await h.driver.stop()
    assert not [r for r in fake.requests if r[2] in (401, 403)], fake.requests
    used = set()
    for method, path, _ in fake.requests:
        res = "nodes" if path.startswith("/api/v1/nodes") else "configmaps"
        verb = {"PUT": "update", "POST": "create"}.get(method) or (
            "watch" if "watch=" in path else "list" if res == "nodes" else "get")
        used.add((verb, res))
    granted = {(v, res) for _, r in fake.rbac or [] for res in r["resources"]
               for v in r["verbs"]}
    assert used == granted


async def test_rotated_token_is_read_again(fake: FakeKube, tmp_path: Path) -> None:
    """As the projected ServiceAccount token: after a 401 the token file is read again."""
    token = tmp_path / "token"
    token.write_text(fake.token)
    cfg = json.loads(fake.kubeconfig(tmp_path / "kc").read_text())
    cfg["users"][0]["user"] = {"tokenFile": str(token)}
    (tmp_path / "kc").write_text(json.dumps(cfg))
    fake.add_node("node-a", "198.18.0.11")
    s = settings(no_kube=False, kubeconfig=str(tmp_path / "kc"), node_name="node-a",
                 address_type=None)
    assert s is not None
    h = Harness(fake, tmp_path)
    h.driver = Driver(s, make_client(s), peer_name=ME, set_peers=h._set, rmpeer=h._rmpeer,
                      ring=lambda: (True, None))
    h.driver.start()
    try:
        await until(lambda: fake.configmap() is not None, what="started with the first token")
        token.write_text("rotated-token\n")
        fake.token = "rotated-token"
        seen = len(fake.requests)
        await until(lambda: any(r[2] == 401 for r in fake.requests[seen:]), what="a 401")
        first_401 = next(i for i, r in enumerate(fake.requests) if i >= seen and r[2] == 401)
        await until(lambda: any(r[2] == 200 for r in fake.requests[first_401:]),
                    what="the same call with the new token")
        assert not h.driver.rec.problems
    finally:
        await h.driver.stop()


async def test_in_cluster_service_account_over_tls(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """In a Pod: the server from KUBERNETES_SERVICE_HOST/PORT over HTTPS, verified with the
    ServiceAccount's ca.crt, its token, and the map in its namespace; a CA that did not sign
    the server's certificate is a reported problem, not a crash."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "namespace").write_text("weave-ns")
    ca.cert_pem.write_to_path(str(sa / "ca.crt"))
    with running(ssl_context=server_ctx, namespace="weave-ns") as fake:
        (sa / "token").write_text(fake.token + "\n")
        fake.add_node("node-a", "198.18.0.11")
        fake.add_node("node-b", "198.18.0.12")
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", fake.host)
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
        s = settings(no_kube=False, kubeconfig=None, node_name="node-a", address_type=None)
        assert s is not None and s.where() == "in-cluster"
        s.service_account = sa
        h = Harness(fake, tmp_path)
        h.driver = Driver(s, make_client(s), peer_name=ME, set_peers=h._set,
                          rmpeer=h._rmpeer, ring=lambda: (True, None))
        h.driver.start()
        try:
            await until(lambda: h.peers == {"198.18.0.12"}, what="Nodes over HTTPS")
            await until(lambda: fake.configmap() is not None, what="the map in weave-ns")
            assert h.driver.status()["namespace"] == "weave-ns"
        finally:
            await h.driver.stop()
        trustme.CA().cert_pem.write_to_path(str(sa / "ca.crt"))  # the wrong CA
        h.driver = Driver(s, make_client(s), peer_name=ME, set_peers=h._set,
                          rmpeer=h._rmpeer, ring=lambda: (True, None))
        h.driver.start()
        try:
            await until(lambda: "nodes" in h.driver.rec.problems, what="TLS failure reported")
            assert "cannot reach" in h.driver.rec.problems["nodes"]
        finally:
            await h.driver.stop()
