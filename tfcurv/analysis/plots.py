"""Figures of the analysis results (matplotlib, an optional dependency).

Every function draws on a given matplotlib axis (or a new figure when ``ax`` is
``None``) and returns the axis, so figures can be combined and saved with
``ax.figure.savefig(path)``. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tfcurv.analysis.pca import DriftMode
from tfcurv.analysis.reconstruction import ReconstructionCurve
from tfcurv.analysis.spectra import LayerComparison


def _axis(ax):
    if ax is not None:
        return ax
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "tfcurv.analysis.plots needs matplotlib: pip install matplotlib"
        ) from error
    _, ax = plt.subplots(figsize=(5.5, 4))
    return ax


def plot_overlap_heatmap(
    overlaps: np.ndarray,
    ax=None,
    row_label: str = "principal component",
    column_label: str = "Hessian eigenvector",
    title: str | None = None,
):
    """Heat map of an overlap matrix ``|a_i·b_j|`` (values in [0, 1]; indices from 1)."""
    ax = _axis(ax)
    overlaps = np.asarray(overlaps)
    rows, columns = overlaps.shape
    image = ax.imshow(
        overlaps,
        vmin=0.0,
        vmax=1.0,
        cmap="viridis",
        aspect="auto",
        interpolation="nearest",
        extent=(0.5, columns + 0.5, rows + 0.5, 0.5),
    )
    ax.figure.colorbar(image, ax=ax, label="overlap")
    ax.set_ylabel(f"{row_label} index")
    ax.set_xlabel(f"{column_label} index")
    if title:
        ax.set_title(title)
    return ax


def plot_drift(
    drift: DriftMode, ax=None, steps: np.ndarray | None = None, title: str | None = None
):
    """``theta_1(t)``, the trajectory's coordinate along its drift mode."""
    ax = _axis(ax)
    steps = np.arange(len(drift.theta)) if steps is None else np.asarray(steps)
    ax.plot(steps, drift.theta, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\theta_1 = pc_1 \cdot w(t)$")
    ax.set_title(title or f"drift mode (ratio var1/var2 = {drift.ratio:.1f})")
    return ax


def plot_layer_eigenvalues(
    comparison: LayerComparison, ax=None, labels: Sequence[str] | None = None
):
    """Grouped bars: the top eigenvalues of every block next to the whole network's."""
    ax = _axis(ax)
    names = (
        list(labels)
        if labels is not None
        else [str(n) for n in comparison.variable_names]
    )
    rows = [comparison.network_values] + list(comparison.layer_values)
    groups = ["network"] + names
    top_n = len(comparison.network_values)
    width = 0.8 / top_n
    for rank in range(top_n):
        heights = [row[rank] if rank < len(row) else np.nan for row in rows]
        ax.bar(
            np.arange(len(groups)) + (rank - (top_n - 1) / 2) * width,
            heights,
            width,
            label=f"$\\lambda_{{{rank + 1}}}$",
        )
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("Hessian eigenvalue")
    if np.nanmin(np.concatenate(rows)) > 0:
        ax.set_yscale("log")
    ax.legend(fontsize="small", ncol=min(top_n, 5))
    return ax


def plot_spectral_density(
    density, ax=None, sigma: float | None = None, log: bool = True
):
    """The smoothed spectral density of ``Hessian.density()`` (stochastic Lanczos quadrature)."""
    ax = _axis(ax)
    density.plot(ax=ax, sigma=sigma, log=log)
    ax.set_title("Hessian spectral density")
    return ax


def plot_layer_report(report, axes=None):
    """Two bar charts of a :class:`~tfcurv.analysis.report.CurvatureReport`, one
    bar per layer: the top eigenvalue of the layer's Hessian block (left) and
    the layer's share of the trace (right). Returns the two axes."""
    if axes is None:
        _axis(None)  # matplotlib present, or a clear ImportError
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [str(n) for n in report.layer_names]
    positions = np.arange(len(names))
    left, right = axes
    left.bar(positions, report.layer_top_eigenvalues)
    left.set_ylabel("top eigenvalue of the layer's block")
    right.bar(positions, 100 * np.asarray(report.layer_trace_shares))
    right.set_ylabel("share of the Hessian trace (%)")
    for ax in axes:
        ax.set_xticks(positions, names, rotation=30, ha="right")
    left.set_title("per-layer curvature")
    return axes


def plot_reconstruction(
    curves: Mapping[str, ReconstructionCurve], ax=None, metric: str = "accuracy"
):
    """Accuracy (or loss) against the number of directions a layer is rebuilt from."""
    if metric not in ("accuracy", "loss"):
        raise ValueError(
            f"`metric` must be 'accuracy' or 'loss'. Received: metric={metric!r}"
        )
    ax = _axis(ax)
    for label, curve in curves.items():
        ax.plot(curve.counts, getattr(curve, metric), marker=".", label=label)
    original = next(iter(curves.values()), None)
    if original is not None:
        ax.axhline(
            getattr(original, f"original_{metric}"),
            color="grey",
            ls="--",
            lw=0.8,
            label="unchanged",
        )
    ax.set_xlabel("number of directions i")
    ax.set_ylabel(metric)
    ax.legend(fontsize="small")
    return ax


def plot_explained_variance(
    explained_variance_ratio: np.ndarray,
    ax=None,
    label: str | None = None,
    count: int = 20,
):
    """Share of the variance along the first ``count`` principal components (log scale)."""
    ax = _axis(ax)
    ratios = np.asarray(explained_variance_ratio)[:count]
    ax.semilogy(np.arange(1, len(ratios) + 1), ratios, marker="o", label=label)
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    if label:
        ax.legend(fontsize="small")
    return ax
