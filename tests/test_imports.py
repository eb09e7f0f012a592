"""A daemon imports only what its configuration uses: every import is CPU at each start.

A real daemon runs in a subprocess with a probe thread beside it: once the daemon has
answered an allocation on its unix socket, the probe writes the process's `sys.modules`
and stops the daemon with SIGTERM.  Without --password no PyNaCl, without Kubernetes
mode no client library, and never aiohttp's HTTP client (the daemon sends no requests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemons import REPO, free_ports

PROBE = r"""
import json, os, signal, socket, sys, threading, time

sock_path, out_path = sys.argv[1], sys.argv[2]

def answer():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sock_path)
    s.sendall(b"POST /ip/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
              b"Connection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    return data.split(b"\r\n", 1)[0].decode()

def probe():
    deadline = time.monotonic() + 60
    status = "no answer"
    while time.monotonic() < deadline:
        try:
            status = answer()
            break
        except OSError:
            time.sleep(0.05)
    with open(out_path, "w") as f:
        json.dump({"status": status, "modules": sorted(sys.modules)}, f)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
from weaveipam.cli import main
sys.exit(main(sys.argv[3:]))
"""

# never needed without --password, Kubernetes mode or --pod-routes respectively; the
# HTTP client side of aiohttp never (the API and status servers are its server side)
PASSWORD_ONLY = {"nacl"}
KUBE_ONLY = {"lightkube", "httpx", "httpx2", "weaveipam.kube.client", "weaveipam.kube.mode",
             "weaveipam.kube.reconcile"}
ROUTES_ONLY = {"pyroute2", "weaveipam.routes"}
NEVER = {"aiohttp.client", "aiohttp.connector", "aiohttp.client_reqrep", "aiohttp.cookiejar"}


def _loaded(tmp_path: Path, *flags: str) -> set[str]:
    """The modules of a daemon started with `flags` that has answered one allocation."""
    out = tmp_path / "modules.json"
    sock = tmp_path / "api.sock"
    (peer_port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items()
           if k not in ("KUBERNETES_SERVICE_HOST", "WEAVE_PASSWORD", "PEERS", "IPALLOC_INIT",
                        "IPALLOC_RANGE", "WEAVEIPAM_SOCKET", "NODE_NAME")}
    env["PYTHONPATH"] = str(REPO)
    argv = ["daemon", "--ipalloc-init", "consensus=1", "--host", "127.0.0.1",
            "--port", str(peer_port), "--data-dir", str(tmp_path / "data"),
            "--socket", str(sock), "--http-addr", "", "--status-addr", "", *flags]
    proc = subprocess.run([sys.executable, "-c", PROBE, str(sock), str(out), *argv],
                          capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert out.exists(), f"the probe wrote nothing; daemon exited {proc.returncode}:\n" \
        + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["status"].endswith("200 OK"), (result["status"], proc.stderr[-3000:])
    return set(result["modules"])


def _present(modules: set[str], names: set[str]) -> list[str]:
    return sorted(m for m in modules if m in names or m.split(".")[0] in names)


def test_plain_daemon_imports_no_crypto_kube_routes_or_http_client(tmp_path: Path) -> None:
    modules = _loaded(tmp_path)
    assert "aiohttp.web" in modules  # the probe saw a daemon that serves its API
    assert not _present(modules, PASSWORD_ONLY | KUBE_ONLY | ROUTES_ONLY | NEVER)


def test_password_loads_the_crypto_library(tmp_path: Path) -> None:
    """The same check sees PyNaCl as soon as the configuration needs it."""
    modules = _loaded(tmp_path, "--password", "s3cret-for-the-import-test")
    assert "nacl.pwhash.argon2id" in modules  # the key is derived at start
    assert not _present(modules, KUBE_ONLY | NEVER)


def test_crypto_sizes_written_out_match_pynacl() -> None:
    """mesh.crypto spells out the algorithm sizes so that importing it loads no PyNaCl."""
    import nacl.pwhash.argon2id
    import nacl.secret

    from weaveipam.mesh import crypto

    assert crypto.MAC_LEN == nacl.secret.SecretBox.MACBYTES
    assert crypto.NONCE_LEN == nacl.secret.SecretBox.NONCE_SIZE
    assert crypto.SALT_LEN == nacl.pwhash.argon2id.SALTBYTES


@pytest.mark.parametrize("name", ["ClientSession", "TCPConnector"])
def test_aiohttp_client_still_available_after_the_server_import(name: str) -> None:
    """The deferred package __init__ runs on demand: the client works if asked for."""
    code = ("import sys; from weaveipam.cli import _import_aiohttp; _import_aiohttp(); "
            "assert 'aiohttp.client' not in sys.modules; import aiohttp; "
            f"print(aiohttp.{name}.__module__, aiohttp.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    module, version = proc.stdout.split()
    assert module.startswith("aiohttp.")
    assert version.count(".") >= 1
