"""The CNI service in-process: a real allocator behind a fake daemon, no processes."""

from __future__ import annotations

import ipaddress
import json
import random
import time
from typing import Any

import pytest

from weaveipam.cni.config import HEADERS
from weaveipam.cni.service import CniService
from weaveipam.core.addr import CIDR
from weaveipam.core.allocator import Allocate, Allocator, InitMode, Reply, Request
from weaveipam.node import ApiError


class FakeDaemon:
    """Daemon.call without IO: the reply comes out of the same allocator call; a request
    that would wait (no consensus) answers "unavailable", as the daemon does on timeout."""

    def __init__(self, range_: str = "198.18.0.0/24", init: str = "consensus=1",
                 default_subnet: str | None = None) -> None:
        self.alloc = Allocator(name="02:00:00:00:00:01", nickname="n",
                               universe=CIDR.parse(range_), init=InitMode.parse(init),
                               rng=random.Random(1), now=time.monotonic(),
                               default_subnet=CIDR.parse(default_subnet)
                               if default_subnet else None)
        self.alloc.take_outputs()
        self.stopping = False
        self.store_error: str | None = None
        self.rid = 0
        self.calls: list[Request] = []

    @property
    def allocator(self) -> Allocator:
        return self.alloc

    async def call(self, req: Request) -> Any:
        if self.stopping:
            raise ApiError("unavailable", "the daemon is shutting down; retry shortly")
        self.calls.append(req)
        self.rid += 1
        self.alloc.request(self.rid, req, time.monotonic())
        for o in self.alloc.take_outputs():
            if isinstance(o, Reply) and o.rid == self.rid:
                if o.error is not None:
                    raise ApiError(o.error.code, o.error.message)
                return o.value
        raise ApiError("unavailable", "timed out: awaiting consensus")

    def held(self) -> dict[str, list[str]]:
        u = self.alloc.universe
        return {i: [u.fmt_addr(a) for a in addrs]
                for i, addrs in self.alloc.allocations().items()}


class Runner:
    def __init__(self, d: FakeDaemon) -> None:
        self.d = d
        self.svc = CniService(d)

    async def __call__(self, cmd: str | None, conf: dict[str, Any] | bytes, *,
                       cid: str | None = "c1", ifname: str | None = "eth0",
                       netns: str | None = "/run/netns/x",
                       args: str | None = None) -> tuple[int, Any]:
        raw: dict[str, str | None] = dict.fromkeys(HEADERS)
        raw.update({"CNI_COMMAND": cmd, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname,
                    "CNI_NETNS": netns, "CNI_ARGS": args})
        stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        rc, out = await self.svc.handle(raw, stdin)
        return rc, (json.loads(out) if out else None)


def net(version: str = "1.0.0", name: str = "testnet", **ipam: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": name, "type": "bridge",
            "ipam": {"type": "weave-ipam", **ipam}}


@pytest.fixture
def d() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def run(d: FakeDaemon) -> Runner:
    return Runner(d)


async def test_add_is_idempotent_and_del_frees(d: FakeDaemon, run: Runner) -> None:
    rc, res = await run("ADD", net(), args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=p")
    assert rc == 0
    (ipc,) = res["ips"]
    assert ipc["address"].startswith("198.18.0.") and ipc["address"].endswith("/24")
    assert (await run("ADD", net()))[1]["ips"] == [ipc]
    assert d.held() == {"cni:testnet:c1:eth0": [ipc["address"].split("/")[0]]}
    assert list(d.alloc.allocations()["cni:testnet:c1:eth0"].values()) == ["default/p"]
    assert await run("DEL", net(), netns="") == (0, None)
    assert d.held() == {}
    assert await run("DEL", net(), netns="") == (0, None)
    assert await run("DEL", net(), cid="never-added") == (0, None)


async def test_add_after_del_moves_on(run: Runner) -> None:
    """Continue after the last address before reusing one (Weave's immediate reuse)."""
    first = (await run("ADD", net()))[1]["ips"][0]["address"]
    await run("DEL", net())
    again = (await run("ADD", net(), cid="c2"))[1]["ips"][0]["address"]
    assert again != first


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
async def test_versions(run: Runner, version: str) -> None:
    rc, res = await run("ADD", net(version))
    assert rc == 0 and res["cniVersion"] == version
    assert ("version" in res["ips"][0]) == (version < "1.0.0")


async def test_ipv6() -> None:
    run = Runner(FakeDaemon("fd00:32::/108"))
    rc, res = await run("ADD", net("0.3.1"))
    assert rc == 0 and res["ips"][0]["version"] == "6"
    assert res["ips"][0]["address"].startswith("fd00:32::") and \
        res["ips"][0]["address"].endswith("/108")


async def test_default_subnet_prefix() -> None:
    run = Runner(FakeDaemon("198.18.0.0/16", default_subnet="198.18.4.0/24"))
    res = (await run("ADD", net()))[1]
    assert res["ips"][0]["address"].startswith("198.18.4.") and \
        res["ips"][0]["address"].endswith("/24")
    res = (await run("ADD", net(subnet="198.18.8.0/22"), cid="c2"))[1]
    assert res["ips"][0]["address"].endswith("/22")
    res = (await run("ADD", {**net(), "runtimeConfig": {"ips": ["198.18.9.9/24"]}},
                     cid="c3"))[1]
    assert res["ips"][0]["address"] == "198.18.9.9/16"  # outside the default: the range's
    res = (await run("ADD", {**net(subnet="198.18.8.0/22"),
                             "runtimeConfig": {"ips": ["198.18.9.10/22"]}}, cid="c4"))[1]
    assert res["ips"][0]["address"] == "198.18.9.10/22"
    assert run.d.alloc.prefix_of(int(ipaddress.IPv4Address("198.18.9.10"))) == 22  # kept


async def test_gateway_is_never_a_pods(d: FakeDaemon, run: Runner) -> None:
    rc, res = await run("ADD", net(gateway="198.18.0.1"))
    assert rc == 0
    assert res["ips"] == [{"address": "198.18.0.2/24", "gateway": "198.18.0.1"}]
    assert d.held()["weave:gateway"] == ["198.18.0.1"]


async def test_explicit_gateway_held_by_a_pod_is_refused(d: FakeDaemon, run: Runner) -> None:
    """A gateway added to the config after a pod got that address: say so, change nothing."""
    pod = (await run("ADD", net()))[1]["ips"][0]["address"].split("/")[0]
    before = d.held()
    rc, err = await run("ADD", net(gateway=pod), cid="c2")
    assert rc == 1 and err["code"] == 101
    assert pod in err["msg"] and "cni:testnet:c1:eth0" in err["msg"]
    assert "another ipam.gateway" in err["details"]
    assert d.held() == before


def gw_net(kind: str = "bridge", **plugin: Any) -> dict[str, Any]:
    return {**net(), "type": kind, **plugin}


@pytest.mark.parametrize("plugin", [gw_net(isGateway=True), gw_net(isDefaultGateway=True),
                                    gw_net("ptp")], ids=["isGateway", "isDefaultGateway", "ptp"])
async def test_node_gateway_when_the_plugin_wants_one(d: FakeDaemon, run: Runner,
                                                      plugin: dict[str, Any]) -> None:
    """One address per node, held under the reserved ident, in every result, never a
    pod's; a repeated ADD, another pod or another network name get the same one."""
    rc, res = await run("ADD", plugin)
    assert rc == 0, res
    (ipc,) = res["ips"]
    gw = ipc["gateway"]
    assert d.held()["weave:expose"] == [gw]
    assert ipc["address"] != f"{gw}/24" and ipc["address"].endswith("/24")
    assert (await run("ADD", plugin))[1] == res
    other = (await run("ADD", {**plugin, "name": "other"}, cid="c2"))[1]["ips"][0]
    assert other["gateway"] == gw and other["address"] not in (ipc["address"], f"{gw}/24")
    # DEL and GC of pods leave the gateway alone
    assert (await run("DEL", plugin))[0] == 0
    assert (await run("GC", {**plugin, "cniVersion": "1.1.0",
                             "cni.dev/valid-attachments": []}))[0] == 0
    assert d.held() == {"weave:expose": [gw], "cni:other:c2:eth0":
                        [other["address"].split("/")[0]]}


async def test_no_gateway_when_the_plugin_does_not_want_one(d: FakeDaemon, run: Runner
                                                            ) -> None:
    for plugin in (gw_net(isGateway=False), gw_net("macvlan"), gw_net("ipvlan")):
        rc, res = await run("ADD", plugin)
        assert rc == 0 and "gateway" not in res["ips"][0]
    assert "weave:expose" not in d.held()


async def test_node_gateway_per_subnet() -> None:
    d = FakeDaemon("198.18.0.0/16", default_subnet="198.18.4.0/24")
    run = Runner(d)
    dflt = (await run("ADD", gw_net(isGateway=True)))[1]["ips"][0]
    same = (await run("ADD", gw_net(isGateway=True, ipam={"type": "weave-ipam",
                                                          "subnet": "198.18.4.0/24"}),
                      cid="c2"))[1]["ips"][0]
    sub = (await run("ADD", gw_net(isGateway=True, ipam={"type": "weave-ipam",
                                                         "subnet": "198.18.8.0/22"}),
                     cid="c3"))[1]["ips"][0]
    assert dflt["gateway"] == same["gateway"]  # the default subnet named explicitly
    assert dflt["gateway"].startswith("198.18.4.") and sub["gateway"].startswith("198.18.")
    assert ipaddress.ip_address(sub["gateway"]) in ipaddress.ip_network("198.18.8.0/22")
    assert sub["address"].endswith("/22")
    held = d.held()
    assert held["weave:expose"] == [dflt["gateway"]]
    assert held["weave:expose:198.18.8.0/22"] == [sub["gateway"]]


async def test_a_refused_add_leaves_no_gateway_and_no_address() -> None:
    """No room for the gateway: the pod's address is given back (11, retry later); a static
    conflict on a node without a gateway yet does not make one."""
    d = FakeDaemon("198.18.0.0/30")  # two usable addresses
    run = Runner(d)
    await d.call(Allocate("someone", None))
    before = d.held()
    rc, err = await run("ADD", gw_net(isGateway=True))
    assert rc == 1 and err["code"] == 11 and "gateway" in err["msg"], err
    assert d.held() == before
    taken = before["someone"][0]
    rc, err = await run("ADD", gw_net(isGateway=True), args=f"IP={taken}")
    assert rc == 1 and err["code"] == 101
    assert d.held() == before


async def test_static_address_cannot_take_the_gateway(d: FakeDaemon, run: Runner) -> None:
    gw = (await run("ADD", gw_net(isGateway=True)))[1]["ips"][0]["gateway"]
    before = d.held()
    rc, err = await run("ADD", gw_net(isGateway=True), cid="c2", args=f"IP={gw}")
    assert rc == 1 and err["code"] == 101 and "weave:expose" in err["msg"]
    assert d.held() == before


async def test_static_claims_all_or_nothing(d: FakeDaemon, run: Runner) -> None:
    rc, res = await run("ADD", net(), args="IP=198.18.0.50")
    assert rc == 0 and res["ips"] == [{"address": "198.18.0.50/24"}]
    assert (await run("ADD", net(), args="IP=198.18.0.50"))[0] == 0  # repeated: fine
    before = d.held()
    rc, err = await run("ADD", {**net(), "runtimeConfig": {"ips": ["198.18.0.51",
                                                                  "198.18.0.50"]}}, cid="c2")
    assert rc == 1 and err["code"] == 101 and "198.18.0.50" in err["msg"]
    assert d.held() == before  # .51 given back


async def test_check(d: FakeDaemon, run: Runner) -> None:
    res = (await run("ADD", net("0.4.0")))[1]
    assert await run("CHECK", {**net("0.4.0"), "prevResult": res}) == (0, None)
    wrong = {"ips": [{"version": "4", "address": "198.18.0.99/24"}]}
    rc, err = await run("CHECK", {**net("0.4.0"), "prevResult": wrong})
    assert rc == 1 and err["code"] == 100 and "198.18.0.99" in err["msg"]
    rc, err = await run("CHECK", {**net("0.4.0"), "prevResult": {"ips": []}})
    assert err["code"] == 100
    rc, err = await run("CHECK", {**net("0.4.0"), "prevResult": res}, cid="other")
    assert err["code"] == 3
    assert (await run("CHECK", net("0.4.0")))[1]["code"] == 7
    assert (await run("CHECK", {**net("0.3.1"), "prevResult": res}))[1]["code"] == 1
    d.store_error = "disk gone"
    rc, err = await run("CHECK", {**net("0.4.0"), "prevResult": res})
    assert err["code"] == 11 and "disk gone" in err["msg"]


async def test_daemon_not_serving_is_try_again(d: FakeDaemon, run: Runner) -> None:
    await run("ADD", net())
    d.stopping = True
    for cmd in ("ADD", "DEL"):
        rc, err = await run(cmd, net())
        assert rc == 1 and err["code"] == 11, cmd
    d.stopping = False
    assert d.held()  # the failed DEL freed nothing


async def test_add_waiting_for_consensus_is_try_again() -> None:
    d = FakeDaemon(init="consensus=3")
    rc, err = await Runner(d)("ADD", net())
    assert rc == 1 and err["code"] == 11 and "consensus" in err["msg"]


async def test_status() -> None:
    d = FakeDaemon()
    run = Runner(d)
    assert d.alloc.state() == "idle"
    assert await run("STATUS", net("1.1.0")) == (0, None)  # primes the ring
    assert d.alloc.state() == "ready"
    stuck = Runner(FakeDaemon(init="consensus=3"))
    rc, err = await stuck("STATUS", net("1.1.0"))
    assert rc == 1 and err["code"] == 50 and "consensus" in err["msg"]
    small = FakeDaemon("198.18.0.0/30")
    run = Runner(small)
    await run("ADD", net(), cid="a")
    await run("ADD", net(), cid="b")
    rc, err = await run("STATUS", net("1.1.0"))
    assert err["code"] == 50 and "no free address" in err["msg"]
    # a subnet with room is still ready while the default one is full
    big = Runner(FakeDaemon("198.18.0.0/24", default_subnet="198.18.0.0/30"))
    await big("ADD", net(), cid="a")
    await big("ADD", net(), cid="b")
    assert (await big("STATUS", net("1.1.0")))[1]["code"] == 50
    assert await big("STATUS", net("1.1.0", subnet="198.18.0.128/25")) == (0, None)
    d.store_error = "disk gone"
    assert (await Runner(d)("STATUS", net("1.1.0")))[1]["code"] == 50


async def test_gc(d: FakeDaemon, run: Runner) -> None:
    await run("ADD", net("1.1.0", "gcnet", gateway="198.18.0.1"), cid="d")
    for cid in ("a", "b", "c"):
        await run("ADD", net("1.1.0", "gcnet"), cid=cid)
    await run("ADD", net("1.1.0", "gcnet"), cid="a", ifname="net1")
    await run("ADD", net("1.1.0", "gcnet2"), cid="b")
    keep = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "zz", "ifname": "eth0"}]
    assert await run("GC", {**net("1.1.0", "gcnet"), "cni.dev/valid-attachments": keep},
                     cid=None, ifname=None, netns=None) == (0, None)
    # the reserved gateway is not an attachment: GC leaves it
    assert sorted(d.held()) == ["cni:gcnet2:b:eth0", "cni:gcnet:a:eth0", "weave:gateway"]


async def test_bad_input_changes_nothing(d: FakeDaemon, run: Runner) -> None:
    await run("ADD", net())
    before = d.held()
    ncalls = len(d.calls)
    cases: list[tuple[Any, ...]] = [
        (None, net(), {}, 4), ("NOPE", net(), {}, 4), ("ADD", net(), {"cid": None}, 4),
        ("ADD", net(), {"args": "broken"}, 4), ("ADD", b"{bad", {}, 6),
        ("ADD", net("0.1.0"), {}, 1), ("ADD", net(subnet="10.0.0.0/24"), {}, 7),
        ("ADD", net(ranges=[]), {}, 2), ("ADD", {**net(), "name": ""}, {}, 7),
        ("ADD", net(), {"args": "IP=198.18.0.0"}, 7), ("GC", net("1.1.0"), {}, 7),
        ("GC", net("1.0.0"), {}, 1), ("DEL", b"", {}, 6),
    ]
    for cmd, conf, kw, code in cases:
        rc, err = await run(cmd, conf, **kw)
        assert rc == 1 and err["code"] == code, (cmd, conf, kw, err)
        assert set(err) <= {"cniVersion", "code", "msg", "details"} and err["msg"]
    assert d.held() == before and len(d.calls) == ncalls  # never reached the allocator


async def test_version_needs_nothing(run: Runner) -> None:
    rc, out = await run("VERSION", b'{"cniVersion": "0.4.0"}', cid=None, ifname=None)
    assert rc == 0 and out["cniVersion"] == "0.4.0" and "1.1.0" in out["supportedVersions"]


async def test_internal_errors_are_errors(d: FakeDaemon, run: Runner) -> None:
    async def boom(req: Request) -> Any:
        raise RuntimeError("engine bug")
    d.call = boom  # type: ignore[method-assign]
    for cmd in ("ADD", "DEL"):
        rc, err = await run(cmd, net())
        assert rc == 1 and err["code"] == 102 and "engine bug" in err["msg"], cmd


async def test_header_errors_are_reported(run: Runner) -> None:
    from weaveipam.cni.config import CniError
    rc, out = await run.svc.handle(CniError(4, "CNI_ARGS: bad"), b'{"cniVersion":"0.4.0"}')
    assert rc == 1 and json.loads(out) == {"cniVersion": "0.4.0", "code": 4,
                                           "msg": "CNI_ARGS: bad"}
