"""Plots of a run's curves and layer-wise barriers (matplotlib, no display needed)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmc.core.barriers import curve  # noqa: E402
from lmc.io import atomic_write  # noqa: E402

__all__ = ["plot_curves", "plot_layerwise", "plot_run", "plot_sweep"]


def _methods(rows, layered: bool) -> list[str]:
    seen = []
    for r in rows:
        if bool(r["layer"]) == layered and r["method"] not in seen:
            seen.append(r["method"])
    return seen


def save_figure(fig, path: str | os.PathLike, title: str = "", dpi: int = 80, fontsize: float | None = 10) -> Path:
    """The figure's title, then the PNG at ``path``, written atomically (a failed write leaves the previous
    figure); the figure is closed. Every figure of lmc and its studies is saved here."""
    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def _save(fig, axes, path: str | os.PathLike, title: str) -> Path:
    """Legend on the first panel, then :func:`save_figure`."""
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, title, dpi=120, fontsize=None)


def plot_curves(rows: list[Mapping], path: str | os.PathLike, title: str = "") -> Path:
    """Loss and error along α for every method (colour) and split (solid train, dashed test)."""
    whole = [r for r in rows if not r["layer"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, method in enumerate(_methods(whole, layered=False)):
        for split, style in (("train", "-"), ("test", "--")):
            try:
                c = curve(whole, method, split)
            except KeyError:
                continue
            for ax, metric in zip(axes, ("loss", "error")):
                ax.plot(c["alpha"], c[metric], style, color=f"C{i}", marker=".", label=f"{method} ({split})")
    for ax, metric in zip(axes, ("loss", "error")):
        ax.set_xlabel("α  (0 = model A, 1 = model B)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    return _save(fig, axes, path, title)


def plot_layerwise(layerwise: Mapping, path: str | os.PathLike, split: str = "test", title: str = "") -> Path:
    """Bar chart of layer-wise loss and error barriers per layer, one bar colour per method."""
    methods = list(layerwise)
    layers = list(dict.fromkeys(layer for m in methods for layer in layerwise[m]))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(layers) + 4), 3.8))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        for ax, metric in zip(axes, ("loss", "error")):
            vals = [layerwise[method].get(layer, {}).get(split, {}).get(metric, float("nan")) for layer in layers]
            ax.bar([j + i * width for j in range(len(layers))], vals, width, color=f"C{i}", label=method)
    for ax, metric in zip(axes, ("loss", "error")):
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(layers))], layers, rotation=45,
                      ha="right", fontsize=8)
        ax.set_ylabel(f"layer-wise {metric} barrier ({split})")
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, axes, path, title)


def plot_run(run_dir: str | os.PathLike, results: Mapping, rows: list[Mapping]) -> list[Path]:
    """Write ``curves.png`` (and ``layerwise.png`` when there are layer-wise results) to ``run_dir``."""
    run_dir = Path(run_dir)
    title = f"{results['experiment']}  seeds {results['seeds']}"
    paths = [plot_curves(rows, run_dir / "curves.png", title)]
    if results.get("layerwise"):
        paths.append(plot_layerwise(results["layerwise"], run_dir / "layerwise.png", title=title))
    return paths


def plot_sweep(points: list[Mapping], x: str, path: str | os.PathLike, split: str = "test", title: str = "") -> Path:
    """Barrier (loss and error) against a swept setting ``x``: one line per method, mean ± std over the
    jobs sharing an ``x`` value (e.g. seed pairs). ``points`` are ``{x, method, split, loss, error}``."""
    points = [p for p in points if p["split"] == split]
    xs = list(dict.fromkeys(p["x"] for p in points))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    xs = sorted(xs) if numeric else xs
    pos = {v: (v if numeric else i) for i, v in enumerate(xs)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, method in enumerate(dict.fromkeys(p["method"] for p in points)):
        for ax, metric in zip(axes, ("loss", "error")):
            stats = []
            for v in xs:
                vals = [p[metric] for p in points if p["method"] == method and p["x"] == v]
                if vals:
                    stats.append((pos[v], float(np.mean(vals)), float(np.std(vals)), len(vals)))
            if stats:
                px, mean, std, _ = zip(*stats)
                ax.errorbar(px, mean, yerr=std, color=f"C{i}", marker="o", capsize=3, label=method)
    for ax, metric in zip(axes, ("loss", "error")):
        if numeric and len(xs) > 1 and min(xs) >= 0 and max(xs) >= 8 * max(min(v for v in xs if v > 0), 1e-12):
            ax.set_xscale("symlog" if min(xs) == 0 else "log")
        ax.set_xticks([pos[v] for v in xs], [f"{v:g}" if numeric else str(v) for v in xs],
                      rotation=0 if numeric else 30, ha="center" if numeric else "right")
        ax.minorticks_off()
        ax.set_xlabel(x)
        ax.set_ylabel(f"{metric} barrier ({split})")
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
    return _save(fig, axes, path, title)
