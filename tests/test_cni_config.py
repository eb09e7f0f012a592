"""The CNI parser and validator in-process: no daemon, no root."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weaveipam.cni.config import (
    MAX_IDENT,
    CniError,
    Env,
    add_result,
    check_command_version,
    decode_config,
    decode_header,
    env_from_headers,
    ident_for,
    ident_prefix,
    parse_args,
    parse_config,
    parse_env,
    peek_version,
    pod_note,
    version_result,
)
from weaveipam.core.addr import CIDR

U4 = CIDR.parse("198.18.0.0/16")
D4 = CIDR.parse("198.18.0.0/24")
U6 = CIDR.parse("fd00:32::/108")


def code_of(fn: Any, *a: Any, **kw: Any) -> int:
    with pytest.raises(CniError) as ei:
        fn(*a, **kw)
    return ei.value.code


ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/run/netns/x",
           "CNI_IFNAME": "eth0", "CNI_ARGS": None, "CNI_PATH": "/opt/cni/bin"}


def add_env(**kw: str | None) -> Env:
    return parse_env({**ADD_ENV, **kw})


def conf(cmd: str = "ADD", version: str = "1.0.0", env: Env | None = None,
         universe: CIDR = U4, default: CIDR = D4, **fields: Any) -> Any:
    obj = {"cniVersion": version, "name": "net1", "type": "bridge",
           "ipam": {"type": "weave-ipam"}, **fields}
    e = env or (add_env(CNI_COMMAND=cmd) if cmd in ("ADD", "DEL", "CHECK")
                else parse_env({"CNI_COMMAND": cmd}))
    return parse_config(obj, version, e, universe, default)


# ---- headers and CNI_* ----------------------------------------------------------------------

def test_decode_header() -> None:
    assert decode_header("V", "plain/value=1;x") == "plain/value=1;x"
    assert decode_header("V", "a%20b%25c%C3%B6") == "a b%cö"
    for bad in ("50%", "%zz", "%C3", "%FF", "%0A", "a%0Db", "ö", "%7F"):
        assert code_of(decode_header, "V", bad) == 4, bad


def test_env_from_headers_tells_unset_from_empty() -> None:
    env = env_from_headers({"X-CNI-Command": "DEL", "X-CNI-Netns": ""})
    assert env["CNI_COMMAND"] == "DEL" and env["CNI_NETNS"] == ""
    assert env["CNI_CONTAINERID"] is None


def test_parse_args() -> None:
    assert parse_args("") == {}
    assert parse_args("IgnoreUnknown=1;K8S_POD_NAME=a;IP=1.2.3.4;") == {
        "IgnoreUnknown": "1", "K8S_POD_NAME": "a", "IP": "1.2.3.4"}
    assert parse_args("K=a=b") == {"K": "a=b"}
    assert parse_args("K=") == {"K": ""}
    for bad in ("K", "=v", "a=1;b"):
        assert code_of(parse_args, bad) == 4, bad


def test_parse_env_requirements() -> None:
    assert parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"
    assert parse_env({"CNI_COMMAND": "GC"}).command == "GC"
    assert parse_env({"CNI_COMMAND": "STATUS"}).command == "STATUS"
    assert code_of(parse_env, {}) == 4
    assert code_of(parse_env, {"CNI_COMMAND": "add"}) == 4
    assert code_of(parse_env, {"CNI_COMMAND": "ADD"}) == 4
    for var in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"):
        assert code_of(parse_env, {**ADD_ENV, var: None}) == 4, var
        assert code_of(parse_env, {**ADD_ENV, var: ""}) == 4, var
        assert code_of(parse_env, {**ADD_ENV, "CNI_COMMAND": "CHECK", var: None}) == 4
    # DEL: the namespace may be gone
    e = parse_env({**ADD_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""})
    assert (e.container_id, e.ifname, e.netns) == ("abc123", "eth0", "")
    assert code_of(parse_env, {**ADD_ENV, "CNI_COMMAND": "DEL", "CNI_IFNAME": None}) == 4


@pytest.mark.parametrize("cid", ["-a", "_a", ".a", "a b", "a:b", "a/b", "", "ä", "x" * 1025])
def test_bad_container_ids(cid: str) -> None:
    assert code_of(parse_env, {**ADD_ENV, "CNI_CONTAINERID": cid}) == 4


@pytest.mark.parametrize("ifname", [".", "..", "a/b", "a:b", "a b", "x" * 16, "a\tb"])
def test_bad_ifnames(ifname: str) -> None:
    assert code_of(parse_env, {**ADD_ENV, "CNI_IFNAME": ifname}) == 4


def test_good_values() -> None:
    e = add_env(CNI_CONTAINERID="A0.b_c-d", CNI_IFNAME="net1.100",
                CNI_ARGS="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p")
    assert e.args["K8S_POD_NAME"] == "p"
    assert add_env(CNI_IFNAME="x" * 15).ifname == "x" * 15


# ---- stdin ------------------------------------------------------------------------------------

def test_decode_config() -> None:
    obj, v = decode_config(b'{"cniVersion": "0.3.1", "name": "n"}')
    assert v == "0.3.1" and obj["name"] == "n"
    assert code_of(decode_config, b"") == 6
    assert code_of(decode_config, b"{") == 6
    assert code_of(decode_config, b"[1]") == 6
    assert code_of(decode_config, b"\xff\xfe") == 6
    assert code_of(decode_config, b'{"cniVersion": 1}') == 6
    assert code_of(decode_config, b'{"name": "n"}') == 1  # missing: libcni's 0.1.0
    assert code_of(decode_config, b'{"cniVersion": "0.2.0"}') == 1
    assert code_of(decode_config, b'{"cniVersion": "2.0.0"}') == 1
    assert code_of(decode_config, b"[" * 100000) == 6


def test_peek_version() -> None:
    assert peek_version(b'{"cniVersion": "0.4.0", "name": 5}') == "0.4.0"
    assert peek_version(b"garbage") == "1.1.0"
    assert peek_version(b'{"cniVersion": "1.0.0\\", \\"x"}') == "1.1.0"
    assert version_result(b'{"cniVersion":"0.3.1"}') == {
        "cniVersion": "0.3.1", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0",
                                                     "1.1.0"]}


def test_command_versions() -> None:
    check_command_version("CHECK", "0.4.0")
    check_command_version("GC", "1.1.0")
    check_command_version("ADD", "0.3.0")
    assert code_of(check_command_version, "CHECK", "0.3.1") == 1
    assert code_of(check_command_version, "STATUS", "1.0.0") == 1
    assert code_of(check_command_version, "GC", "0.4.0") == 1


def test_network_name() -> None:
    for bad in (None, "", "a b", "-a", 5, "n" * 129):
        with pytest.raises(CniError) as ei:
            parse_config({"name": bad}, "1.0.0", add_env(), U4, D4)
        assert ei.value.code == 7
    with pytest.raises(CniError) as ei:
        parse_config({"name": "a:b"}, "1.0.0", add_env(CNI_COMMAND="DEL"), U4, D4)
    assert ei.value.code == 7


def test_ipam_options() -> None:
    c = conf(ipam={"type": "weave-ipam", "subnet": "198.18.5.0/24",
                   "gateway": "198.18.5.1", "routes": [{"dst": "0.0.0.0/0"},
                                                       {"dst": "10.0.0.0/8",
                                                        "gw": "198.18.5.254"}],
                   "dns": {"nameservers": ["198.18.0.53"], "domain": "x",
                           "search": ["a"], "options": ["ndots:5"], "other": 1}})
    assert str(c.subnet) == "198.18.5.0/24" and c.gateway == int.from_bytes(
        bytes([198, 18, 5, 1]), "big")
    assert c.routes == ({"dst": "0.0.0.0/0"}, {"dst": "10.0.0.0/8", "gw": "198.18.5.254"})
    assert c.dns == {"nameservers": ["198.18.0.53"], "domain": "x", "search": ["a"],
                     "options": ["ndots:5"]}
    assert conf().subnet is None and conf().gateway is None
    assert conf(ipam={"type": "weave-ipam", "subnet": None}).subnet is None


@pytest.mark.parametrize("ipam,code", [
    ({"ranges": []}, 2),
    ({"rangeStart": "198.18.0.5"}, 2),
    ({"subnet": "10.0.0.0/8"}, 7),            # outside the range
    ({"subnet": "198.0.0.0/8"}, 7),           # larger than the range
    ({"subnet": "198.18.0.1/24"}, 7),         # host bits
    ({"subnet": "fd00::/64"}, 7),             # other family
    ({"subnet": 5}, 7),
    ({"subnet": "nonsense"}, 7),
    ({"gateway": "fd00::1"}, 7),
    ({"gateway": "x"}, 7),
    ({"routes": {"dst": "0.0.0.0/0"}}, 7),
    ({"routes": [{"gw": "1.2.3.4"}]}, 7),
    ({"routes": [{"dst": "0.0.0.0/0", "gw": "x"}]}, 7),
    ({"routes": ["0.0.0.0/0"]}, 7),
    ({"dns": []}, 7),
    ({"dns": {"nameservers": "1.1.1.1"}}, 7),
    ({"dns": {"nameservers": ["x"]}}, 7),
    ({"dns": {"domain": 5}}, 7),
])
def test_bad_ipam(ipam: dict[str, Any], code: int) -> None:
    assert code_of(conf, ipam={"type": "weave-ipam", **ipam}) == code


def test_ipam_must_be_an_object() -> None:
    assert code_of(conf, ipam=[]) == 7
    assert code_of(conf, runtimeConfig=[]) == 7


def test_route_attributes_by_version() -> None:
    r = {"dst": "0.0.0.0/0", "mtu": 1400, "table": 100, "scope": 0}
    assert conf(version="1.1.0", ipam={"routes": [r]}).routes == (r,)
    assert conf(version="1.0.0", ipam={"routes": [r]}).routes == ({"dst": "0.0.0.0/0"},)
    assert code_of(conf, version="1.1.0", ipam={"routes": [{**r, "mtu": -1}]}) == 7
    assert code_of(conf, version="1.1.0", ipam={"routes": [{**r, "mtu": True}]}) == 7


def a4(text: str) -> int:
    return int.from_bytes(bytes(int(x) for x in text.split(".")), "big")


def test_static_addresses_from_every_source() -> None:
    c = conf(env=add_env(CNI_ARGS="IgnoreUnknown=1;IP=198.18.0.7,198.18.0.8/24"),
             runtimeConfig={"ips": ["198.18.0.5/24"]},
             args={"cni": {"ips": ["198.18.0.6", "198.18.0.5"]}})
    assert c.static == (a4("198.18.0.5"), a4("198.18.0.6"), a4("198.18.0.7"),
                        a4("198.18.0.8"))
    # outside the default subnet but inside the range: allowed, carries the range's prefix
    assert conf(runtimeConfig={"ips": ["198.18.9.9"]}).static == (a4("198.18.9.9"),)


@pytest.mark.parametrize("fields,code", [
    ({"runtimeConfig": {"ips": "198.18.0.5"}}, 7),
    ({"runtimeConfig": {"ips": [5]}}, 7),
    ({"runtimeConfig": {"ips": ["10.1.1.1"]}}, 7),             # outside the range
    ({"runtimeConfig": {"ips": ["198.18.0.0"]}}, 7),           # the network address
    ({"runtimeConfig": {"ips": ["198.18.0.255/24"]}}, 7),      # the broadcast address
    ({"runtimeConfig": {"ips": ["fd00::5"]}}, 7),
    ({"args": {"cni": {"ips": ["x"]}}}, 7),
    ({"runtimeConfig": {"ips": ["198.18.0.1"]},
      "ipam": {"gateway": "198.18.0.1"}}, 7),                   # the gateway
    ({"runtimeConfig": {"ips": ["198.18.0.9"]},
      "ipam": {"subnet": "198.18.1.0/24"}}, 7),                 # outside ipam.subnet
    ({"runtimeConfig": {"ips": [f"198.18.0.{i}" for i in range(1, 20)]}}, 7),
])
def test_bad_static(fields: dict[str, Any], code: int) -> None:
    assert code_of(conf, **fields) == code


def test_bad_static_from_cni_args() -> None:
    assert code_of(conf, env=add_env(CNI_ARGS="IP=nonsense")) == 4  # not an address
    assert code_of(conf, env=add_env(CNI_ARGS="IP=fd00::1")) == 4
    assert code_of(conf, env=add_env(CNI_ARGS="IP=10.0.0.1")) == 7  # outside the range


def test_del_reads_only_the_key() -> None:
    c = conf("DEL", ipam={"type": "weave-ipam", "subnet": "10.0.0.0/8", "ranges": 1},
             runtimeConfig=5)
    assert c.name == "net1" and c.subnet is None and c.static == ()


def test_check_prev_result() -> None:
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.5/24"},
                                          {"address": "10.1.1.1/8"},
                                          {"address": "fd00::1/64"}]}
    c = conf("CHECK", prevResult=prev)
    assert c.prev_ips == (a4("198.18.0.5"),)  # only addresses of our range
    assert code_of(conf, "CHECK") == 7
    assert code_of(conf, "CHECK", prevResult={"ips": [{"address": "bad"}]}) == 7
    assert code_of(conf, "CHECK", prevResult={"ips": [{}]}) == 7
    assert code_of(conf, "CHECK", prevResult={"ips": {}}) == 7
    assert code_of(conf, "CHECK", prevResult=[]) == 7


def gc_conf(key: str = "cni.dev/valid-attachments", value: Any = None) -> Any:
    fields: dict[str, Any] = {} if value is None else {key: value}
    return conf("GC", version="1.1.0", **fields)


def test_gc_attachments() -> None:
    att = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]
    assert gc_conf(value=att).attachments == frozenset({("a", "eth0"), ("b", "net1")})
    assert gc_conf("cni.dev/attachments", att[:1]).attachments == frozenset({("a", "eth0")})
    assert gc_conf(value=[]).attachments == frozenset()
    assert code_of(gc_conf) == 7
    assert code_of(gc_conf, value={}) == 7
    assert code_of(gc_conf, value=[{"containerID": "a"}]) == 7


# ---- idents, notes, results -------------------------------------------------------------------

def test_ident() -> None:
    assert ident_for("net1", "abc", "eth0") == "cni:net1:abc:eth0"
    assert ident_for("n", "c", "a%b") == "cni:n:c:a%25b"
    assert ident_for("n", "c", "ä") == "cni:n:c:%C3%A4"
    long = ident_for("n" * 128, "c" * 1024, "eth0")
    assert len(long) <= MAX_IDENT and long.startswith(ident_prefix("n" * 128) + "#")
    assert long != ident_for("n" * 128, "c" * 1024, "eth1")
    assert not ident_for("net1", "x", "y").startswith(ident_prefix("net"))


_nets = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,127}", fullmatch=True)  # as validated
_any = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1,
               max_size=300)


@given(_nets, _any, _nets, _any)
def test_ident_is_injective_printable_and_bounded(n1: str, c1: str, n2: str, c2: str) -> None:
    i1 = ident_for(n1, c1, "eth0")
    assert len(i1) <= MAX_IDENT and i1.isprintable() and i1.startswith(ident_prefix(n1))
    if (n1, c1) != (n2, c2):
        assert i1 != ident_for(n2, c2, "eth0")


def test_pod_note() -> None:
    assert pod_note({"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-1"}) == \
        "default/web-1"
    assert pod_note({"K8S_POD_NAME": "web-1"}) == "web-1"
    assert pod_note({}) == ""
    assert pod_note({"K8S_POD_NAME": "a\u2028b" + "x" * 400}).startswith("abx")
    assert len(pod_note({"K8S_POD_NAME": "x" * 400})) == 320


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_result_shapes(version: str) -> None:
    c = conf(version=version, ipam={"gateway": "198.18.0.1", "routes": [{"dst": "0.0.0.0/0"}]})
    assert c.wants_gateway
    r = add_result(c, [(a4("198.18.0.5"), 24)], 32, c.gateway)
    ipc: dict[str, Any] = {"address": "198.18.0.5/24", "gateway": "198.18.0.1"}
    if version < "1.0.0":
        ipc = {"version": "4", **ipc}
    assert r == {"cniVersion": version, "ips": [ipc], "routes": [{"dst": "0.0.0.0/0"}],
                 "dns": {}}
    json.dumps(r)


def test_add_result_v6() -> None:
    c = conf(version="0.4.0", universe=U6, default=U6)
    r = add_result(c, [(int.from_bytes(bytes.fromhex("fd000032" + "0" * 23 + "5"), "big"),
                        108)], 128)
    assert r["ips"] == [{"version": "6", "address": "fd00:32::5/108"}]
    assert "routes" not in r
