"""The timeline PNG: faults per node, latency, acknowledged throughput, owned share."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .faults import Fault  # noqa: E402
from .workload import Op  # noqa: E402

FAULT_COLORS = {"kill": "tab:red", "pause": "tab:orange", "loss": "tab:purple",
                "partition": "tab:blue", "rmpeer": "black",
                # operators and strangers
                "init": "tab:green", "wipe-data": "tab:brown", "wipe-store": "tab:pink",
                "reset": "tab:olive", "reset-force": "tab:cyan", "forged-hello": "tab:gray",
                "starve": "gold"}


STYLES = ["-", "--", "-.", ":", (0, (5, 1))]


def timeline(path: Path, ops: list[Op], faults: list[Fault], shares: list[tuple[float, int, float]],
             n: int, t_heal: float, title: str, marks: list[float] | None = None) -> None:
    """`marks`: times of violations, drawn as red lines across every panel."""
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(n)]
    fig, axes = plt.subplots(4, 1, figsize=(14, 13), sharex=True,
                             gridspec_kw={"height_ratios": [1.2, 2, 1.6, 1.4]})
    ax_f, ax_l, ax_t, ax_s = axes
    fig.suptitle(title, fontsize=13)

    # faults: one row per node
    for f in faults:
        end = f.t1 if f.t1 >= 0 else t_heal
        rows = f.nodes if f.kind != "partition" else f.detail.get("groups", [f.nodes])[0]
        for i in rows:
            ax_f.broken_barh([(f.t0, end - f.t0)], (i - 0.4, 0.8),
                             facecolors=FAULT_COLORS.get(f.kind, "tab:gray"), alpha=0.8)
    ax_f.set_yticks(range(n), [f"node{i}" for i in range(n)])
    ax_f.set_ylim(-0.6, n - 0.4)
    ax_f.invert_yaxis()
    ax_f.set_ylabel("faults")
    ax_f.legend(handles=[Patch(color=c, label=k + (" (minority side)" if k == "partition"
                                                   else ""))
                         for k, c in FAULT_COLORS.items()],
                loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9)
    ax_f.grid(axis="x", alpha=0.3)

    # latency of every operation; failures as crosses
    for i in range(n):
        ok = [o for o in ops if o.node == i and o.ok]
        bad = [o for o in ops if o.node == i and not o.ok]
        ax_l.scatter([o.t1 for o in ok], [max(o.latency, 1e-4) * 1000 for o in ok], s=2,
                     color=colors[i], alpha=0.35, label=f"node{i}", rasterized=True)
        ax_l.scatter([o.t1 for o in bad], [max(o.latency, 1e-4) * 1000 for o in bad], s=14,
                     marker="x", color=colors[i], alpha=0.8, linewidths=0.8, rasterized=True)
    ax_l.set_yscale("log")
    ax_l.set_ylabel("latency (ms)\n· acknowledged  × failed")
    ax_l.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), markerscale=5, fontsize=9)
    ax_l.grid(alpha=0.3)

    # acknowledged operations per second per node
    bins: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for o in ops:
        if o.ok:
            bins[o.node][int(o.t1)] += 1
    tmax = int(max([o.t1 for o in ops], default=1)) + 1
    for i in range(n):
        ax_t.plot(range(tmax), [bins[i][t] for t in range(tmax)], color=colors[i], lw=1,
                  label=f"node{i}")
    ax_t.set_ylabel("acknowledged ops/s")
    ax_t.grid(alpha=0.3)

    # owned share of the range per node (its own view)
    for i in range(n):
        pts = sorted((t, s) for t, j, s in shares if j == i)
        if pts:
            ax_s.step([p[0] for p in pts], [100 * p[1] for p in pts], where="post",
                      color=colors[i], lw=2.5 - 0.3 * i, ls=STYLES[i % len(STYLES)],
                      label=f"node{i}")
    ax_s.set_ylabel("owned share of range (%)\n(each node's own view)")
    if shares:
        ax_s.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9)
    ax_s.set_xlabel("seconds since start")
    ax_s.grid(alpha=0.3)

    for ax in axes:
        ax.axvline(t_heal, color="green", ls="--", lw=1.2)
        for t in marks or []:
            ax.axvline(t, color="red", lw=1.0, alpha=0.8)
    if marks:
        ax_f.text(marks[0], -0.6, " violation", color="red", va="bottom", fontsize=9)
    ax_s.text(t_heal, ax_s.get_ylim()[1], "last fault healed ", color="green", va="top", ha="right",
              fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
