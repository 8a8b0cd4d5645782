"""Plots of what the tools measured: ``pccl bench allreduce --plot`` and ``pccl chaos --plot``.

Every function reads the records its tool already writes (the bench's JSON documents, the chaos
report with its ``timeline``) and writes one PNG. matplotlib is an optional extra
(``pip install 'pccl[plot]'``), imported only when a plot is drawn, with the non-interactive
Agg backend (no display needed); without it :class:`PlotUnavailable` says how to install it.
Runs on the caller's thread; nothing here touches the network or the library's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PlotUnavailable", "plot_bench", "plot_chaos"]

#: Colour and marker of each fault kind on the chaos timeline.
_FAULT_STYLE = {
    "kill": ("tab:red", "x"),
    "hang": ("tab:orange", "s"),
    "leave": ("tab:purple", "v"),
    "join": ("tab:green", "^"),
    "restart": ("tab:olive", "^"),
    "masterkill": ("black", "X"),
    "linkcut": ("tab:brown", "D"),
    "ratelimit": ("tab:pink", "d"),
}
_SERIES = (("pccl", "tab:blue", "o"), ("gloo", "tab:orange", "s"), ("floor", "tab:gray", "^"))


class PlotUnavailable(ImportError):
    """matplotlib is not installed (``pip install 'pccl[plot]'``)."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "plotting needs matplotlib: pip install 'pccl[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    fig.clear()
    return out


def _gbps(half: dict[str, Any] | None) -> float | None:
    if not half:
        return None
    return float(half["busbw_gbps"])


def plot_bench(docs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Bus bandwidth against buffer size (and against streams, when the runs vary them).

    Args:
        docs: ``pccl bench allreduce`` result documents, one per configuration (the ``runs``
            of a sweep, or the single document). Series drawn: ``pccl``, ``gloo`` and ``floor``
            wherever a document holds them.
        path: the PNG to write (its folder is created).

    Returns:
        The path written.

    Raises:
        PlotUnavailable: matplotlib is not installed.
        ValueError: ``docs`` is empty.
    """
    if not docs:
        raise ValueError("no benchmark documents to plot")
    plt = _pyplot()
    streams = sorted({int(d["config"]["streams"]) for d in docs})
    sizes = sorted({float(d["config"]["mib"]) for d in docs})
    c0 = docs[0]["config"]
    by_streams = len(streams) > 1
    fig, axes = plt.subplots(1, 2 if by_streams else 1, figsize=(11 if by_streams else 6.5, 4.2))
    ax_size = axes[0] if by_streams else axes
    for name, colour, marker in _SERIES:
        for k, s in enumerate(streams):
            pts = sorted(
                (float(d["config"]["mib"]), g)
                for d in docs
                if int(d["config"]["streams"]) == s and (g := _gbps(d.get(name))) is not None
            )
            if name != "pccl" and k > 0:
                break  # gloo and the floor have no streams: one line
            if not pts:
                continue
            label = f"{name} ({s} streams)" if name == "pccl" and by_streams else name
            style = "-" if name == "pccl" else "--"
            alpha = 1.0 if name != "pccl" else 1.0 - 0.6 * k / max(len(streams) - 1, 1)
            ax_size.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                style,
                marker=marker,
                color=colour,
                alpha=alpha,
                label=label,
            )
    ax_size.set_xscale("log", base=2)
    ax_size.set_xticks(sizes, [f"{m:g}" for m in sizes])
    ax_size.minorticks_off()
    ax_size.set_xlabel("buffer size (MiB)")
    ax_size.set_ylabel("bus bandwidth (GB/s)")
    ax_size.set_title(
        f"all-reduce, {c0['peers']} peers, {c0['dtype']}, quantization {c0['quantization']}"
    )
    ax_size.grid(True, alpha=0.3)
    ax_size.legend()
    if by_streams:
        ax = axes[1]
        for k, mib in enumerate(sizes):
            pts = sorted(
                (int(d["config"]["streams"]), float(d["pccl"]["busbw_gbps"]))
                for d in docs
                if float(d["config"]["mib"]) == mib
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "-o",
                color=plt.get_cmap("viridis")(k / max(len(sizes) - 1, 1)),
                label=f"pccl {mib:g} MiB",
            )
        used = sorted({int(d["config"].get("streams_used", 0)) for d in docs})
        note = f" (loopback opened {used[0]})" if len(used) == 1 and len(streams) > 1 else ""
        ax.set_xlabel(f"TCP streams per ring link{note}")
        ax.set_ylabel("bus bandwidth (GB/s)")
        ax.set_xticks(streams)
        ax.set_title("pccl against streams")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_chaos(report: dict[str, Any], path: str | Path) -> Path:
    """Timeline of one ``pccl chaos`` run: faults, world size, recovery times.

    Args:
        report: the chaos report (``--json``), with its ``timeline``.
        path: the PNG to write (its folder is created).

    Returns:
        The path written.

    Raises:
        PlotUnavailable: matplotlib is not installed.
        KeyError: ``report`` has no ``timeline`` (written by an older ``pccl chaos``).
    """
    plt = _pyplot()
    tl = report["timeline"]
    fig, (ax_f, ax_w, ax_r) = plt.subplots(
        3, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [1.2, 1, 1]}
    )
    kinds = [k for k in _FAULT_STYLE if any(f["kind"] == k for f in tl["faults"])]
    for row, kind in enumerate(kinds):
        colour, marker = _FAULT_STYLE[kind]
        ts = [f["t"] for f in tl["faults"] if f["kind"] == kind]
        ax_f.scatter(ts, [row] * len(ts), color=colour, marker=marker, s=60, label=kind)
        for t in ts:
            for ax in (ax_w, ax_r):
                ax.axvline(t, color=colour, alpha=0.15, linewidth=1)
    ax_f.set_yticks(range(len(kinds)), kinds)
    ax_f.set_ylim(-0.7, max(len(kinds), 1) - 0.3)
    ax_f.set_title(
        f"pccl chaos: seed {report.get('seed')}, {report.get('peers')} peers, "
        f"{report.get('steps')} steps, {report.get('parity_violations')} parity violations"
    )
    ax_f.grid(True, axis="x", alpha=0.3)
    world = tl["world"]
    if world:
        ax_w.step([w[0] for w in world], [w[1] for w in world], where="post", color="tab:blue")
    ax_w.yaxis.get_major_locator().set_params(integer=True)
    ax_w.set_ylabel("world size\n(of steps)")
    ax_w.grid(True, alpha=0.3)
    rec = tl["recoveries"]
    if rec:
        ax_r.scatter([r[0] for r in rec], [r[1] for r in rec], color="tab:red", s=25)
        ax_r.set_ylim(bottom=0)
    ax_r.set_ylabel("recovery (s)")
    ax_r.set_xlabel("time since start (s)")
    ax_r.grid(True, alpha=0.3)
    return _save(fig, path)
