"""Parsing and validation of one CNI invocation: the CNI_* values and the network config.

Pure functions, no daemon: everything a request can get wrong is found here, before any
allocator call, so a bad input changes no state.  Errors are `CniError`s carrying the
spec's codes.  The shim forwards the CNI_* variables as percent-escaped `X-CNI-*` headers
(a header is absent when its variable is unset).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.addr import CIDR, AddrError, fmt
from ..kube.noderanges import KEYS as NODE_RANGE_KEYS
from ..kube.noderanges import NodeRangeSpec, parse_spec

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

# The spec's error codes, and ours (100+).
E_INCOMPATIBLE = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_NOT_AVAILABLE = 50
E_MISMATCH = 100   # CHECK: prevResult's address is not what the daemon holds for the key
E_CONFLICT = 101   # a static address is held by another container or owned by another peer
E_INTERNAL = 102   # a daemon bug; the daemon log says more
E_NO_NODE_RANGES = 103  # kube-node ranges asked for, but this node has none (or no Kubernetes)

# The variables the shim forwards, and their headers.
HEADERS = {"CNI_COMMAND": "X-CNI-Command", "CNI_CONTAINERID": "X-CNI-Containerid",
           "CNI_NETNS": "X-CNI-Netns", "CNI_IFNAME": "X-CNI-Ifname", "CNI_ARGS": "X-CNI-Args",
           "CNI_PATH": "X-CNI-Path"}

# libcni's own rules for names (ValidateContainerID, ValidateNetworkName)
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
_VERSION_RE = re.compile(r"[0-9a-z.+\-]{1,20}")
_PCT_RE = re.compile(rb"%([0-9A-Fa-f]{2})")
MAX_NAME = 128          # network name: leaves room in the 256-char allocator ident
MAX_CONTAINER_ID = 1024
MAX_IFNAME = 15         # IFNAMSIZ - 1
MAX_NOTE = 320          # namespace (63) / pod name (253)
MAX_STATIC = 16
IDENT_PREFIX = "cni:"
MAX_IDENT = 256
# Idents the daemon keeps for itself: no API or CNI caller may allocate, claim or release
# under them (CNI idents all start with IDENT_PREFIX; the API refuses these).
RESERVED_PREFIX = "weave:"
NODE_GATEWAY_IDENT = "weave:expose"     # this node's gateway (Weave's `weave expose` ident)
FIXED_GATEWAY_IDENT = "weave:gateway"   # explicit `ipam.gateway` addresses, held here


class CniError(Exception):
    """A CNI error result: printed on stdout as the spec's JSON, exit status non-zero."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


# ---- CNI_* values -------------------------------------------------------------------------

@dataclass(frozen=True)
class Env:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    path: str = ""


def decode_header(var: str, value: str) -> str:
    """Undo the shim's percent-escaping; anything that is not clean UTF-8 without control
    characters is an invalid variable (a direct HTTP client may send anything)."""
    if not value.isascii():
        raise CniError(E_INVALID_ENV, f"{var}: non-ASCII text must be percent-escaped")
    raw = value.encode("ascii")
    if b"%" in _PCT_RE.sub(b"", raw):
        raise CniError(E_INVALID_ENV, f"{var}: stray '%' in the escaped value")
    try:
        text = _PCT_RE.sub(lambda m: bytes([int(m.group(1), 16)]), raw).decode("utf-8")
    except UnicodeDecodeError:
        raise CniError(E_INVALID_ENV, f"{var} is not valid UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise CniError(E_INVALID_ENV, f"{var} contains a control character")
    return text


def env_from_headers(headers: Mapping[str, str]) -> dict[str, str | None]:
    """The CNI_* variables from the request headers; None where the variable was unset."""
    return {var: (decode_header(var, headers[h]) if h in headers else None)
            for var, h in HEADERS.items()}


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS `K=V;K=V` (Kubernetes: K8S_POD_NAMESPACE, K8S_POD_NAME, IgnoreUnknown)."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue  # a trailing ';' is harmless
        k, eq, v = pair.partition("=")
        if not eq or not k:
            raise CniError(E_INVALID_ENV, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        out[k] = v
    return out


def parse_env(raw: Mapping[str, str | None]) -> Env:
    """The variables a command needs, checked as libcni checks them (code 4)."""
    cmd = raw.get("CNI_COMMAND")
    if not cmd:
        raise CniError(E_INVALID_ENV, "CNI_COMMAND is not set",
                       f"expected one of {', '.join(COMMANDS)}")
    if cmd not in COMMANDS:
        raise CniError(E_INVALID_ENV, f"unknown CNI_COMMAND {cmd!r}",
                       f"expected one of {', '.join(COMMANDS)}")
    if cmd in ("VERSION", "STATUS", "GC"):
        return Env(cmd, path=raw.get("CNI_PATH") or "")
    need = ["CNI_CONTAINERID", "CNI_IFNAME"] + (["CNI_NETNS"] if cmd != "DEL" else [])
    missing = [v for v in need if not raw.get(v)]
    if missing:
        raise CniError(E_INVALID_ENV, f"{' and '.join(missing)} not set for {cmd}")
    cid = raw["CNI_CONTAINERID"] or ""
    if len(cid) > MAX_CONTAINER_ID or not _NAME_RE.fullmatch(cid):
        raise CniError(E_INVALID_ENV, f"CNI_CONTAINERID {cid[:80]!r} is invalid: it must start "
                       "with a letter or digit, then letters, digits, '_', '.' or '-'")
    ifname = raw["CNI_IFNAME"] or ""
    if (len(ifname) > MAX_IFNAME or ifname in (".", "..")
            or any(c in "/:" or c.isspace() for c in ifname)):
        raise CniError(E_INVALID_ENV, f"CNI_IFNAME {ifname[:80]!r} is not a valid interface "
                       f"name (at most {MAX_IFNAME} characters, not '.' or '..', no '/', ':' "
                       "or whitespace)")
    return Env(cmd, cid, raw.get("CNI_NETNS") or "", ifname,
               parse_args(raw.get("CNI_ARGS") or ""), raw.get("CNI_PATH") or "")


# ---- stdin --------------------------------------------------------------------------------

def peek_version(stdin: bytes) -> str:
    """The caller's cniVersion for answers, even when the rest of the input is bad."""
    try:
        obj = json.loads(stdin)
    except (ValueError, RecursionError):
        return CURRENT_VERSION
    v = obj.get("cniVersion") if isinstance(obj, dict) else None
    return v if isinstance(v, str) and _VERSION_RE.fullmatch(v) else CURRENT_VERSION


def decode_config(stdin: bytes) -> tuple[dict[str, Any], str]:
    """The network config object and its (supported) cniVersion."""
    try:
        obj = json.loads(stdin)
    except (ValueError, RecursionError) as e:
        raise CniError(E_DECODE, "the network configuration on stdin is not valid JSON",
                       str(e)[:300]) from None
    if not isinstance(obj, dict):
        raise CniError(E_DECODE, "the network configuration on stdin is not a JSON object")
    v = obj.get("cniVersion", "0.1.0")  # libcni's reading of a missing version
    if not isinstance(v, str):
        raise CniError(E_DECODE, "cniVersion is not a string")
    if v not in SUPPORTED_VERSIONS:
        raise CniError(E_INCOMPATIBLE, f"incompatible CNI version {v[:40]!r}",
                       f"weave-ipam supports {', '.join(SUPPORTED_VERSIONS)}")
    return obj, v


def version_at_least(v: str, minimum: str) -> bool:
    def key(s: str) -> tuple[int, ...]:
        return tuple(int(p) for p in s.split("."))
    return key(v) >= key(minimum)


def check_command_version(cmd: str, version: str) -> None:
    """CHECK is a 0.4.0 command, STATUS and GC are 1.1.0 ones (as libcni's skel)."""
    need = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}.get(cmd)
    if need and not version_at_least(version, need):
        raise CniError(E_INCOMPATIBLE, f"config version {version} does not allow {cmd}",
                       f"{cmd} needs cniVersion {need} or later")


@dataclass(frozen=True)
class NetConf:
    version: str
    name: str
    subnet: CIDR | None = None          # None: the daemon's default subnet
    gateway: int | None = None
    routes: tuple[dict[str, Any], ...] = ()
    dns: dict[str, Any] | None = None
    static: tuple[int, ...] = ()        # addresses to claim instead of allocating
    prev_ips: tuple[int, ...] | None = None       # CHECK: prevResult's addresses
    prev_all: tuple[tuple[int, int], ...] = ()    # CHECK: all of them, as (bits, address)
    attachments: frozenset[tuple[str, str]] | None = None  # GC: (containerID, ifname)
    wants_gateway: bool = False         # the plugin puts a gateway on the host side
    node: NodeRangeSpec | None = None   # kube-node ranges instead of the ring


IPAM_KEYS = {"type", "subnet", "gateway", "routes", "dns", *NODE_RANGE_KEYS}


def _bad(msg: str, details: str = "") -> CniError:
    return CniError(E_INVALID_CONFIG, msg, details)


def _addr(text: Any, what: str, universe: CIDR, code: int = E_INVALID_CONFIG) -> int:
    """An address of the range's family, with or without a /prefix (the prefix the result
    carries is the subnet's, as host-local does)."""
    if not isinstance(text, str):
        raise CniError(code, f"{what}: {text!r} is not an address string")
    try:
        ip = ipaddress.ip_interface(text.strip()).ip
    except ValueError:
        raise CniError(code, f"{what}: {text[:80]!r} is not an IP address") from None
    if ip.max_prefixlen != universe.bits:
        raise CniError(code, f"{what}: {text} is not of the range's family ({universe})")
    return int(ip)


def _check_route(r: Any, version: str) -> dict[str, Any]:
    if not isinstance(r, dict):
        raise _bad(f"ipam.routes: {r!r} is not an object like {{\"dst\": \"0.0.0.0/0\"}}")
    dst = r.get("dst")
    try:
        ipaddress.ip_network(dst if isinstance(dst, str) else "", strict=False)
    except ValueError:
        raise _bad(f"ipam.routes: dst {dst!r} is not a CIDR") from None
    out: dict[str, Any] = {"dst": dst}
    if r.get("gw") is not None:
        try:
            ipaddress.ip_address(r["gw"] if isinstance(r["gw"], str) else "")
        except ValueError:
            raise _bad(f"ipam.routes: gw {r['gw']!r} is not an IP address") from None
        out["gw"] = r["gw"]
    if version_at_least(version, "1.1.0"):  # 1.1's route attributes
        for k in ("mtu", "advmss", "priority", "table", "scope"):
            if k in r:
                if not isinstance(r[k], int) or isinstance(r[k], bool) or r[k] < 0:
                    raise _bad(f"ipam.routes: {k} {r[k]!r} is not a non-negative integer")
                out[k] = r[k]
    return out


def _check_dns(d: Any) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise _bad("ipam.dns is not an object like {\"nameservers\": [\"10.96.0.10\"]}")
    out: dict[str, Any] = {}
    for k in ("nameservers", "search", "options"):
        if k in d:
            v = d[k]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise _bad(f"ipam.dns.{k} is not a list of strings")
            out[k] = list(v)
    if "domain" in d:
        if not isinstance(d["domain"], str):
            raise _bad("ipam.dns.domain is not a string")
        out["domain"] = d["domain"]
    for ns in out.get("nameservers", []):
        try:
            ipaddress.ip_address(ns)
        except ValueError:
            raise _bad(f"ipam.dns.nameservers: {ns[:80]!r} is not an IP address") from None
    return out


def _static_list(v: Any, what: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _bad(f"{what} is not a list of addresses")
    return v


def _prev_ips(prev: Any, universe: CIDR) -> tuple[int, ...]:
    """prevResult's addresses in the range (a chain may carry other plugins' addresses)."""
    return tuple(a for b, a in _prev_all(prev) if b == universe.bits and a in universe)


def _prev_all(prev: Any) -> tuple[tuple[int, int], ...]:
    """prevResult's addresses as (bits, address)."""
    if not isinstance(prev, dict):
        raise _bad("prevResult is not an object")
    ips = prev.get("ips", [])
    if not isinstance(ips, list):
        raise _bad("prevResult.ips is not a list")
    out: list[tuple[int, int]] = []
    for ipc in ips:
        addr = ipc.get("address") if isinstance(ipc, dict) else None
        if not isinstance(addr, str):
            raise _bad(f"prevResult.ips: {ipc!r} has no address")
        try:
            ip = ipaddress.ip_interface(addr).ip
        except ValueError:
            raise _bad(f"prevResult.ips: {addr[:80]!r} is not an address/prefix") from None
        out.append((ip.max_prefixlen, int(ip)))
    return tuple(out)


def _attachments(obj: dict[str, Any]) -> frozenset[tuple[str, str]]:
    key = ("cni.dev/valid-attachments" if "cni.dev/valid-attachments" in obj
           else "cni.dev/attachments")
    if key not in obj:
        raise _bad("GC needs cni.dev/valid-attachments (the attachments to keep); refusing "
                   "to guess, as an empty list would free every address of the network")
    lst = obj[key]
    if not isinstance(lst, list):
        raise _bad(f"{key} is not a list")
    out: set[tuple[str, str]] = set()
    for a in lst:
        if not (isinstance(a, dict) and isinstance(a.get("containerID"), str)
                and isinstance(a.get("ifname"), str)):
            raise _bad(f"{key}: {str(a)[:120]} is not {{\"containerID\": ..., \"ifname\": ...}}")
        out.add((a["containerID"], a["ifname"]))
    return frozenset(out)


def parse_config(obj: dict[str, Any], version: str, env: Env, universe: CIDR,
                 default_subnet: CIDR) -> NetConf:
    """Validate the network config against the daemon's range (code 7, or 2 for an ipam
    option weave-ipam does not have, e.g. host-local's `ranges`).  DEL, CHECK and GC read
    only what they use."""
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _bad(f"network name {name!r} is missing or invalid: it must start with a "
                   "letter or digit, then letters, digits, '_', '.' or '-'")
    if len(name) > MAX_NAME:
        raise _bad(f"network name is over {MAX_NAME} characters")
    if env.command in ("DEL", "CHECK", "GC"):
        # only the key matters: a config edited since the ADD must never block the DEL
        # that frees the address (the runtime would retry it forever)
        prev: tuple[int, ...] | None = None
        prev_all: tuple[tuple[int, int], ...] = ()
        if env.command == "CHECK":
            if obj.get("prevResult") is None:
                raise _bad("CHECK needs prevResult (the result of the ADD being checked)")
            prev = _prev_ips(obj["prevResult"], universe)
            prev_all = _prev_all(obj["prevResult"])
        att = _attachments(obj) if env.command == "GC" else None
        return NetConf(version, name, prev_ips=prev, prev_all=prev_all, attachments=att)
    ipam = obj.get("ipam", {})
    if not isinstance(ipam, dict):
        raise _bad("ipam is not an object")
    unknown = sorted(set(ipam) - IPAM_KEYS)
    if unknown:
        k = unknown[0]
        raise CniError(E_UNSUPPORTED_FIELD, f"unsupported field ipam.{k}: "
                       f"{json.dumps(ipam[k])[:120]}",
                       f"weave-ipam understands ipam.{', ipam.'.join(sorted(IPAM_KEYS))}; "
                       "addresses come from the daemon's --ipalloc-range")
    try:
        node = parse_spec(ipam)
    except ValueError as e:
        if ipam.get("ranges", "podCIDRs") != "podCIDRs":  # e.g. host-local's ranges list
            raise CniError(E_UNSUPPORTED_FIELD, f"unsupported field {e}") from None
        raise _bad(str(e)) from None
    if node is not None:
        return _node_config(obj, version, name, ipam, env, node)
    subnet: CIDR | None = None
    if ipam.get("subnet") is not None:
        s = ipam["subnet"]
        if not isinstance(s, str):
            raise _bad("ipam.subnet is not a CIDR string")
        try:
            subnet = CIDR.parse(s)
        except AddrError as e:
            raise _bad(f"ipam.subnet: {e}") from None
        if not universe.contains_cidr(subnet):
            raise _bad(f"ipam.subnet {subnet} is not inside the allocation range {universe}")
    gateway = None
    if ipam.get("gateway") is not None:
        gateway = _addr(ipam["gateway"], "ipam.gateway", universe)
    routes = ipam.get("routes", [])
    if not isinstance(routes, list):
        raise _bad("ipam.routes is not a list")
    dns = _check_dns(ipam["dns"]) if ipam.get("dns") is not None else None

    static: list[int] = []
    rc = obj.get("runtimeConfig")
    if rc is not None and not isinstance(rc, dict):
        raise _bad("runtimeConfig is not an object")
    args = obj.get("args")
    cni_args = args.get("cni") if isinstance(args, dict) else None
    for what, lst in (("runtimeConfig.ips", (rc or {}).get("ips")),
                      ("args.cni.ips", cni_args.get("ips") if isinstance(cni_args, dict)
                       else None)):
        static += [_addr(t, what, universe) for t in _static_list(lst, what)]
    if env.args.get("IP"):
        static += [_addr(t, "CNI_ARGS IP", universe, E_INVALID_ENV)
                   for t in env.args["IP"].split(",") if t]
    static = list(dict.fromkeys(static))
    if len(static) > MAX_STATIC:
        raise _bad(f"more than {MAX_STATIC} static addresses")
    for a in static:
        home = subnet_of(a, subnet, universe, default_subnet)
        if (subnet is not None and a not in subnet) or a not in home.usable():
            raise _bad(f"static address {fmt(a, universe.bits)} is not a usable address of "
                       f"{'ipam.subnet ' if subnet else ''}{subnet or home}")
        if a == gateway:
            raise _bad(f"static address {fmt(a, universe.bits)} is the gateway")
    return NetConf(version, name, subnet, gateway,
                   tuple(_check_route(r, version) for r in routes), dns, tuple(static),
                   wants_gateway=gateway is not None or plugin_wants_gateway(obj))


def _node_config(obj: dict[str, Any], version: str, name: str, ipam: dict[str, Any],
                 env: Env, node: NodeRangeSpec) -> NetConf:
    """A kube-node network: addresses from this node's own ranges, whose gateway is each
    range's first address; the ring's subnet, gateway and static options do not apply."""
    for k in ("subnet", "gateway"):
        if ipam.get(k) is not None:
            raise _bad(f"ipam.{k} cannot be combined with ipam.{node.option()}: the "
                       "addresses come from the Node's ranges, and each range's first "
                       "address is its gateway; drop ipam." + k)
    rc = obj.get("runtimeConfig")
    args = obj.get("args")
    cni_args = args.get("cni") if isinstance(args, dict) else None
    if (isinstance(rc, dict) and rc.get("ips")) or env.args.get("IP") or (
            isinstance(cni_args, dict) and cni_args.get("ips")):
        raise _bad(f"static addresses (runtimeConfig.ips, args.cni.ips, CNI_ARGS IP) are not "
                   f"supported with ipam.{node.option()}; leave them out, or use a network "
                   "on the cluster range for pods that need a fixed address")
    routes = ipam.get("routes", [])
    if not isinstance(routes, list):
        raise _bad("ipam.routes is not a list")
    dns = _check_dns(ipam["dns"]) if ipam.get("dns") is not None else None
    return NetConf(version, name, routes=tuple(_check_route(r, version) for r in routes),
                   dns=dns, wants_gateway=plugin_wants_gateway(obj), node=node)


def plugin_wants_gateway(obj: Mapping[str, Any]) -> bool:
    """The calling plugin configures a gateway address on the host from the result: the
    reference `bridge` with isGateway (or isDefaultGateway, which implies it) puts it on the
    bridge, taking the subnet's first address when the result has none; `ptp` always puts
    it on each host-side veth."""
    kind = obj.get("type")
    if kind == "ptp":
        return True
    return kind == "bridge" and (obj.get("isGateway") is True
                                 or obj.get("isDefaultGateway") is True)


def reserved_ident(ident: str) -> str | None:
    """Why an API caller may not change allocations under `ident`, or None."""
    if not ident.startswith(RESERVED_PREFIX):
        return None
    return (f"identifier {ident[:80]!r} is reserved: the daemon holds its CNI gateways under "
            f"'{NODE_GATEWAY_IDENT}' and '{FIXED_GATEWAY_IDENT}' (see `weaveipam ls`); "
            f"choose an identifier not starting with '{RESERVED_PREFIX}'")


def node_gateway_ident(subnet: CIDR | None) -> str:
    """One gateway per node per subnet: the default subnet's under the plain ident."""
    return NODE_GATEWAY_IDENT if subnet is None else f"{NODE_GATEWAY_IDENT}:{subnet}"


def subnet_of(a: int, subnet: CIDR | None, universe: CIDR, default_subnet: CIDR) -> CIDR:
    """The subnet whose prefix an address carries in the result: the requested one, else
    the default subnet when it holds the address, else the whole range (as the API)."""
    if subnet is not None:
        return subnet
    return default_subnet if a in default_subnet else universe


# ---- allocator idents and notes --------------------------------------------------------------

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _esc(s: str) -> str:
    """Injective escaping: ':' never appears inside a field, so fields cannot run together."""
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode())
                   for c in s)


def ident_prefix(network: str) -> str:
    """Every ident of a network starts with this (GC frees within it, nowhere else)."""
    return f"{IDENT_PREFIX}{_esc(network)}:"


def ident_for(network: str, container_id: str, ifname: str) -> str:
    """The allocator's key for one attachment: (network, container, interface), so several
    interfaces and secondary (Multus) networks of a pod each hold their own address.
    Over-long keys become a digest ('#' never appears in an escaped container id)."""
    ident = f"{ident_prefix(network)}{_esc(container_id)}:{_esc(ifname)}"
    if len(ident) <= MAX_IDENT:
        return ident
    h = hashlib.sha256(f"{container_id}\0{ifname}".encode()).hexdigest()[:48]
    return f"{ident_prefix(network)}#{h}"


def pod_note(args: Mapping[str, str]) -> str:
    """`namespace/name` from Kubernetes' CNI_ARGS, shown by `weaveipam ls`; informative
    only, so odd characters are dropped rather than refused."""
    ns, pod = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
    note = f"{ns}/{pod}" if ns and pod else pod or ns
    return "".join(c for c in note if c.isprintable())[:MAX_NOTE]


# ---- results --------------------------------------------------------------------------------

def version_result(stdin: bytes) -> dict[str, Any]:
    return {"cniVersion": peek_version(stdin), "supportedVersions": list(SUPPORTED_VERSIONS)}


def add_result(conf: NetConf, addrs: list[tuple[int, int]], bits: int,
               gateway: int | None = None) -> dict[str, Any]:
    """The IPAM result in the caller's version: `version` on ips before 1.0.0.  Every
    address carries the same gateway: `bridge` puts gateway/prefix-of-the-address on the
    bridge (and refuses a second IPv4 address there), `ptp` puts gateway/32 on each host
    veth and routes the address's subnet via it."""
    return result_of(conf, [(a, prefix, bits, gateway) for a, prefix in addrs])


def result_of(conf: NetConf, addrs: list[tuple[int, int, int, int | None]]) -> dict[str, Any]:
    """The result for (address, prefix, bits, gateway) tuples, of either family."""
    old = not version_at_least(conf.version, "1.0.0")
    ips: list[dict[str, Any]] = []
    for a, prefix, bits, gateway in addrs:
        ipc: dict[str, Any] = {}
        if old:
            ipc["version"] = "4" if bits == 32 else "6"
        ipc["address"] = f"{fmt(a, bits)}/{prefix}"
        if gateway is not None:
            ipc["gateway"] = fmt(gateway, bits)
        ips.append(ipc)
    out: dict[str, Any] = {"cniVersion": conf.version, "ips": ips}
    if conf.routes:
        out["routes"] = [dict(r) for r in conf.routes]
    out["dns"] = dict(conf.dns or {})
    return out
