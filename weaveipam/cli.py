"""`weaveipam`: the daemon, and client commands that talk to it over its unix socket.

Client commands use only the standard library (http.client over AF_UNIX) so they start
fast and work where aiohttp is not importable.  Exit codes: 0 success, 1 the daemon
refused (its reason is printed), 2 bad usage (nothing was sent), 3 no daemon reachable.
Every value is checked before anything is sent or started, so a typo costs nothing.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import os
import re
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from . import __version__

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_CODES = "0 done, 1 refused by the daemon (the reason is printed), 2 bad usage (nothing " \
    "was sent), 3 no daemon answered"
DEFAULT_RANGE = "10.32.0.0/12"
DEFAULT_DATA_DIR = ".weaveipam"
LOG_LEVELS = ("debug", "info", "warning", "error")
# Weave's peer names are 48-bit MAC addresses; so are ours (derived ones look the same)
MAC_NAME_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def _env(name: str, default: str | None = None) -> str | None:
    v = os.environ.get(name)
    return v if v is not None else default


def _die(msg: str, code: int = EXIT_REFUSED) -> NoReturn:
    print(f"weaveipam: {msg}", file=sys.stderr)
    raise SystemExit(code)


# ---- values: one checker per kind, for the daemon's flags and the client's arguments -------
# Each returns the parsed value or raises ValueError with what is wrong and what to give;
# the caller names the flag and quotes the value once.

CIDR_EXAMPLE = "give a CIDR like 10.32.0.0/12 or fd00:32::/108"


def check_cidr(text: str, *, min_size: int = 1) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    ip, slash, prefix = text.strip().partition("/")
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        what = "not an IP address" if not slash else f"{ip} is not an IP address"
        raise ValueError(f"{what}; {CIDR_EXAMPLE}") from None
    if not slash:
        raise ValueError(f"no prefix length; {CIDR_EXAMPLE}")
    if not prefix.isdigit():
        raise ValueError(f"prefix length {prefix!r} is not a number")
    bits = addr.max_prefixlen
    if int(prefix) > bits:
        raise ValueError(f"/{int(prefix)} is longer than IPv{addr.version} allows "
                         f"(/{bits} at most)")
    try:
        net = ipaddress.ip_network(f"{ip}/{int(prefix)}", strict=True)
    except ValueError:
        net = ipaddress.ip_network(f"{ip}/{int(prefix)}", strict=False)
        raise ValueError(f"host bits are set: did you mean {net}?") from None
    if net.num_addresses < min_size:
        longest = bits - (min_size - 1).bit_length()
        raise ValueError(f"a /{net.prefixlen} holds only {net.num_addresses} "
                         f"address{'es' if net.num_addresses > 1 else ''}; give at least "
                         f"a /{longest}")
    return net


def check_port(text: str) -> int:
    """0 is allowed: the kernel picks one (for a peer that only dials out)."""
    if not text.strip().isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError("not a port: give a number from 1 to 65535 (0: any free one)")
    return int(text)


def check_host(text: str) -> str:
    t = text.strip()
    try:
        ipaddress.ip_address(t)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", t):
            raise ValueError("not an IP address or host name, e.g. 127.0.0.1 or "
                             "0.0.0.0") from None
    return t


def check_count(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError("not a whole number >= 0")
    return int(text)


def check_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise ValueError("give a number of seconds greater than 0, e.g. 30")
    return v


def check_level(text: str) -> str:
    if text.strip().lower() not in LOG_LEVELS:
        raise ValueError(f"use one of {', '.join(LOG_LEVELS)}")
    return text.strip().lower()


def check_mac_name(text: str) -> str:
    if not MAC_NAME_RE.match(text.strip()):
        raise ValueError("a peer name is 48-bit and MAC-like, as in Weave: six hex pairs "
                         "separated by colons, e.g. 02:00:00:00:00:01")
    return text.strip().lower()


def check_nickname(text: str) -> str:
    from .names import check_name

    why = check_name(text)
    if why:
        raise ValueError(why.replace("peer name", "a nickname"))
    return text


def check_data_dir(text: str) -> Path:
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise ValueError("exists and is not a directory; give a directory (it is created "
                         "if missing)")
    return p


def check_socket(text: str) -> str:
    n = len(os.fsencode(text))  # empty: the default
    if n > 107:  # sun_path holds 108 bytes with the terminating NUL
        raise ValueError(f"a unix socket path must be at most 107 bytes, this one is {n}: "
                         "choose a shorter one")
    return text


def _hostport(text: str, default_port: int) -> tuple[str, int]:
    """The daemon's parser, with its messages not quoting the value again."""
    from .daemon import parse_hostport

    try:
        return parse_hostport(text, default_port)
    except ValueError as e:
        raise ValueError(str(e).removeprefix(f"{text!r}: ")) from None


def check_hostport(default_port: int) -> Any:
    def check(text: str) -> tuple[str, int] | None:
        if not text.strip():
            return None  # empty: the server is disabled
        host, port = _hostport(text, default_port)
        check_host(host)
        return host, port
    return check


def check_peer(text: str) -> tuple[str, int]:
    host, port = _hostport(text, 6783)
    check_host(host)
    check_port(str(port))
    return host, port


def _arg(check: Any, env: str | None = None, keep_text: bool = False) -> Any:
    """An argparse type from a checker: its ValueError message becomes the usage error
    (saying so when the value came from the environment variable `env`).  With
    `keep_text` the value stays the text given, checked (as the daemon's args always were)."""
    def conv(text: str) -> Any:
        try:
            value = check(text)
            return text if keep_text else value
        except ValueError as e:
            where = f" (from {env})" if env and os.environ.get(env) == text else ""
            raise argparse.ArgumentTypeError(f"{text!r}{where}: {e}") from None
    conv.__name__ = getattr(check, "__name__", "value")
    return conv


# ---- client ------------------------------------------------------------------------------

class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over the daemon's unix socket (the CLI's and the tests' client)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class Client:
    """A tiny HTTP client for the daemon's local API (unix socket or --http)."""

    def __init__(self, socket_path: str | None, http: str | None, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.http = http
        self.timeout = timeout

    def where(self) -> str:
        return f"http://{self.http}" if self.http else f"socket {self.socket_path}"

    def _conn(self) -> http.client.HTTPConnection:
        if self.http:
            u = urllib.parse.urlsplit(self.http if "//" in self.http else f"http://{self.http}")
            return http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 6784,
                                              timeout=self.timeout)
        assert self.socket_path is not None
        return UnixHTTPConnection(self.socket_path, self.timeout)

    def reachable(self) -> bool:
        try:
            self.request("GET", "/healthz")
        except OSError:
            return False
        return True

    def request(self, method: str, path: str, accept_json: bool = False,
                form: list[tuple[str, str]] | None = None) -> tuple[int, bytes]:
        """Raises OSError when no daemon answers."""
        c = self._conn()
        try:
            headers = {"Accept": "application/json"} if accept_json else {}
            body = None
            if form is not None:
                body = urllib.parse.urlencode(form).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            return r.status, r.read()
        except (http.client.HTTPException, ConnectionError) as e:
            raise OSError(str(e)) from e
        finally:
            c.close()

    def call(self, method: str, path: str, accept_json: bool = False,
             form: list[tuple[str, str]] | None = None) -> tuple[int, bytes]:
        """Like request, but exits with a clear message when the daemon is unreachable or
        refuses."""
        try:
            status, body = self.request(method, path, accept_json, form)
        except OSError as e:
            _die(f"cannot reach the weaveipam daemon at {self.where()}: {e}; is it running? "
                 "(point at it with --socket, WEAVEIPAM_SOCKET or --http)", EXIT_UNREACHABLE)
        if status >= 400:
            text = body.decode(errors="replace").strip()
            if accept_json:
                try:
                    text = str(json.loads(text).get("message", text))
                except (ValueError, AttributeError):
                    pass
            _die(f"{text or 'error'} (HTTP {status})", EXIT_REFUSED)
        return status, body


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def _ident(s: str) -> str:
    if not s or "/" in s or not s.isprintable():
        _die(f"bad ID {s!r}: use a container id (printable, no '/')", EXIT_USAGE)
    return s


def _ip_prefix(text: str) -> tuple[str, str | None]:
    ip, _, prefix = text.partition("/")
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        _die(f"{text!r} is not an IP address", EXIT_USAGE)
    if prefix and (not prefix.isdigit() or int(prefix) > addr.max_prefixlen):
        _die(f"{text!r}: bad prefix length (IPv{addr.version} allows /0 to "
             f"/{addr.max_prefixlen})", EXIT_USAGE)
    return ip, prefix or None


def _client(args: argparse.Namespace) -> Client:
    sock = args.socket or _env("WEAVEIPAM_SOCKET")
    http = args.http or _env("WEAVEIPAM_HTTP")
    if http:  # checked here: a bad address is bad usage, not an unreachable daemon
        text = http.removeprefix("http://").rstrip("/")
        try:
            host, port = _hostport(text, 6784)
            check_host(host)
        except ValueError as e:
            src = "--http" if args.http else "WEAVEIPAM_HTTP"
            _die(f"{src} {http!r}: {e}", EXIT_USAGE)
        http = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not sock and not http:
        from .daemon import SOCKET_RECORD, default_socket  # cheap: no aiohttp imported

        given = args.data_dir or _env("WEAVEIPAM_DATA_DIR")
        data_dir = Path(given or DEFAULT_DATA_DIR)
        sock = str(default_socket(data_dir))
        if given:  # the socket of the daemon that runs on that data dir, wherever it is
            try:
                sock = (data_dir / SOCKET_RECORD).read_text().strip() or sock
            except OSError:
                pass
    return Client(sock, http)


CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def cmd_status(args: argparse.Namespace) -> int:
    c = _client(args)
    if args.json:
        _, body = c.call("GET", "/report")
        print(json.dumps(json.loads(body), indent=2))
        return EXIT_OK
    if not args.watch:
        _, once = c.call("GET", "/status?ipam=1")
        sys.stdout.write(once.decode())
        return EXIT_OK
    try:
        while True:  # like `watch weaveipam status`, and it keeps trying while down
            try:
                status, body = c.request("GET", "/status?ipam=1")
                text = body.decode(errors="replace")
                if status >= 400:
                    text = f"the daemon answered HTTP {status}: {text}"
            except OSError as e:
                text = f"cannot reach the weaveipam daemon at {c.where()}: {e}; retrying\n"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{CLEAR}Every {args.interval:g}s: weaveipam status{stamp:>38}"
                             f"\n\n{text}")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    """Until the daemon answers and can allocate: scripts start daemons, then `wait`."""
    c = _client(args)
    deadline = time.monotonic() + args.timeout
    why: str | None = None
    while True:
        try:
            status, body = c.request("GET", "/readyz")
        except OSError:
            status, body = 0, b""
        if status == 200:
            return EXIT_OK
        if status:
            why = body.decode(errors="replace").strip() or f"HTTP {status}"
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if why is None:
        _die(f"no weaveipam daemon answered at {c.where()} within {args.timeout:g}s; is it "
             "running? (point at it with --socket, WEAVEIPAM_SOCKET or --http)",
             EXIT_UNREACHABLE)
    _die(f"the daemon at {c.where()} is not ready after {args.timeout:g}s: {why}",
         EXIT_REFUSED)


def cmd_ls(args: argparse.Namespace) -> int:
    _, body = _client(args).call("GET", "/ip", accept_json=True)
    owned = json.loads(body)["owned"]
    if args.json:
        print(json.dumps(owned, indent=2))
        return EXIT_OK
    for o in owned:
        notes = " ".join(n for n in o.get("notes", []) if n)
        print(f"{o['containerid']}\t{' '.join(o['addrs'])}" + (f"\t{notes}" if notes else ""))
    return EXIT_OK


def cmd_alloc(args: argparse.Namespace) -> int:
    ident = _ident(args.id)
    path = f"/ip/{_q(ident)}"
    if args.cidr:
        try:
            net = check_cidr(args.cidr)
        except ValueError as e:
            _die(f"subnet {args.cidr!r}: {e}", EXIT_USAGE)
        path += f"/{_q(str(net.network_address))}/{net.prefixlen}"
    _, body = _client(args).call("POST", path, accept_json=True)
    print(json.loads(body)["address"])
    return EXIT_OK


def cmd_claim(args: argparse.Namespace) -> int:
    ident = _ident(args.id)
    ip, prefix = _ip_prefix(args.addr)
    c = _client(args)
    if prefix is None:  # the prefix kept with it: its default subnet's, else the range's
        prefix = _subnet_prefix(c, ip)
    c.call("PUT", f"/ip/{_q(ident)}/{_q(ip)}/{prefix}", accept_json=True)
    print(f"{ip} claimed for {ident}")
    return EXIT_OK


def _subnet_prefix(c: Client, ip: str) -> str:
    import ipaddress

    _, body = c.call("GET", "/ipinfo/defaultsubnet", accept_json=True)
    info = json.loads(body)
    addr = ipaddress.ip_address(ip)
    for cidr in (info["subnet"], info["range"]):
        net = ipaddress.ip_network(cidr)
        if addr.version == net.version and addr in net:
            return str(net.prefixlen)
    return str(addr.max_prefixlen)  # outside the range: the daemon says so


def cmd_release(args: argparse.Namespace) -> int:
    ident = _ident(args.id)
    path = f"/ip/{_q(ident)}"
    if args.addr:
        ip, _ = _ip_prefix(args.addr)
        path += f"/{_q(ip)}"
    _, body = _client(args).call("DELETE", path, accept_json=True)
    gone = json.loads(body).get("released", []) if body else []
    print(f"released {' '.join(gone) or 'nothing'} of {ident}")
    return EXIT_OK


def cmd_rmpeer(args: argparse.Namespace) -> int:
    """Several names: all are gone, so none is chosen as another's heir (two peers that
    are each other's heirs can only be removed together)."""
    names: list[str] = args.names
    for name in names:
        if not name or "/" in name or "," in name:
            _die(f"bad peer name {name!r}", EXIT_USAGE)
    c = _client(args)
    for name in names:
        others = [n for n in names if n != name]
        path = f"/peer/{_q(name)}" + (f"?gone={_q(','.join(others))}" if others else "")
        _rmpeer_one(c, name, path)
    return EXIT_OK


def _rmpeer_one(c: Client, name: str, path: str) -> None:
    _, body = c.call("DELETE", path, accept_json=True)
    res = json.loads(body)
    heir = str(res.get("heir", ""))
    _, rep = c.call("GET", "/report")  # the heir's nickname: the API keeps Weave's words
    nick = next((str(p.get("nickname") or "") for p in json.loads(rep).get("peers", [])
                 if p.get("name") == heir), "")
    heir = f"{heir}({nick})" if nick else heir
    if res.get("already"):
        print(f"0 IPs taken over from {res.get('peer', name)}: already removed, its ranges "
              f"went to {heir}")
    else:
        print(f"{res.get('moved', 0)} IPs taken over from {res.get('peer', name)} by {heir}")


PRIME_TEXT = {
    "ready": "the ring is established: this peer can allocate",
    "waiting-for-space": "the ring is established; this peer is waiting for free space",
    "rejoining": "this peer has a ring and waits to hear a peer's copy before allocating",
}


def cmd_prime(args: argparse.Namespace) -> int:
    """`GET /ring` answers once the ring exists (or, after --op-timeout, refuses with why):
    say what that means here rather than print the state's token."""
    c = _client(args)
    _, body = c.call("GET", "/ring", accept_json=True)
    state = str(json.loads(body).get("state", ""))
    text = PRIME_TEXT.get(state)
    if text is None:  # a state that needs the operator: the daemon's own advice says what
        _, rep = c.call("GET", "/report")
        text = str(json.loads(rep).get("advice") or state)
    print(text)
    return EXIT_OK


def _peer_form(peers: list[str]) -> list[tuple[str, str]]:
    for p in peers:
        try:
            check_peer(p)
        except ValueError as e:
            _die(f"{p!r}: {e} (give HOST or HOST:PORT)", EXIT_USAGE)
    return [("peer", p) for p in peers]


def cmd_connect(args: argparse.Namespace) -> int:
    """Weave's `weave connect [--replace] PEER...`: dial these peers, also after restarts."""
    form = _peer_form(args.peers)
    if args.replace:
        form.append(("replace", "true"))
    _, body = _client(args).call("POST", "/connect", accept_json=True, form=form)
    print("dialling: " + (" ".join(json.loads(body)["peers"]) or "no peers"))
    return EXIT_OK


def cmd_forget(args: argparse.Namespace) -> int:
    """Weave's `weave forget PEER...`: stop dialling them (connections up stay up)."""
    _, body = _client(args).call("POST", "/forget", accept_json=True,
                                 form=_peer_form(args.peers))
    print("dialling: " + (" ".join(json.loads(body)["peers"]) or "no peers"))
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    """Hand ranges away through a running daemon (which then discards its state and
    stops), or, with no daemon running, discard the store files in --data-dir."""
    c = _client(args)
    if c.reachable():
        force = "&force=true" if args.force else ""
        _, body = c.call("DELETE", f"/peer?forget=true{force}", accept_json=True)
        res = json.loads(body) if body else {}
        dropped = res.get("dropped", 0)
        print(f"handed {res.get('moved', 0)} IPs to other peers"
              + (f", dropped {dropped} allocations" if dropped else "")
              + "; the daemon is discarding its state and stopping")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and c.reachable():
            time.sleep(0.1)
        return EXIT_OK
    if not args.data_dir and not _env("WEAVEIPAM_DATA_DIR"):
        _die(f"no daemon answers at {c.where()}; to discard a stopped peer's state give "
             "its --data-dir", EXIT_UNREACHABLE)
    return _discard(Path(args.data_dir or _env("WEAVEIPAM_DATA_DIR") or DEFAULT_DATA_DIR),
                    args.force)


def _discard(data_dir: Path, force: bool) -> int:
    import fcntl

    from .daemon import LOCK_FILE, STORE_FILE
    from .store import StoreError, discard_files

    store = data_dir / STORE_FILE
    if not store.exists():
        # a -wal left without its store (the store moved aside after a crash) would be
        # replayed by sqlite into the next store created here: the old records back
        stale = [f for f in (Path(f"{store}-wal"), Path(f"{store}-shm")) if f.exists()]
        if not stale:
            print(f"no state in {data_dir}: nothing to discard")
            return EXIT_OK
        try:
            discard_files(store)
        except StoreError as e:
            _die(str(e))
        print(f"no {store}; discarded {', '.join(str(f) for f in stale)} left without it")
        return EXIT_OK
    lock = data_dir / LOCK_FILE
    if lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _die(f"a daemon is running on {data_dir} but does not answer at the given "
                 "socket; stop it first (or point --socket at it)", EXIT_REFUSED)
        finally:
            os.close(fd)
    try:
        if not force:
            held = _held_offline(store)
            if held:
                _die(f"{held} addresses are still recorded as allocated in {store}; their "
                     "pods may still use them. Release them first, or run `weaveipam reset "
                     "--force` once they are gone (the addresses may be handed out again)",
                     EXIT_REFUSED)
        discard_files(store)
    except StoreError as e:
        _die(str(e))
    print(f"discarded the state in {store}")
    return EXIT_OK


def _held_offline(store_path: Path) -> int:
    """Allocations recorded in a stopped daemon's store."""
    from .store import Store, StoreError

    try:
        s = Store(store_path)
    except StoreError:
        return 0  # not a usable store: nothing in it can be read, let alone held
    try:
        return sum(len(a) for a in s.load().allocations.values())
    except StoreError:
        return 0
    finally:
        s.close()


# ---- daemon ------------------------------------------------------------------------------

def cmd_daemon(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .core.addr import CIDR
    from .core.allocator import InitMode
    from .daemon import Config, StartupError
    from .names import default_nickname

    nickname = args.nickname or default_nickname()
    password, second_password = _read_password(args)
    init_explicit = args.ipalloc_init is not None
    try:
        init = InitMode.parse(args.ipalloc_init or "consensus=1")
    except ValueError as e:
        _die(str(e), EXIT_USAGE)
    universe = CIDR.parse(str(args.ipalloc_range))
    default_subnet = (CIDR.parse(str(args.ipalloc_default_subnet))
                      if args.ipalloc_default_subnet else None)
    if default_subnet is not None and not universe.contains_cidr(default_subnet):
        _die(f"--ipalloc-default-subnet {default_subnet} is not inside --ipalloc-range "
             f"{universe}", EXIT_USAGE)
    from .kube.config import KubeError, settings

    try:
        kube = settings(no_kube=args.no_kube, kubeconfig=args.kubeconfig,
                        node_name=args.node_name, address_type=args.kube_address_type)
    except KubeError as e:
        _die(str(e), EXIT_USAGE)
    pod_routes = args.pod_routes or _flag_env("WEAVEIPAM_POD_ROUTES")
    peers = [check_peer(p) for p in list(args.peers) + list(args.peer or [])]
    env_peers = _env("PEERS")
    if env_peers:
        for p in env_peers.replace(",", " ").split():
            try:
                peers.append(check_peer(p))
            except ValueError as e:
                _die(f"PEERS: {p!r}: {e}", EXIT_USAGE)
    http_addr = check_hostport(6784)(args.http_addr or "")
    status_addr = check_hostport(6782)(args.status_addr or "")
    # the nickname on every line: several daemons can share one terminal (the README's
    # 3-node example) and still be told apart
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s {nickname.replace('%', '%%')} %(levelname)s "
                        "%(name)s: %(message)s")
    _check_peer_auth(args, password)  # a refusal here costs no aiohttp import
    _import_aiohttp()
    from .server import make_daemon

    data_dir = Path(args.data_dir).absolute()
    cfg = Config(universe=universe, init=init, data_dir=data_dir, default_subnet=default_subnet,
                 peers=peers, host=args.host, port=args.port, conn_limit=args.conn_limit,
                 name=args.name or None, nickname=nickname,
                 socket=Path(args.socket) if args.socket else None,
                 http_addr=http_addr, status_addr=status_addr, op_timeout=args.op_timeout,
                 password=password, second_password=second_password,
                 pod_routes=pod_routes, kube=kube, init_explicit=init_explicit)
    daemon = make_daemon(cfg)
    factory: Any = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(daemon.run())
    except StartupError as e:
        _die(str(e), EXIT_REFUSED)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _import_aiohttp() -> None:
    """Import aiohttp's server side only, without loading the system CA bundle.

    aiohttp's package ``__init__`` imports its whole client (sessions, connectors, cookie
    jars: a fifth of the import) though the daemon makes no HTTP requests, and aiohttp
    builds two verifying TLS client contexts when imported, which parses every CA
    certificate (about 90 ms of CPU per daemon start here).  So the package is put in
    place with its ``__init__`` deferred until something asks it for a name that is not
    a submodule (``aiohttp.ClientSession``), then ``aiohttp.web`` is imported, with the CA
    bundle pointed at nothing.  tests/test_imports.py checks what a running daemon loaded.
    """
    if "aiohttp" not in sys.modules:
        _defer_package_init("aiohttp")
    before = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = os.devnull
    try:
        import aiohttp.web  # noqa: F401
    finally:
        if before is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = before


def _defer_package_init(package: str) -> None:
    """Register ``package`` so its submodules import without running its ``__init__``;
    the first lookup of any other name on it runs the ``__init__`` after all."""
    import importlib.util
    import re

    spec = importlib.util.find_spec(package)
    if spec is None or spec.loader is None or spec.origin is None:
        return  # not an installed package: the ordinary import reports it
    # aiohttp.http reads the package's __version__ for its Server header; read from the
    # source's assignment (importlib.metadata would cost more than the deferral saves)
    found = re.search(r'^__version__ = "([^"]+)"', Path(spec.origin).read_text(), re.M)
    if found is None:
        return  # laid out differently: the ordinary import it is
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader
    module.__dict__["__version__"] = found.group(1)

    def complete(name: str) -> Any:
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            raise AttributeError(name)  # a submodule: the import system loads it itself
        del module.__dict__["__getattr__"]
        loader.exec_module(module)
        return getattr(module, name)

    module.__dict__["__getattr__"] = complete
    sys.modules[package] = module


def _read_password(args: argparse.Namespace) -> tuple[bytes | None, bytes | None]:
    """(password, second password): --password-file (its first line is the password,
    an optional second line another one accepted from peers while rotating), else --password
    (whose default is WEAVE_PASSWORD), else none.  Only ever returned, never printed:
    error messages name the source, not the value."""
    if args.password_file:
        if args.password and args.password != _env("WEAVE_PASSWORD"):
            _die("give --password or --password-file, not both", EXIT_USAGE)
        try:
            data = Path(args.password_file).read_bytes()
        except OSError as e:
            _die(f"--password-file: cannot read {args.password_file}: {e.strerror}",
                 EXIT_USAGE)
        # a trailing newline from echo/editors is not part of a password
        lines = [line.rstrip(b"\r") for line in data.rstrip(b"\r\n").split(b"\n")]
        if not lines[0]:
            _die(f"--password-file {args.password_file} is empty (or its first line is): "
                 "its first line is the password", EXIT_USAGE)
        if len(lines) > 2 or (len(lines) == 2 and not lines[1]):
            _die(f"--password-file {args.password_file} has {len(lines)} lines: give the "
                 "password on the first line and, only while rotating, the other "
                 "accepted password on the second", EXIT_USAGE)
        if len(lines) == 2 and lines[0] == lines[1]:
            _die(f"--password-file {args.password_file}: the second password is "
                 "the same as the first: drop the second line", EXIT_USAGE)
        return lines[0], (lines[1] if len(lines) == 2 else None)
    if args.password is None:
        return None, None
    if not args.password:
        _die("--password (or WEAVE_PASSWORD) is empty", EXIT_USAGE)
    return str(args.password).encode(), None


def kubernetes_mode(args: argparse.Namespace) -> bool:
    """Whether this daemon runs in a Kubernetes cluster, where an unauthenticated peer
    port must be asked for explicitly.  In a pod, KUBERNETES_SERVICE_HOST is set."""
    return bool(_env("KUBERNETES_SERVICE_HOST"))


def _flag_env(name: str) -> bool:
    """A boolean environment variable: 1/true/yes or 0/false/no (or unset)."""
    v = (_env(name) or "").strip().lower()
    if v in ("", "0", "false", "no"):
        return False
    if v in ("1", "true", "yes"):
        return True
    _die(f"{name}={_env(name)!r}: use 1 or 0", EXIT_USAGE)


def _check_peer_auth(args: argparse.Namespace, password: bytes | None) -> None:
    """No password in Kubernetes is no start, unless --insecure-peers says so; without
    one the log warns at every start (anyone reaching the peer port could join)."""
    import logging

    insecure = args.insecure_peers or _flag_env("WEAVEIPAM_INSECURE_PEERS")
    if password is not None:
        if insecure:
            _die("--insecure-peers (or WEAVEIPAM_INSECURE_PEERS) and a password were both "
                 "given: drop --insecure-peers to authenticate peers with the password",
                 EXIT_USAGE)
        return
    if kubernetes_mode(args) and not insecure:
        _die("refusing to start in Kubernetes (KUBERNETES_SERVICE_HOST is set) without a "
             "peer password: anyone who reaches the peer port could join the mesh and "
             "rewrite the ring. Create the Secret once (kubectl -n kube-system create "
             "secret generic weave-ipam-password --from-literal=password=\"$(head -c 32 "
             "/dev/urandom | base64)\") and give its file with --password-file, as "
             "docker/weave-ipam-daemonset.yaml does; or, to run unauthenticated on purpose, "
             "add --insecure-peers (WEAVEIPAM_INSECURE_PEERS=1)", EXIT_USAGE)
    logging.getLogger("weaveipam").warning(
        "peer traffic is NOT authenticated or encrypted: anyone who can reach peer port "
        "%d can join the mesh, take address ranges and make two nodes hand out the same "
        "address; give every daemon the same --password-file", args.port)


def check_range(text: str) -> Any:
    return check_cidr(text, min_size=4)  # a /30: two usable addresses


def check_file(text: str) -> str:
    p = Path(text)
    if not p.is_file():
        raise ValueError("no such file" if not p.exists() else "not a file")
    if not os.access(p, os.R_OK):
        raise ValueError(f"this user (uid {os.geteuid()}) cannot read it")
    return text


# a Kubernetes object name (RFC 1123 subdomain), as `kubectl get nodes` shows it
NODE_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
KUBE_ADDRESS_TYPES = ("InternalIP", "ExternalIP", "Hostname", "InternalDNS", "ExternalDNS")


def check_node_name(text: str) -> str:
    if not NODE_NAME_RE.fullmatch(text):
        raise ValueError("not a Kubernetes Node name (lower-case letters, digits, '-' and "
                         "'.'): give the name `kubectl get nodes` shows")
    return text


def check_address_type(text: str) -> str:
    if text not in KUBE_ADDRESS_TYPES:
        raise ValueError(f"use one of {', '.join(KUBE_ADDRESS_TYPES)}")
    return text


@dataclass(frozen=True)
class Flag:
    """One daemon flag: the README's table is checked against this list (tests/test_cli)."""
    names: tuple[str, ...]
    env: str | None
    default: str | None  # as it would be typed; shown in --help
    help: str
    check: Any = None
    metavar: str | None = None
    action: str | None = None  # "append", or "store_true" (whose env cmd_daemon reads)
    # checked, but kept as the text given: cmd_daemon and callers parse these themselves
    keep_text: bool = True
    # the value stays None when not given: cmd_daemon decides (--ipalloc-init in Kubernetes)
    decided_at_start: bool = False
    group: str | None = None


KUBE_GROUP = "Kubernetes mode (on in a Pod, or with --kubeconfig)"

DAEMON_FLAGS = [
    Flag(("--ipalloc-range",), "IPALLOC_RANGE", DEFAULT_RANGE,
         "the whole cluster's range; IPv6 works (fd00:32::/108)", check_range, "CIDR"),
    Flag(("--ipalloc-default-subnet",), "IPALLOC_DEFAULT_SUBNET", None,
         "where a plain allocation lands (default: the whole range)", check_range, "CIDR"),
    Flag(("--ipalloc-init",), "IPALLOC_INIT", "consensus=1",
         "consensus=N, seed=NAME,... or observer; in Kubernetes mode a first start without "
         "it uses consensus=the number of Nodes", None, "MODE", decided_at_start=True),
    Flag(("--peer",), "PEERS", None, "HOST[:PORT] of another daemon (port 6783 by default); "
         "repeatable, as are the PEER arguments; PEERS is a space- or comma-separated list",
         check_peer, "HOST[:PORT]", "append"),
    Flag(("--port",), "WEAVEIPAM_PORT", "6783", "peer listen port", check_port, "PORT",
         keep_text=False),
    Flag(("--host",), "WEAVEIPAM_HOST", "0.0.0.0",
         "peer listen address; 127.0.0.1 keeps a try-out on one machine to itself",
         check_host, "ADDR"),
    Flag(("--conn-limit",), "CONN_LIMIT", "100",
         "peers learned through gossip are dialled up to this many connections",
         check_count, "N", keep_text=False),
    Flag(("--name",), "WEAVEIPAM_NAME", None,
         "peer name, 48-bit and MAC-like as in Weave, e.g. 02:00:00:00:00:01 (default: "
         "derived from the machine id and the data dir, and kept there)",
         check_mac_name, "NAME", keep_text=False),
    Flag(("--nickname",), "WEAVEIPAM_NICKNAME", None,
         "shown beside the name and at the start of every log line (default: the host name)",
         check_nickname, "NICK"),
    Flag(("--data-dir", "--db-prefix"), "WEAVEIPAM_DATA_DIR", DEFAULT_DATA_DIR,
         "durable state (--db-prefix is Weave's name for it)", check_data_dir, "DIR"),
    Flag(("--socket",), "WEAVEIPAM_SOCKET", None,
         "local API unix socket, mode 0600 (default: /run/weave-ipam/ipam.sock as root, "
         "else DIR/ipam.sock)", check_socket, "PATH"),
    Flag(("--http-addr",), "WEAVEIPAM_HTTP_ADDR", "127.0.0.1:6784",
         "local API over TCP, Weave's port; empty disables; warns if not loopback",
         check_hostport(6784), "HOST:PORT"),
    Flag(("--status-addr",), "WEAVEIPAM_STATUS_ADDR", "127.0.0.1:6782",
         "status page (GET /), /status, /report, /metrics, /healthz, /readyz; empty disables",
         check_hostport(6782), "HOST:PORT"),
    Flag(("--password",), "WEAVE_PASSWORD", None,
         "shared secret: peers authenticate each other and encrypt all peer traffic; every "
         "daemon needs the same one (prefer --password-file: command lines are visible to "
         "other users)", None, "SECRET"),
    Flag(("--password-file",), None, None,
         "read the password from this file's first line (a trailing newline is ignored); an "
         "optional second line is another password accepted from peers while rotating "
         "(never used to dial)", None, "FILE"),
    Flag(("--insecure-peers",), "WEAVEIPAM_INSECURE_PEERS", None,
         "allow running without a password in Kubernetes: anyone who reaches the peer port "
         "can then join the mesh", action="store_true"),
    Flag(("--op-timeout",), "WEAVEIPAM_OP_TIMEOUT", "30",
         "seconds an allocation may wait for consensus or space", check_seconds, "SECONDS",
         keep_text=False),
    Flag(("--pod-routes",), "WEAVEIPAM_POD_ROUTES", None,
         "route every range another peer owns via that peer's node address (for the routed "
         "`ptp` conflist; needs CAP_NET_ADMIN)", action="store_true"),
    Flag(("--log-level",), "WEAVEIPAM_LOG_LEVEL", "info", "debug, info, warning or error",
         check_level, "LEVEL", keep_text=False),
    Flag(("--kubeconfig",), None, None,
         "talk to the API server with this kubeconfig instead of the Pod's ServiceAccount",
         check_file, "FILE", group=KUBE_GROUP),
    Flag(("--no-kube",), None, None, "no Kubernetes mode even in a Pod",
         action="store_true", group=KUBE_GROUP),
    Flag(("--node-name",), "NODE_NAME", None,
         "this node's Node name (set NODE_NAME from the downward API, spec.nodeName)",
         check_node_name, "NODE", group=KUBE_GROUP),
    Flag(("--kube-address-type",), None, None,
         "the Node address peers are dialled at (default: InternalIP, else ExternalIP): "
         + ", ".join(KUBE_ADDRESS_TYPES), check_address_type, "TYPE", group=KUBE_GROUP),
]


def _daemon_parser(sub: Any) -> None:
    p = sub.add_parser(
        "daemon", help="run the IPAM daemon",
        description="Run the IPAM daemon. Every flag can also come from its environment "
        "variable (env); a flag given on the command line wins.",
        epilog=f"Exit codes: {EXIT_CODES}.")
    p.add_argument("peers", nargs="*", metavar="PEER", type=_arg(check_peer, keep_text=True),
                   help="HOST[:PORT] of another daemon (port 6783 by default); every node may "
                   "get the same list: its own address in it is recognised and skipped")
    groups: dict[str | None, Any] = {None: p}
    for f in DAEMON_FLAGS:
        if f.group not in groups:
            groups[f.group] = p.add_argument_group(f.group)
        env = ""
        if f.env:
            env = f" (env {f.env}=1)" if f.action == "store_true" else f" (env {f.env})"
        default = f"; default {f.default}" if f.default is not None else ""
        kw: dict[str, Any] = {"help": f"{f.help}{env}{default}".replace("%", "%%"),
                              "dest": f.names[0].lstrip("-").replace("-", "_")}
        if f.action != "store_true":
            kw["metavar"] = f.metavar
        if f.check is not None:
            kw["type"] = _arg(f.check, f.env, f.keep_text)
        if f.action:
            kw["action"] = f.action  # their variables are read by cmd_daemon
        elif f.decided_at_start:
            kw["default"] = _env(f.env) if f.env else None
        else:
            kw["default"] = _env(f.env, f.default) if f.env else f.default
        groups[f.group].add_argument(*f.names, **kw)
    p.set_defaults(func=cmd_daemon)


class _Parser(argparse.ArgumentParser):
    """Usage errors as `weaveipam: ...`, exit 2, like every other bad-usage case."""

    def error(self, message: str) -> NoReturn:
        _die(f"{message} (see `{self.prog} --help`)", EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="weaveipam", description="Weave-Net-style distributed IPAM: the daemon, and "
        "client commands that talk to it over its unix socket (or --http).",
        epilog=f"Exit codes: {EXIT_CODES}. `weaveipam COMMAND --help` for each command.")
    ap.add_argument("--version", action="version", version=f"weaveipam {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--socket", type=_arg(check_socket),
                        help="the daemon's unix socket (env WEAVEIPAM_SOCKET; "
                        "default: /run/weave-ipam/ipam.sock as root, else ./.weaveipam/"
                        "ipam.sock)")
    common.add_argument("--http", metavar="HOST:PORT", help="the daemon's API over TCP "
                        "instead of the socket, e.g. 127.0.0.1:6784 (env WEAVEIPAM_HTTP)")
    common.add_argument("--data-dir", metavar="DIR", help="find the daemon that runs on this "
                        "data dir; for reset, the state to discard (env WEAVEIPAM_DATA_DIR)")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                            parser_class=_Parser)
    _daemon_parser(sub)
    p = sub.add_parser("status", parents=[common], help="IPAM status, as `weave status ipam`")
    p.add_argument("--json", action="store_true", help="the full JSON report")
    p.add_argument("--watch", action="store_true", help="redraw every --interval seconds "
                   "until Ctrl-C")
    p.add_argument("--interval", type=_arg(check_seconds), default=1.0, metavar="SECONDS",
                   help="for --watch (default 1)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("wait", parents=[common], help="wait until the daemon answers and "
                       "can allocate (exit 0), or --timeout passes (exit 1 not ready, "
                       "3 no daemon)")
    p.add_argument("--timeout", type=_arg(check_seconds), default=30.0, metavar="SECONDS",
                   help="give up after this long (default 30)")
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("ls", parents=[common], help="addresses allocated on this peer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("alloc", parents=[common], help="allocate an address for ID")
    p.add_argument("id", metavar="ID")
    p.add_argument("cidr", nargs="?", metavar="CIDR", help="subnet to allocate in "
                   "(default: the daemon's default subnet)")
    p.set_defaults(func=cmd_alloc)
    p = sub.add_parser("claim", parents=[common], help="claim ADDR for ID")
    p.add_argument("id", metavar="ID")
    p.add_argument("addr", metavar="ADDR")
    p.set_defaults(func=cmd_claim)
    p = sub.add_parser("release", parents=[common], help="release ID's addresses (or one)")
    p.add_argument("id", metavar="ID")
    p.add_argument("addr", nargs="?", metavar="ADDR")
    p.set_defaults(func=cmd_release)
    p = sub.add_parser("rmpeer", parents=[common], help="take over dead peers' ranges")
    p.add_argument("names", metavar="NAME", nargs="+",
                   help="peer name or nickname; several: all are gone (removed together)")
    p.set_defaults(func=cmd_rmpeer)
    p = sub.add_parser("connect", parents=[common],
                       help="dial more peers, kept across restarts (weave connect)")
    p.add_argument("peers", nargs="+", metavar="HOST[:PORT]")
    p.add_argument("--replace", action="store_true", help="instead of the current peers")
    p.set_defaults(func=cmd_connect)
    p = sub.add_parser("forget", parents=[common],
                       help="stop dialling peers, also after restarts (weave forget)")
    p.add_argument("peers", nargs="+", metavar="HOST[:PORT]")
    p.set_defaults(func=cmd_forget)
    p = sub.add_parser("prime", parents=[common], help="start consensus now and wait for the ring "
                       "(weave prime)")
    p.set_defaults(func=cmd_prime)
    p = sub.add_parser("reset", parents=[common],
                       help="hand this peer's ranges away and discard its state")
    p.add_argument("--force", action="store_true",
                   help="also when addresses are still allocated here (they are dropped)")
    p.set_defaults(func=cmd_reset)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)  # `weaveipam` alone: what it can do
        return EXIT_USAGE
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        rc = 130
    return rc


def entry() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
