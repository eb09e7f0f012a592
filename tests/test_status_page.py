"""The live status page in a real browser: Debian's chromium, headless, via Playwright,
against real daemons."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import Cluster, cluster, wait_for  # noqa: F401

__all__ = ["cluster"]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = []
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        missing.append(f"Debian's chromium ({CHROMIUM}: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("playwright (pip install playwright; never `playwright install`)")
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail("the status page test needs " + " and ".join(missing))
        pytest.skip("needs " + " and ".join(missing))
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def _arcs(page: Any) -> list[dict[str, str]]:
    result: list[dict[str, str]] = page.eval_on_selector_all(
        "#ring path.arc", "ps => ps.map(p => ({peer: p.dataset.peer, token: p.dataset.token,"
        " sweep: p.dataset.sweep, hatched: p.dataset.hatched, fill: p.getAttribute('fill'),"
        " me: p.classList.contains('me')}))")
    return result


def _updates(page: Any) -> int:
    return int(page.evaluate("Number(document.body.dataset.updates || 0)"))


def test_status_page_shows_the_ring_live(cluster: Cluster, browser: Any,
                                         tmp_path: Path) -> None:
    nodes = cluster.add(3)
    for i, n in enumerate(nodes):
        wait_for(lambda n=n: n.status("/readyz")[0] == 200, timeout=60, what="ready")
        for j in range(3 + 4 * i):
            n.allocate(f"pod-{i}-{j}")
    a, dead = nodes[0], nodes[2]
    # a few more ring entries than one per peer: a donation splits a range
    a.allocate("pod-x", "/10.40.0.0/13")
    base = f"http://127.0.0.1:{a.status_port}"

    # the page's CSP forbids eval, which Playwright's waiting predicates use
    page = browser.new_page(viewport={"width": 1180, "height": 760}, bypass_csp=True)
    foreign: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(base) else foreign.append(req.url))
    page.goto(base + "/")
    page.wait_for_function("Number(document.body.dataset.updates || 0) >= 1", timeout=30_000)

    # one arc per ring entry, each sized by its share of the range, a colour per peer
    wait_for(lambda: len(_arcs(page)) == len(a.report()["entries"]), timeout=10,
             what="one arc per ring entry")
    report = a.report()
    arcs = _arcs(page)
    assert [x["token"] for x in arcs] == [e["token"] for e in report["entries"]]
    for x, e in zip(arcs, report["entries"], strict=True):
        assert abs(float(x["sweep"]) - 360 * e["size"] / report["size"]) < 1e-3, (x, e)
        assert x["hatched"] == "0" and x["me"] == (e["peer"] == a.name)
    fills: dict[str, set[str]] = {}
    for x in arcs:
        fills.setdefault(x["peer"], set()).add(x["fill"])
    assert len(fills) == 3 and all(len(f) == 1 for f in fills.values()), fills
    assert len({next(iter(f)) for f in fills.values()}) == 3, fills  # distinct colours
    assert abs(sum(float(x["sweep"]) for x in arcs) - 360) < 1e-3

    # the table and the state line, as the CLI says them
    rows = page.eval_on_selector_all("#peers tbody tr", "rs => rs.map(r => r.innerText)")
    assert len(rows) == 3 and any("node0" in r and "this peer" in r for r in rows), rows
    assert page.inner_text("#state .line") == "Status: ready"

    # hovering an arc shows its range, owner, size, free count and version
    first = report["entries"][0]
    page.hover("#ring path.arc >> nth=0")
    tip = page.inner_text("#tip")
    assert first["token"] in tip and first["last"] in tip and str(first["version"]) in tip, tip
    assert f"{first['size']:,}" in tip and "free" in tip and first["peer"] in tip, tip

    # SIGKILL a peer: its arcs turn hatched without a reload
    n0 = _updates(page)
    dead.signal(signal.SIGKILL)
    t0 = time.monotonic()
    page.wait_for_function(
        f"[...document.querySelectorAll('#ring path.arc[data-peer=\"{dead.name}\"]')]"
        ".every(p => p.dataset.hatched === '1')", timeout=30_000)  # generous: not a timing test
    hatched_after = time.monotonic() - t0
    assert _updates(page) > n0
    assert all(x["hatched"] == ("1" if x["peer"] == dead.name else "0") for x in _arcs(page))
    assert "unreachable" in page.inner_text(f"#peers tr[data-peer=\"{dead.name}\"]")
    page.mouse.move(5, 5)
    shot = tmp_path / "status-page.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    keep = os.environ.get("WEAVEIPAM_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
    print(f"hatched {hatched_after:.2f} s after SIGKILL; screenshot {shot}")

    # rmpeer: the dead peer's arcs go to its heir and the page lists the removal
    code, body = a.api("DELETE", f"/peer/{dead.name}")
    assert code == 200, body
    heir = a.report()["removed"][dead.name]
    page.wait_for_function(
        f"!document.querySelector('#ring path.arc[data-peer=\"{dead.name}\"]') && "
        f"document.querySelector('#events').innerText.includes('{dead.name} → {heir}')",
        timeout=30_000)
    assert not foreign, f"the page loaded something from elsewhere: {foreign}"


def test_status_page_is_self_contained_and_api_port_unchanged(cluster: Cluster) -> None:
    (n,) = cluster.add(1, init="consensus=1")
    code, body = n.status("/")
    assert code == 200 and body.lstrip().startswith("<!doctype html>")
    for bad in ("<script src", "<link", "@import", "url(http", "src=\"http", "cdn"):
        assert bad not in body.lower(), bad
    code, _ = n.api("GET", "/")
    assert code == 404  # Weave's API port answers unknown paths with 404; so does ours
