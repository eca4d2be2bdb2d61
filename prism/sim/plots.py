"""PNG plots of simulation results (matplotlib, imported only here, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prism.sim.metrics import MemoryTrace

GiB = 1 << 30


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attainment_curves(
    path: str | Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str,
    title: str,
    target: float | None = 0.99,
    ylabel: str = "SLO attainment",
) -> None:
    """One line per policy: attainment (0..1) against `x`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        values = [np.nan if y is None else y for y in ys]
        ax.plot(x, values, marker="o", label=name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"{target:.0%}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gpus_needed(
    path: str | Path, needed: Mapping[str, int | None], *, title: str, ceiling: int
) -> None:
    """Bars: GPUs each policy needs; a hatched bar at `ceiling` where it never got there."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(needed)
    heights = [needed[n] or ceiling for n in names]
    bars = ax.bar(names, heights, color="tab:blue")
    for bar, name in zip(bars, names, strict=True):
        if needed[name] is None:
            bar.set_hatch("//")
            bar.set_color("tab:grey")
        label = f"{needed[name]}" if needed[name] is not None else f">{ceiling}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")  # fmt: skip
    ax.set_ylabel("GPUs")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory_over_time(
    path: str | Path, trace: MemoryTrace, names: Sequence[str], *, title: str, top: int = 10
) -> None:
    """Stacked memory (weights + KV) of the `top` models with the most memory-time,
    the rest summed as "others"."""
    plt = _pyplot()
    times, weights, kv = trace.arrays()
    total = (weights + kv) / GiB  # [T, M]
    fig, ax = plt.subplots(figsize=(8, 4))
    if len(times):
        order = np.argsort(-total.sum(axis=0))
        shown = [int(m) for m in order[:top] if total[:, m].any()]
        layers = [total[:, m] for m in shown]
        labels = [names[m] for m in shown]
        colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(layers))]
        rest = np.delete(total, shown, axis=1).sum(axis=1)
        if rest.any():
            layers.append(rest)
            labels.append("others")
            colors.append("lightgrey")
        ax.stackplot(times / 60.0, *layers, labels=labels, colors=colors)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.set_xlabel("time (min)")
    ax.set_ylabel("GPU memory (GiB)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attainment_points(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    title: str,
    target: float | None = 0.99,
    ylabel: str = "SLO attainment",
    ylim: tuple[float, float] = (-0.02, 1.02),
) -> None:
    """One line per policy over its own x values (e.g. the GPU counts a search tried)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        order = np.argsort(xs)
        ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], marker="o", label=name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"{target:.0%}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
