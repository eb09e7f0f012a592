"""A real container runtime for the CNI tests and benchmarks: a private containerd, `ctr run
--cni` with a busybox rootfs, each "node" in a network namespace of its own.

No tests here.  Isolation, because `ctr` always reads /opt/cni/bin and /etc/cni/net.d and
containerd keeps some state under /run/containerd whatever its config says:

- containerd runs with its own config, --root, --state and socket in a temp dir
  (`wictr-*`), in a private mount namespace where /run/containerd (shim sockets, runc's
  root) is a directory of that temp dir; its opt plugin's directory is there too.
- every `ctr` call runs in a private mount namespace where /opt/cni/bin and /etc/cni/net.d
  are the node's own directories (a directory missing on the host is made inside an overlay
  of its parent, so the host's dirs are never touched), and inside the node's network
  namespace: the bridge, the host ends of the veths, `net.ipv4.ip_forward` and any
  iptables rule a plugin adds live and die with that namespace.
- close() kills our tasks (the runtime's DEL runs for those started with --rm), stops
  containerd and its shims (by PID), removes runc's cgroups, the node namespaces and the
  temp dir, and puts the host's ip_forward back if anything changed it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from test_cni_support import REF, ip

PREFIX = "wictr"
CGROUP_ROOT = Path("/sys/fs/cgroup")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
BUSYBOX = Path("/bin/busybox")
PLUGINS = ("bridge", "ptp", "portmap", "loopback", "host-local")
NEEDED = {"containerd": "containerd", "ctr": "containerd",
          "containerd-shim-runc-v2": "containerd", "runc": "runc",
          "unshare": "util-linux", "ip": "iproute2"}


def _is_static(path: Path) -> bool:
    """An ELF file without a program interpreter (PT_INTERP): runs in an empty rootfs."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def runtime_missing() -> list[str]:
    """What this machine lacks to run the containerd tests, with the package to install."""
    out = []
    if os.geteuid() != 0:
        out.append("root (containerd, network namespaces, mounts)")
    for tool, pkg in NEEDED.items():
        if shutil.which(tool) is None:
            out.append(f"{tool} (apt-get install {pkg})")
    if not BUSYBOX.exists() or not _is_static(BUSYBOX):
        out.append(f"a static {BUSYBOX} (apt-get install busybox-static)")
    for plugin in PLUGINS:
        if not (REF / plugin).exists():
            out.append(f"{REF / plugin} (apt-get install containernetworking-plugins)")
    return out


def private_view(binds: list[tuple[Path, str]], scratch: Path) -> str:
    """A shell prologue for `unshare -m --propagation private sh -c`: bind each source over
    its target, then exec the command.  A target missing on the host is made in an overlay
    of its nearest existing ancestor, whose upper layer is in `scratch`."""
    lines = ["set -e"]
    for src, target in binds:
        t = Path(target)
        missing = next((p for p in reversed([t, *t.parents]) if not p.exists()), None)
        if missing is not None:
            base = missing.parent
            ov = Path(tempfile.mkdtemp(prefix="ov-", dir=scratch))
            (ov / "u").mkdir()
            (ov / "w").mkdir()
            opts = f"lowerdir={base},upperdir={ov / 'u'},workdir={ov / 'w'}"
            lines.append(f"mount -t overlay {PREFIX}-ov -o {shlex.quote(opts)} "
                         f"{shlex.quote(str(base))}")
            lines.append(f"mkdir -p {shlex.quote(str(t))}")
        lines.append(f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(t))}")
    lines.append('exec "$@"')
    return "\n".join(lines)


def busybox_rootfs(root: Path) -> Path:
    """/bin/busybox and a link per applet: enough for sh, ip, ping, arping, sleep."""
    bindir = root / "bin"
    bindir.mkdir(parents=True)
    shutil.copy2(BUSYBOX, bindir / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    for a in applets:
        if a != "busybox":
            (bindir / a).symlink_to("busybox")
    for d in ("proc", "sys", "dev", "etc", "tmp"):
        (root / d).mkdir()
    return root


class Node:
    """One node as the runtime sees it: a network namespace and its CNI directories."""

    def __init__(self, rt: Containerd, label: str, socket: Path, conflist: str,
                 ipam_plugin: Path) -> None:
        self.rt = rt
        self.netns = f"{PREFIX}-{label}-{rt.tag}"
        self.dir = rt.dir / f"node-{label}"
        self.cni_bin = self.dir / "bin"
        self.net_d = self.dir / "net.d"
        self.cni_bin.mkdir(parents=True)
        self.net_d.mkdir()
        for plugin in PLUGINS:
            (self.cni_bin / plugin).symlink_to(REF / plugin)
        (self.cni_bin / "weave-ipam").symlink_to(ipam_plugin.resolve())
        (self.net_d / "10-weave-ipam.conflist").write_text(conflist)
        self.socket = socket
        ip("netns", "add", self.netns)
        rt.netns.append(self.netns)

    def argv(self, *args: str) -> list[str]:
        script = private_view([(self.cni_bin, "/opt/cni/bin"),
                               (self.net_d, "/etc/cni/net.d")], self.rt.scratch)
        return ["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation",
                "private", "sh", "-c", script, "sh", "ctr", "--address", str(self.rt.sock),
                "--namespace", self.rt.ns, *args]

    def env(self) -> dict[str, str]:
        """containerd's CNI library passes ctr's environment on to the plugins."""
        return dict(os.environ, WEAVE_IPAM_SOCKET=str(self.socket))

    def ctr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=timeout, env=self.env())

    def run_args(self, cid: str, *cmd: str, cni: bool = True) -> list[str]:
        return ["run", "--rm", *(["--cni"] if cni else []), "--fifo-dir", str(self.rt.fifo),
                "--env", "PATH=/bin", "--rootfs", str(self.rt.rootfs), cid, *cmd]

    def start(self, cid: str, *cmd: str) -> subprocess.Popen[str]:
        """`ctr run --rm --cni` left running; kill() ends it and the runtime's DEL runs."""
        p = subprocess.Popen(self.argv(*self.run_args(cid, *cmd)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=self.env())
        self.rt.procs.append(p)
        return p

    def run(self, cid: str, *cmd: str, cni: bool = True, timeout: float = 60.0
            ) -> subprocess.CompletedProcess[str]:
        """`ctr run --rm`: the runtime's ADD before the task starts, its DEL after it ends."""
        return self.ctr(*self.run_args(cid, *cmd, cni=cni), timeout=timeout)

    def exec(self, cid: str, *cmd: str, timeout: float = 30.0
             ) -> subprocess.CompletedProcess[str]:
        return self.ctr("task", "exec", "--fifo-dir", str(self.rt.fifo),
                        "--exec-id", f"x{secrets.token_hex(4)}", cid, *cmd, timeout=timeout)

    def pod_addr(self, cid: str, proc: subprocess.Popen[str] | None = None,
                 timeout: float = 30.0) -> str:
        """The pod's eth0 address/prefix once the runtime has set it up."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"ctr run {cid} exited {proc.returncode}: "
                                     f"{proc.communicate()}")
            r = self.exec(cid, "/bin/ip", "-4", "-o", "addr", "show", "dev", "eth0")
            m = re.search(r"inet (\S+)", r.stdout)
            if m:
                return m.group(1)
            last = f"{r.stdout}{r.stderr}"
            time.sleep(0.1)
        raise AssertionError(f"pod {cid} has no eth0 address: {last.strip()}")

    def kill(self, cid: str) -> None:
        self.ctr("task", "kill", "--signal", "SIGKILL", cid)

    def host_addrs(self) -> set[str]:
        """The IPv4 addresses/prefixes the plugins put on the node's side (its namespace has
        nothing else): the bridge's, or the one on every `ptp` host veth."""
        out = ip("-n", self.netns, "-4", "-o", "addr", "show", "scope", "global", check=False)
        return set(re.findall(r"inet (\S+)", out))


class Containerd:
    """A private containerd; see the module docstring for what it keeps away from the host."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
        self.ns = f"{PREFIX}-{self.tag}"          # containerd namespace: runc's cgroup parent
        self.sock = self.dir / "c.sock"
        self.fifo = self.dir / "fifo"
        self.scratch = self.dir / "ov"
        self.rootfs = busybox_rootfs(self.dir / "rootfs")
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.forward_before = IP_FORWARD.read_text()
        for d in ("root", "state", "run", "opt", "fifo", "ov"):
            (self.dir / d).mkdir()
        self.config = self.dir / "config.toml"
        self.config.write_text(f"""version = 2
root = "{self.dir / 'root'}"
state = "{self.dir / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir / 'opt'}"
""")

    def start(self) -> None:
        script = private_view([(self.dir / "run", "/run/containerd")], self.scratch)
        log = (self.dir / "containerd.log").open("wb")
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                      script, "sh", "containerd", "--config",
                                      str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("containerd exited:\n" + self.log_tail())
            r = subprocess.run(["ctr", "--address", str(self.sock), "version"],
                               capture_output=True, timeout=30)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("containerd did not answer:\n" + self.log_tail())

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / "containerd.log").read_text(errors="replace")
                             .splitlines()[-n:])
        return ""

    def node(self, label: str, socket: Path, conflist: str, ipam_plugin: Path) -> Node:
        return Node(self, label, socket, conflist, ipam_plugin)

    def _ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Management calls that need no CNI (listing, killing, deleting)."""
        return subprocess.run(["ctr", "--address", str(self.sock), "--namespace", self.ns,
                               *args], capture_output=True, text=True, timeout=60)

    def _shim_pids(self) -> list[int]:
        """containerd's shims outlive it: ours are the ones given our socket."""
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (p / "cmdline").read_bytes().split(b"\0")
                if b"containerd-shim" in argv[0] and str(self.sock).encode() in argv:
                    pids.append(int(p.name))
        return pids

    def close(self) -> None:
        """Remove everything, whatever state the test left it in."""
        if self.proc is not None and self.proc.poll() is None:
            for cid in self._ctr("task", "ls", "-q").stdout.split():
                self._ctr("task", "kill", "--signal", "SIGKILL", cid)
        for p in self.procs:  # `ctr run --rm` ends with the runtime's DEL, then exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=20)
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            for cid in self._ctr("task", "ls", "-q").stdout.split():
                self._ctr("task", "delete", "--force", cid)
            for cid in self._ctr("container", "ls", "-q").stdout.split():
                self._ctr("container", "delete", cid)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self._shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._remove_cgroups()
        for name in self.netns:
            ip("netns", "del", name, check=False)
        if IP_FORWARD.read_text() != self.forward_before:
            IP_FORWARD.write_text(self.forward_before)
        self._unmount_under(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_cgroups(self) -> None:
        """runc makes /sys/fs/cgroup/<controller>/<our namespace>/<container>."""
        for top in CGROUP_ROOT.glob(f"*/{self.ns}"):
            for d in sorted((p for p in top.rglob("*") if p.is_dir()),
                            key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()

    @staticmethod
    def _unmount_under(root: Path) -> None:
        """Nothing should be mounted here on the host; never rm -rf across a mount."""
        mounts = [line.split()[4] for line in
                  Path("/proc/self/mountinfo").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)

    def leftovers(self) -> list[str]:
        """What close() should have removed and did not (checked by the tests)."""
        out = [f"cgroup {p}" for p in CGROUP_ROOT.glob(f"*/{self.ns}")]
        out += [f"netns {n}" for n in self.netns
                if Path(f"/run/netns/{n}").exists()]
        out += [f"shim pid {p}" for p in self._shim_pids()]
        if self.dir.exists():
            out.append(f"dir {self.dir}")
        if IP_FORWARD.read_text() != self.forward_before:
            out.append("net.ipv4.ip_forward changed")
        return out


@contextlib.contextmanager
def containerd() -> Iterator[Containerd]:
    rt = Containerd()
    try:
        rt.start()
        yield rt
    finally:
        rt.close()


def describe(r: subprocess.CompletedProcess[Any]) -> str:
    return f"rc={r.returncode} stdout={r.stdout!r} stderr={r.stderr!r}"
