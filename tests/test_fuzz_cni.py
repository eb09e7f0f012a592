"""Malformed CNI configs and environments through the real shim against a live daemon.

Every case must exit non-zero with a CNI error JSON on stdout whose code is one of the
spec's (or ours, 100+), and allocate nothing (GET /ip is unchanged).  A valid ADD/DEL pair
still works at the end.  Only the IPAM plugin runs, so no network namespace is needed.  The
cases tried are printed at the end (run with -s to see them).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import Node, single_node
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_cni_support import CniRun, run_plugin, shim_binary

CNI_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 51}
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CASES: Counter[str] = Counter()
VALID: dict[str, Any] = {"cniVersion": "1.0.0", "name": "fuzznet",
                         "ipam": {"type": "weave-ipam"}}
VALID_ENV: dict[str, str] = {"container_id": "fuzzcontainer", "netns": "/var/run/netns/x",
                             "ifname": "eth0"}


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with single_node("wi-fc-") as n:
        yield n
        print(f"\nfuzz cni cases: {dict(CASES)} total={sum(CASES.values())}")


@pytest.fixture(scope="module")
def shim() -> Path:
    return shim_binary()


def owned(n: Node) -> Any:
    code, body = n.api("GET", "/ip", json_=True, timeout=10)
    assert code == 200, (code, body)
    return json.loads(body)


def run(shim: Path, n: Node, command: str | None, stdin: bytes | str | dict[str, Any],
        **env: Any) -> CniRun:
    kw: dict[str, Any] = {**VALID_ENV, **env}
    return run_plugin(shim, command, stdin, socket=n.socket, timeout=30, **kw)


def assert_refused(n: Node, r: CniRun, before: Any, what: str) -> None:
    assert r.rc != 0, f"{what}: accepted: {r}"
    try:
        j = json.loads(r.out)
    except ValueError:
        raise AssertionError(f"{what}: stdout is not JSON: {r}") from None
    assert isinstance(j, dict), f"{what}: {r}"
    code = j.get("code")
    assert type(code) is int and (code in CNI_CODES or code >= 100), f"{what}: {r}"
    assert isinstance(j.get("msg"), str) and j["msg"], f"{what}: {r}"
    if code >= 100:  # ours: a daemon bug (102) must not hide behind a fuzz case
        assert code != 102, f"{what}: internal error: {r}"
    assert owned(n) == before, f"{what}: the daemon's allocations changed: {r}"


def check(shim: Path, n: Node, kind: str, command: str | None,
          stdin: bytes | str | dict[str, Any], **env: Any) -> None:
    CASES[kind] += 1
    before = owned(n)
    r = run(shim, n, command, stdin, **env)
    assert_refused(n, r, before, f"{kind} {command!r} {str(stdin)[:200]!r} {env!r}")


# ---- strategies ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=15)
control = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=31), min_size=1,
                  max_size=3)


def valid_by_chance(obj: Any) -> bool:
    """Could this object be a config the daemon accepts?  (Then it is not a bad case.)"""
    return (isinstance(obj, dict) and obj.get("cniVersion") in VERSIONS
            and isinstance(obj.get("name"), str))


@st.composite
def wrong_types(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with one field made wrong: a type, an unsupported value, a subnet
    outside the range, an unknown ipam option."""
    cfg: dict[str, Any] = json.loads(json.dumps(VALID))
    field = draw(st.sampled_from(["cniVersion", "name", "ipam", "subnet", "unknown",
                                  "gateway", "routes", "dns", "ips"]))
    if field == "cniVersion":
        cfg["cniVersion"] = draw(json_values.filter(lambda v: v not in VERSIONS))
    elif field == "name":
        cfg["name"] = draw(json_values.filter(lambda v: not (
            isinstance(v, str) and v[:1].isascii() and v[:1].isalnum()
            and all(c.isascii() and (c.isalnum() or c in "_.-") for c in v))))
    elif field == "ipam":
        cfg["ipam"] = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    elif field == "subnet":
        cfg["ipam"]["subnet"] = draw(
            json_values.filter(lambda v: v is not None and not isinstance(v, str))
            | st.text(max_size=30)
            | st.sampled_from(["10.0.0.0/8", "192.168.0.0/24", "10.32.0.0/33", "fe80::/64",
                               "10.32.0.0/-1", "10.32.0.0", "0.0.0.0/0", "10.32.0.0/11"]))
        assume(cfg["ipam"]["subnet"] not in ("",) and not _is_subnet_in_range(
            cfg["ipam"]["subnet"]))
    elif field == "unknown":
        key = draw(st.text(min_size=1, max_size=10).filter(
            lambda k: k not in {"type", "subnet", "gateway", "routes", "dns"}))
        cfg["ipam"][key] = draw(json_values)
    elif field == "gateway":
        cfg["ipam"]["gateway"] = draw(
            json_values.filter(lambda v: v is not None and not isinstance(v, str))
            | st.sampled_from(["x", "10.32.0.1/99", "::1", "10.32.0.256"]))
    elif field == "routes":
        cfg["ipam"]["routes"] = draw(
            json_values.filter(lambda v: v is not None and not isinstance(v, list))
            | st.lists(json_values.filter(lambda v: not isinstance(v, dict)), min_size=1,
                       max_size=3)
            | st.just([{"dst": "not-a-cidr"}]) | st.just([{"dst": "0.0.0.0/0", "gw": "x"}]))
    elif field == "dns":
        cfg["ipam"]["dns"] = draw(
            json_values.filter(lambda v: v is not None and not isinstance(v, dict))
            | st.just({"nameservers": "10.0.0.1"}) | st.just({"nameservers": ["nope"]})
            | st.just({"domain": 5}))
    else:
        cfg["runtimeConfig"] = {"ips": draw(
            st.lists(st.text(max_size=20), min_size=1, max_size=3)
            | st.just(["192.168.0.1"]) | st.just(["10.32.0.0"]) | st.just(5))}
        assume(not any(isinstance(x, str) and _is_usable(x)
                       for x in (cfg["runtimeConfig"]["ips"]
                                 if isinstance(cfg["runtimeConfig"]["ips"], list) else [])))
    return cfg


def _is_subnet_in_range(v: Any) -> bool:
    import ipaddress
    if not isinstance(v, str):
        return False
    try:
        net = ipaddress.ip_network(v, strict=False)
    except ValueError:
        return False
    return isinstance(net, ipaddress.IPv4Network) and net.subnet_of(
        ipaddress.IPv4Network("10.32.0.0/12"))


def _is_usable(v: str) -> bool:
    import ipaddress
    try:
        a = ipaddress.ip_address(v)
    except ValueError:
        return False
    return a.version == 4 and a in ipaddress.ip_network("10.32.0.0/12")


# ---- tests -----------------------------------------------------------------------------------


@FUZZ
@given(value=json_values | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_random_stdin(shim: Path, node: Node, value: Any) -> None:
    assume(not valid_by_chance(value))
    stdin = value if isinstance(value, str) else json.dumps(value)
    check(shim, node, "random-stdin", "ADD", stdin)


@FUZZ
@given(data=st.data(), version=st.sampled_from(VERSIONS))
def test_truncated_and_mutated(shim: Path, node: Node, data: st.DataObject,
                               version: str) -> None:
    text = json.dumps({**VALID, "cniVersion": version})
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(text) - 1))
        stdin = text[:cut]
        kind = "truncated"
    else:
        raw = bytearray(text.encode())
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        try:
            assume(not valid_by_chance(json.loads(raw)))
        except ValueError:
            pass
        stdin = bytes(raw).decode("latin-1")
        kind = "mutated"
    check(shim, node, kind, "ADD", stdin.encode("latin-1"))


@FUZZ
@given(cfg=wrong_types())
def test_wrong_types(shim: Path, node: Node, cfg: dict[str, Any]) -> None:
    check(shim, node, "wrong-types", "ADD", cfg)


@pytest.mark.parametrize("size", [64 * 1024 + 1, 1024 * 1024 - 100, 1024 * 1024 + 1,
                                  3 * 1024 * 1024])
def test_huge_strings(shim: Path, node: Node, size: int) -> None:
    cfg = {**VALID, "name": "n" * size}
    check(shim, node, "huge", "ADD", cfg)
    cfg = {**VALID, "ipam": {"type": "weave-ipam", "subnet": "1" * size}}
    check(shim, node, "huge", "ADD", cfg)


@FUZZ
@given(command=st.none() | st.text(max_size=20).filter(lambda c: c not in COMMANDS))
def test_random_commands(shim: Path, node: Node, command: str | None) -> None:
    assume(command is None or "\x00" not in command)  # no NUL in an environment variable
    check(shim, node, "command", command, VALID)


odd_ids = (st.just("") | st.text(max_size=30).filter(
    lambda v: not (v[:1].isascii() and v[:1].isalnum()
                   and all(c.isascii() and (c.isalnum() or c in "_.-") for c in v)))
    | st.just("x" * 1025) | st.just("x" * 5000))
odd_ifnames = (st.just("") | st.sampled_from([".", "..", "eth/0", "eth:0", "eth 0", "x" * 16,
                                               "e\t0"])
               | st.text(min_size=16, max_size=40).filter(lambda v: v.strip() == v))
odd_netns = st.just("") | control.map(lambda c: "/var/run/netns/" + c)
junk_args = (st.text(min_size=1, max_size=20).filter(lambda t: "=" not in t and ";" not in t)
             .map(lambda t: "K8S_POD_NAME=p;" + t)
             | st.text(max_size=20).filter(lambda t: ";" not in t).map(lambda t: "=" + t)
             | st.sampled_from(["IP=nope", "IP=192.168.0.1", "IP=10.32.0.0/12", "IP=::1",
                                "IP=10.32.0.5,x"])
             | control.map(lambda c: "K8S_POD_NAME=" + c))


@FUZZ
@given(which=st.sampled_from(["container_id", "ifname", "netns", "args"]), data=st.data(),
       command=st.sampled_from(["ADD", "DEL", "CHECK"]))
def test_odd_environment(shim: Path, node: Node, which: str, data: st.DataObject,
                         command: str) -> None:
    strategy = {"container_id": odd_ids, "ifname": odd_ifnames, "netns": odd_netns,
                "args": junk_args}[which]
    value = data.draw(strategy)
    assume("\x00" not in value)
    if which == "netns" and command == "DEL":
        command = "ADD"  # DEL does not need CNI_NETNS
    if which == "args" and command != "ADD":
        command = "ADD"  # only ADD reads IP= from CNI_ARGS; a bad pair is caught anyway
    env: dict[str, Any] = {which: value}
    if value == "" and which != "args":
        env[which] = None if data.draw(st.booleans()) else ""
    check(shim, node, f"env-{which}", command, VALID, **env)


def test_valid_add_del_still_works(shim: Path, node: Node) -> None:
    before = owned(node)
    r = run(shim, node, "ADD", VALID, container_id="fuzz-final")
    assert r.rc == 0, r
    addrs = [ipc["address"] for ipc in r.json["ips"]]
    assert len(addrs) == 1 and addrs[0].startswith("10.")
    assert owned(node) != before
    r = run(shim, node, "DEL", VALID, container_id="fuzz-final")
    assert r.rc == 0, r
    assert owned(node) == before
    CASES["valid-add-del"] += 1
