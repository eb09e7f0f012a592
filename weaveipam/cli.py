"""`weaveipam`: the daemon, and client commands that talk to it over its unix socket.

Client commands use only the standard library (http.client over AF_UNIX) so they start
fast and work where aiohttp is not importable.  Exit codes: 0 success, 1 the daemon
refused (its reason is printed), 2 bad usage (nothing was sent), 3 no daemon reachable.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_RANGE = "10.32.0.0/12"
DEFAULT_DATA_DIR = ".weaveipam"


def _env(name: str, default: str | None = None) -> str | None:
    v = os.environ.get(name)
    return v if v is not None else default


def _die(msg: str, code: int = EXIT_REFUSED) -> NoReturn:
    print(f"weaveipam: {msg}", file=sys.stderr)
    raise SystemExit(code)


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

    def request(self, method: str, path: str, accept_json: bool = False) -> tuple[int, bytes]:
        """Raises OSError when no daemon answers."""
        c = self._conn()
        try:
            headers = {"Accept": "application/json"} if accept_json else {}
            c.request(method, path, headers=headers)
            r = c.getresponse()
            return r.status, r.read()
        except (http.client.HTTPException, ConnectionError) as e:
            raise OSError(str(e)) from e
        finally:
            c.close()

    def call(self, method: str, path: str, accept_json: bool = False) -> tuple[int, bytes]:
        """Like request, but exits with a clear message when the daemon is unreachable or
        refuses."""
        try:
            status, body = self.request(method, path, accept_json)
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
    import ipaddress

    ip, _, prefix = text.partition("/")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        _die(f"{text!r} is not an IP address", EXIT_USAGE)
    if prefix and not prefix.isdigit():
        _die(f"{text!r}: bad prefix length", EXIT_USAGE)
    return ip, prefix or None


def _client(args: argparse.Namespace) -> Client:
    sock = args.socket or _env("WEAVEIPAM_SOCKET")
    http = args.http or _env("WEAVEIPAM_HTTP")
    if not sock and not http:
        from .daemon import default_socket  # cheap: no aiohttp at import time

        data_dir = Path(args.data_dir or _env("WEAVEIPAM_DATA_DIR", DEFAULT_DATA_DIR) or ".")
        sock = str(default_socket(data_dir))
    return Client(sock, http)


def cmd_status(args: argparse.Namespace) -> int:
    c = _client(args)
    if args.json:
        _, body = c.call("GET", "/report")
        print(json.dumps(json.loads(body), indent=2))
        return EXIT_OK
    _, a = c.call("GET", "/status")
    _, b = c.call("GET", "/status/ipam")
    sys.stdout.write(a.decode() + "\n" + b.decode())
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    _, body = _client(args).call("GET", "/ip")
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
        ip, prefix = _ip_prefix(args.cidr)
        if prefix is None:
            _die(f"{args.cidr!r}: give a subnet with its prefix length, e.g. 10.32.1.0/24",
                 EXIT_USAGE)
        path += f"/{_q(ip)}/{prefix}"
    _, body = _client(args).call("POST", path)
    print(body.decode().strip())
    return EXIT_OK


def cmd_claim(args: argparse.Namespace) -> int:
    ident = _ident(args.id)
    ip, prefix = _ip_prefix(args.addr)
    if prefix is None:
        prefix = "32" if ":" not in ip else "128"
    _client(args).call("PUT", f"/ip/{_q(ident)}/{_q(ip)}/{prefix}")
    print(f"{ip} claimed for {ident}")
    return EXIT_OK


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
    name = args.name
    if not name or "/" in name:
        _die(f"bad peer name {name!r}", EXIT_USAGE)
    _, body = _client(args).call("DELETE", f"/peer/{_q(name)}")
    print(body.decode().strip())
    return EXIT_OK


def cmd_prime(args: argparse.Namespace) -> int:
    _, body = _client(args).call("GET", "/ring")
    print(body.decode().strip())
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
        print(f"no state in {data_dir}: nothing to discard")
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

    from .core.addr import CIDR, AddrError
    from .core.allocator import InitMode
    from .daemon import Config, Daemon, StartupError, parse_hostport
    from .names import check_name

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    password, second_password = _read_password(args)
    _check_peer_auth(args, password)  # a refusal here costs no aiohttp import
    _import_aiohttp()
    try:
        universe = CIDR.parse(args.ipalloc_range)
        default_subnet = (CIDR.parse(args.ipalloc_default_subnet)
                          if args.ipalloc_default_subnet else None)
    except AddrError as e:
        _die(f"{e} (host bits must be zero)", EXIT_USAGE)
    init_explicit = args.ipalloc_init is not None
    try:
        init = InitMode.parse(args.ipalloc_init or "consensus=1")
    except ValueError as e:
        _die(str(e), EXIT_USAGE)
    from .kube.config import KubeError, settings

    try:
        kube = settings(no_kube=args.no_kube, kubeconfig=args.kubeconfig,
                        node_name=args.node_name, address_type=args.kube_address_type)
    except KubeError as e:
        _die(str(e), EXIT_USAGE)
    peer_texts = list(args.peers) + list(args.peer or [])
    env_peers = _env("PEERS")
    if env_peers:
        peer_texts += env_peers.replace(",", " ").split()
    try:
        peers = [parse_hostport(p, 6783) for p in peer_texts]
        http_addr = parse_hostport(args.http_addr, 6784) if args.http_addr else None
        status_addr = parse_hostport(args.status_addr, 6782) if args.status_addr else None
    except ValueError as e:
        _die(str(e), EXIT_USAGE)
    if args.name and check_name(args.name):
        _die(f"--name {args.name!r}: {check_name(args.name)}", EXIT_USAGE)
    data_dir = Path(args.data_dir or args.db_prefix or _env("WEAVEIPAM_DATA_DIR")
                    or DEFAULT_DATA_DIR).absolute()
    cfg = Config(universe=universe, init=init, data_dir=data_dir, default_subnet=default_subnet,
                 peers=peers, host=args.host, port=args.port, conn_limit=args.conn_limit,
                 name=args.name or None, socket=Path(args.socket) if args.socket else None,
                 http_addr=http_addr, status_addr=status_addr, op_timeout=args.op_timeout,
                 password=password, second_password=second_password,
                 pod_routes=args.pod_routes, kube=kube, init_explicit=init_explicit)
    if args.nickname:
        cfg.nickname = args.nickname
    daemon = Daemon(cfg)
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


def _daemon_parser(sub: Any) -> None:
    p = sub.add_parser("daemon", help="run the IPAM daemon",
                       description="Run the IPAM daemon. PEER is HOST[:PORT] of another "
                       "daemon; peers are also read from --peer and PEERS.")
    p.add_argument("peers", nargs="*", metavar="PEER")
    p.add_argument("--peer", action="append", metavar="HOST[:PORT]")
    p.add_argument("--ipalloc-range", default=_env("IPALLOC_RANGE", DEFAULT_RANGE),
                   help="the whole cluster's range (IPALLOC_RANGE; default %(default)s)")
    p.add_argument("--ipalloc-default-subnet", default=_env("IPALLOC_DEFAULT_SUBNET"),
                   help="where a plain allocation lands (default: the whole range)")
    p.add_argument("--ipalloc-init", default=_env("IPALLOC_INIT"),
                   help="consensus=N | seed=NAME,... | observer (IPALLOC_INIT; default "
                   "consensus=1, or in Kubernetes mode at a first start consensus=the "
                   "number of Nodes)")
    p.add_argument("--port", type=int, default=int(_env("WEAVEIPAM_PORT", "6783") or 6783),
                   help="peer port (default %(default)s)")
    p.add_argument("--host", default=_env("WEAVEIPAM_HOST", "0.0.0.0"),
                   help="peer listen address (default %(default)s)")
    p.add_argument("--conn-limit", type=int, default=int(_env("CONN_LIMIT", "100") or 100))
    p.add_argument("--name", default=_env("WEAVEIPAM_NAME"),
                   help="peer name (default: derived once and kept in the data dir)")
    p.add_argument("--nickname", default=_env("WEAVEIPAM_NICKNAME"),
                   help="shown beside the name (default: host name)")
    p.add_argument("--data-dir", default=None,
                   help="state directory (WEAVEIPAM_DATA_DIR; default ./.weaveipam)")
    p.add_argument("--db-prefix", default=None, help="alias of --data-dir (Weave's flag)")
    p.add_argument("--socket", default=_env("WEAVEIPAM_SOCKET"),
                   help="API unix socket (default /run/weave-ipam/ipam.sock as root, "
                   "else DATA_DIR/ipam.sock)")
    p.add_argument("--http-addr", default=_env("WEAVEIPAM_HTTP_ADDR", "127.0.0.1:6784"),
                   help="API over TCP, Weave's port; empty disables (default %(default)s)")
    p.add_argument("--status-addr", default=_env("WEAVEIPAM_STATUS_ADDR", "127.0.0.1:6782"),
                   help="status and metrics; empty disables (default %(default)s)")
    p.add_argument("--password", default=_env("WEAVE_PASSWORD"),
                   help="shared secret: peers authenticate each other and encrypt all peer "
                   "traffic; every daemon needs the same one (WEAVE_PASSWORD; prefer "
                   "--password-file, command lines are visible to other users)")
    p.add_argument("--password-file", default=None,
                   help="read the password from this file's first line; an optional "
                   "second line is another password accepted from peers while rotating "
                   "(never used to dial)")
    p.add_argument("--insecure-peers", action="store_true",
                   help="allow running without a password in Kubernetes: anyone who "
                   "reaches the peer port can then join the mesh (WEAVEIPAM_INSECURE_PEERS=1)")
    p.add_argument("--op-timeout", type=float, default=30.0,
                   help="seconds an allocation may wait for consensus or space")
    p.add_argument("--pod-routes", action="store_true",
                   default=_env("WEAVEIPAM_POD_ROUTES", "") in ("1", "true", "yes"),
                   help="route every range another peer owns via that peer's node address "
                   "(for the routed `ptp` conflist; needs CAP_NET_ADMIN; "
                   "WEAVEIPAM_POD_ROUTES=true)")
    p.add_argument("--log-level", default=_env("WEAVEIPAM_LOG_LEVEL", "info"))
    k = p.add_argument_group("Kubernetes mode (on in a Pod, or with --kubeconfig)")
    k.add_argument("--kubeconfig", default=None,
                   help="talk to the API server with this kubeconfig instead of the Pod's "
                   "ServiceAccount")
    k.add_argument("--no-kube", action="store_true",
                   help="no Kubernetes mode even in a Pod")
    k.add_argument("--node-name", default=None,
                   help="this node's Node name (NODE_NAME, from the downward API)")
    k.add_argument("--kube-address-type", default=None,
                   choices=["InternalIP", "ExternalIP", "Hostname", "InternalDNS",
                            "ExternalDNS"],
                   help="the Node address peers are dialled at (default: InternalIP, "
                   "else ExternalIP)")
    p.set_defaults(func=cmd_daemon)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="weaveipam", description="Weave-Net-style distributed IPAM: the daemon, and "
        "client commands that talk to it over its unix socket (or --http).",
        epilog="Exit codes: 0 ok, 1 refused by the daemon, 2 bad usage, 3 no daemon.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", help="daemon socket (WEAVEIPAM_SOCKET)")
    common.add_argument("--http", help="daemon HTTP address instead of the socket, "
                        "e.g. 127.0.0.1:6784 (WEAVEIPAM_HTTP)")
    common.add_argument("--data-dir", help="data dir (for the default socket, and reset)")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _daemon_parser(sub)
    p = sub.add_parser("status", parents=[common], help="IPAM status, as `weave status ipam`")
    p.add_argument("--json", action="store_true", help="the full JSON report")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("ls", parents=[common], help="addresses allocated on this peer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("alloc", parents=[common], help="allocate an address for ID")
    p.add_argument("id", metavar="ID")
    p.add_argument("cidr", nargs="?", metavar="CIDR", help="subnet to allocate in")
    p.set_defaults(func=cmd_alloc)
    p = sub.add_parser("claim", parents=[common], help="claim ADDR for ID")
    p.add_argument("id", metavar="ID")
    p.add_argument("addr", metavar="ADDR")
    p.set_defaults(func=cmd_claim)
    p = sub.add_parser("release", parents=[common], help="release ID's addresses (or one)")
    p.add_argument("id", metavar="ID")
    p.add_argument("addr", nargs="?", metavar="ADDR")
    p.set_defaults(func=cmd_release)
    p = sub.add_parser("rmpeer", parents=[common], help="take over a dead peer's ranges")
    p.add_argument("name", metavar="NAME", help="peer name or nickname")
    p.set_defaults(func=cmd_rmpeer)
    p = sub.add_parser("prime", parents=[common], help="start consensus now")
    p.set_defaults(func=cmd_prime)
    p = sub.add_parser("reset", parents=[common],
                       help="hand this peer's ranges away and discard its state")
    p.add_argument("--force", action="store_true",
                   help="also when addresses are still allocated here (they are dropped)")
    p.set_defaults(func=cmd_reset)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        rc = 130
    return rc


def entry() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
