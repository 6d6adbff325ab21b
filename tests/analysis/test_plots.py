"""Every plot renders to a PNG headlessly (Agg backend, set by the test conftest)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from tfcurv.analysis import (
    LayerComparison,
    ReconstructionCurve,
    drift_mode,
    pca,
    plots,
)
from tfcurv.curvature.density import SpectralDensity

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _save(ax, path):
    ax.figure.savefig(path)
    plt.close(ax.figure)
    assert path.read_bytes()[:8] == _PNG_MAGIC


def _states():
    rng = np.random.default_rng(0)
    return np.cumsum(rng.standard_normal((30, 8)) + np.eye(8)[0], axis=0)


def test_overlap_heatmap(tmp_path):
    _save(
        plots.plot_overlap_heatmap(np.random.default_rng(0).random((5, 7)), title="x"),
        tmp_path / "a.png",
    )


def test_drift_and_explained_variance(tmp_path):
    _save(plots.plot_drift(drift_mode(_states())), tmp_path / "b.png")
    _save(
        plots.plot_explained_variance(
            pca(_states(), 3).explained_variance_ratio, label="w"
        ),
        tmp_path / "c.png",
    )


def test_layer_eigenvalues(tmp_path):
    comparison = LayerComparison(
        variable_names=np.array(["k1", "b1"]),
        network_values=np.array([5.0, 2.0]),
        layer_values=np.array([[4.0, 1.5], [0.3, np.nan]]),
        localisation=np.array([[0.9, 0.1], [0.5, 0.5]]),
        top_overlap=np.ones((2, 2)),
    )
    _save(plots.plot_layer_eigenvalues(comparison), tmp_path / "d.png")


def test_spectral_density(tmp_path):
    density = SpectralDensity(
        nodes=np.array([[0.0, 1.0, 5.0]]), weights=np.array([[0.5, 0.3, 0.2]])
    )
    ax = plots.plot_spectral_density(density)
    grid, smooth = density.smoothed()
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), grid)
    np.testing.assert_allclose(line.get_ydata(), smooth)
    # The axis ends just above the peak (autoscaling put it decades higher).
    bottom, top = ax.get_ylim()
    assert ax.get_yscale() == "log"
    assert smooth.max() < top <= 2 * smooth.max()
    assert bottom == pytest.approx(smooth.max() * 1e-8)
    _save(ax, tmp_path / "e.png")


def test_spectral_density_of_a_bulk_near_zero_has_its_peak_in_view():
    rng = np.random.default_rng(0)
    nodes = np.concatenate([rng.normal(0.0, 1e-3, 90), rng.uniform(1, 30, 10)])
    density = SpectralDensity(nodes=nodes[None], weights=np.full((1, 100), 0.01))
    for log in (True, False):
        ax = plots.plot_spectral_density(density, log=log)
        peak = density.smoothed()[1].max()
        assert peak < ax.get_ylim()[1] <= 2 * peak


def test_reconstruction(tmp_path):
    curve = ReconstructionCurve(
        counts=np.arange(3),
        loss=np.array([2.0, 1.0, 0.5]),
        accuracy=np.array([0.1, 0.5, 0.9]),
        original_loss=0.5,
        original_accuracy=0.9,
    )
    _save(plots.plot_reconstruction({"Hessian": curve}), tmp_path / "f.png")
    _save(
        plots.plot_reconstruction({"Hessian": curve}, metric="loss"), tmp_path / "g.png"
    )
    with pytest.raises(ValueError, match="metric"):
        plots.plot_reconstruction({"Hessian": curve}, metric="auc")


def test_layer_report_draws_one_bar_per_layer(tmp_path):
    from tfcurv.analysis.report import CurvatureReport

    report = CurvatureReport(
        num_parameters=10, top_eigenvalues=np.array([3.0]), trace=5.0,
        trace_samples=4, layer_names=np.array(["a", "b"]),
        layer_parameters=np.array([6, 4]), layer_top_eigenvalues=np.array([3.0, 0.5]),
        layer_trace_shares=np.array([0.8, 0.2]),
        density_nodes=np.zeros((1, 2)), density_weights=np.full((1, 2), 0.5),
    )  # fmt: skip
    left, right = plots.plot_layer_report(report)
    assert [p.get_height() for p in left.patches] == [3.0, 0.5]
    assert [p.get_height() for p in right.patches] == pytest.approx([80.0, 20.0])
    assert [t.get_text() for t in right.get_xticklabels()] == ["a", "b"]
    _save(left, tmp_path / "layers.png")
    report.save(tmp_path / "report.npz")
    loaded = CurvatureReport.load(tmp_path / "report.npz")
    np.testing.assert_array_equal(loaded.layer_trace_shares, report.layer_trace_shares)
    assert "trace share" in loaded.table() and "80.0%" in loaded.table()
