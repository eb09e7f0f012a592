"""The README's shell blocks, run as written, so that they cannot rot.

Each block runs in bash in a temp dir that looks like an installed clone (the Makefile,
pyproject.toml, a current install stamp and the package), with the `weaveipam` script and
`python3` of this interpreter first on PATH and this checkout on PYTHONPATH.  The ports the
blocks name are used only when free; every daemon a block starts is in a process group of
our own and is killed by that group's id at the end, whatever happened.

Not run here: the simulator's block, whose two commands tests/test_sim.py runs in its own
way (the 1,000-node one takes most of a minute), and `make test` (it is this suite).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import REPO

README = REPO / "README.md"
PEER_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def sections() -> dict[str, list[tuple[str, str]]]:
    """README code blocks by `## ` section, as (language, text)."""
    out: dict[str, list[tuple[str, str]]] = {}
    section = ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```"):
            lang = line[3:].strip()
            j = lines.index("```", i + 1)
            out.setdefault(section, []).append((lang, "\n".join(lines[i + 1:j]) + "\n"))
            i = j
        i += 1
    return out


def require_free(ports: list[int]) -> None:
    busy = []
    for port in ports:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            busy.append(port)
        finally:
            s.close()
    if busy:
        pytest.fail(f"the README's blocks use ports {ports}, but {busy} are in use on this "
                    "machine (another daemon?): free them to run this test")


@pytest.fixture
def clone() -> Iterator[Path]:
    """A temp dir shaped like a clone after its first `make install`: the packages this
    test runs with are installed, so its install stamp is current and `make run` installs
    nothing (the test never runs pip)."""
    d = Path(tempfile.mkdtemp(prefix="wi-readme-"))
    try:
        for f in ("Makefile", "pyproject.toml"):
            shutil.copy2(REPO / f, d / f)
        (d / "build").mkdir()
        (d / "build" / ".installed-run").touch()
        (d / "weaveipam").symlink_to(REPO / "weaveipam")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("WEAVEIPAM_", "IPALLOC_")) and k not in ("PEERS", "MAKEFLAGS")}
    if shutil.which("curl") is None:
        pytest.fail("the README's blocks need curl (apt-get install curl)")
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '/usr/bin:/bin')}"
    e["PYTHONPATH"] = str(REPO)
    return e


@contextlib.contextmanager
def group(argv: list[str], cwd: Path, **kw: object) -> Iterator[subprocess.Popen[str]]:
    """A process in a new session: everything it starts is killed by the group id."""
    p = subprocess.Popen(argv, cwd=cwd, env=env(), text=True, start_new_session=True,
                         **kw)  # type: ignore[call-overload]
    try:
        yield p
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)  # our own child's group: every daemon it started
            try:
                p.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) of the live processes in our process group `pgid`, and of
    the children they have waited for (make's compileall)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ...
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / tick


def test_install_and_run_as_pasted(clone: Path) -> None:
    blocks = [b for lang, b in sections()["Install and run"] if lang == "sh"]
    run_block, client_block = blocks
    assert run_block.split("#")[0].strip() == "make run"
    require_free([6782, 6783, 6784])
    log = clone / "make-run.log"
    with open(log, "w") as logf, group(["bash", "-c", run_block], clone, stdout=logf,
                                       stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL) as make_run:
        t0 = time.monotonic()
        for line in client_block.splitlines():
            cmd, _, comment = line.partition("#")
            if not cmd.strip():
                continue
            r = subprocess.run(["bash", "-c", line], cwd=clone, env=env(), text=True,
                               capture_output=True, timeout=90)
            assert r.returncode == 0, (line, r.stdout, r.stderr, log.read_text())
            if cmd.strip().startswith("weaveipam wait"):
                print(f"`make run` answered {time.monotonic() - t0:.2f} s after it started, "
                      f"using {group_cpu_seconds(make_run.pid):.2f} CPU-seconds")
            said = re.search(r"\d+\.\d+\.\d+\.\d+/\d+", comment)
            if said:  # the README says what the line prints
                assert r.stdout.strip() == said.group(0), (line, r.stdout)
            if cmd.strip().startswith("weaveipam status"):
                assert r.stdout.count("Status: ready") == 1, r.stdout
        text = log.read_text()
    # installed nothing (the stamp is current), and the peer port is on loopback only
    assert "pip install" not in text, text
    assert "listening on 127.0.0.1:6783" in text, text


def _shape(text: str) -> list[str]:
    """Status output with what differs between runs (names, shares, ports) blanked."""
    out = []
    for line in text.strip("\n").splitlines():
        line = PEER_RE.sub("NAME", line)
        line = re.sub(r"\d+ IPs \(\d+\.\d% of total\)", "N IPs (P% of total)", line)
        line = re.sub(r"\b[A-C]{64}\b", "STRIP", line)
        line = re.sub(r"^(->|<-) 127\.0\.0\.1:\d+", "CONN", line)
        line = re.sub(r"\(node[23]\)", "(nodeX)", line)
        out.append(" ".join(line.split()))
    return out


def test_three_nodes_as_pasted(tmp_path: Path) -> None:
    blocks = sections()["A 3-node cluster on one machine"]
    (_, start), (_, printed), (_, stop) = blocks
    assert stop.strip() == "kill $(jobs -p)"
    require_free([p for i in (1, 2, 3) for p in (6790 + i, 6800 + i, 6810 + i)])
    with group(["bash", "-c", start + stop], tmp_path, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE) as p:
        out, err = p.communicate(timeout=180)  # a hang guard only
    assert p.returncode == 0, (out, err)
    lines = out.splitlines()
    assert all(re.fullmatch(r"10\.\d+\.\d+\.\d+/12", x) for x in lines[:3]), out
    assert len(set(lines[:3])) == 3, out
    assert _shape("\n".join(lines[3:])) == _shape(printed), out
    assert "Traceback" not in err, err
    # every daemon log line says which node wrote it
    logs = [x for x in err.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", x)]
    assert logs and all(re.match(r"\S+ \S+ node[123] (INFO|WARNING|ERROR)", x) for x in logs), err
    for i in (1, 2, 3):
        assert f"node{i} INFO weaveipam.daemon: stopped" in err, err


def test_make_installs_only_when_pyproject_changed(clone: Path) -> None:
    """`make run` and `make test` reinstall (which briefly removes the `weaveipam` script)
    only after pyproject.toml changed; `make run` never installs the test extra."""
    (clone / "build" / ".installed-test").touch()

    def dry(target: str) -> str:
        r = subprocess.run(["make", "-n", target], cwd=clone, env=env(), text=True,
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "pip install" not in dry("run") and "pip install" not in dry("install-test")
    later = time.time() + 5
    os.utime(clone / "pyproject.toml", (later, later))
    run_plan = dry("run")
    assert "pip install -q -e .\n" in run_plan and "[test]" not in run_plan, run_plan
    assert "pip install -q -e '.[test]'" in dry("install-test")
    assert "--host 127.0.0.1" in run_plan
