"""PCA, update PCA and the drift mode against trajectories with planted structure.

Each synthetic trajectory is ``w0 + S Q^T``: Q has orthonormal columns (the planted
directions) and S has centred, mutually orthogonal columns with chosen variances,
so the principal components are exactly the columns of Q and the explained
variances exactly the chosen ones.
"""

import importlib

import numpy as np
import pytest

from tfcurv.analysis.pca import (
    DriftMode,
    PCAResult,
    drift_mode,
    drift_ratio,
    pca,
    update_pca,
)

pca_module = importlib.import_module(
    "tfcurv.analysis.pca"
)  # the package re-exports `pca`


def _orthonormal_columns(rng, rows, cols):
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def _planted_series(rng, steps, variances, first_column=None):
    """Centred, mutually orthogonal time series with the given variances (columns)."""
    raw = rng.standard_normal((steps, len(variances)))
    if first_column is not None:
        raw[:, 0] = first_column
    raw -= raw.mean(axis=0)
    q, r = np.linalg.qr(raw)
    q *= np.sign(np.diag(r))  # keep the first column pointing like first_column
    return q * np.sqrt(np.asarray(variances) * (steps - 1))


@pytest.mark.parametrize("num_params", [12, 300], ids=["covariance", "gram"])
def test_pca_recovers_planted_directions_and_variances(num_params):
    rng = np.random.default_rng(0)
    steps, variances = 80, [9.0, 1.0, 0.25]
    directions = _orthonormal_columns(rng, num_params, 3)
    origin = rng.standard_normal(num_params)
    states = origin + _planted_series(rng, steps, variances) @ directions.T

    result = pca(states, n_components=3)

    np.testing.assert_allclose(result.explained_variance[:3], variances, rtol=1e-10)
    np.testing.assert_allclose(result.explained_variance[3:], 0.0, atol=1e-10)
    assert len(result.explained_variance) == min(steps - 1, num_params)
    np.testing.assert_allclose(
        result.explained_variance_ratio[:3], np.array(variances) / 10.25
    )
    np.testing.assert_allclose(
        np.abs(result.components @ directions), np.eye(3), atol=1e-10
    )
    np.testing.assert_allclose(
        result.projections, states @ result.components.T, atol=1e-10
    )
    np.testing.assert_allclose(result.mean, states.mean(axis=0), atol=1e-12)
    assert drift_ratio(result) == pytest.approx(9.0, rel=1e-10)
    # each component points the way the trajectory moved along it
    assert np.all(result.components @ (states[-1] - states[0]) >= 0)


@pytest.mark.parametrize("num_params", [7, 90], ids=["covariance", "gram"])
def test_pca_matches_covariance_eigendecomposition_of_official_code(
    num_params, monkeypatch
):
    """The paper's recipe: eigh(np.cov(W.T)), sorted by decreasing variance; tiny blocks."""
    monkeypatch.setattr(pca_module, "_BLOCK_ELEMENTS", 50)
    rng = np.random.default_rng(1)
    states = np.cumsum(
        rng.standard_normal((40, num_params)) * np.linspace(2, 0.1, num_params), 0
    )

    result = pca(states, n_components=4)

    values, vectors = np.linalg.eigh(np.atleast_2d(np.cov(states.T)))
    order = np.argsort(values)[::-1]
    np.testing.assert_allclose(
        result.explained_variance,
        values[order][: min(39, num_params)],
        rtol=1e-8,
        atol=1e-10,
    )
    np.testing.assert_allclose(
        np.abs(result.components @ vectors[:, order[:4]]), np.eye(4), atol=1e-8
    )


def test_update_pca_recovers_planted_update_directions():
    rng = np.random.default_rng(2)
    num_params, variances = 50, [4.0, 0.5]
    directions = _orthonormal_columns(rng, num_params, 2)
    updates = _planted_series(rng, 30, variances) @ directions.T
    states = (
        np.concatenate([np.zeros((1, num_params)), np.cumsum(updates, axis=0)]) + 1.0
    )

    result = update_pca(states, n_components=2)

    np.testing.assert_allclose(result.explained_variance[:2], variances, rtol=1e-10)
    np.testing.assert_allclose(
        np.abs(result.components @ directions), np.eye(2), atol=1e-10
    )
    assert result.projections.shape == (30, 2)
    np.testing.assert_allclose(
        result.projections, updates @ result.components.T, atol=1e-10
    )


def test_drift_mode_of_exponential_decay_towards_a_minimum():
    """The quadratic-potential picture: theta_1 relaxes exponentially, noise elsewhere."""
    rng = np.random.default_rng(3)
    steps, num_params = 200, 40
    decay = 5.0 * (1.0 - np.exp(-np.arange(steps) / 60.0))
    series = _planted_series(
        rng, steps, [np.var(decay, ddof=1), 0.01, 0.004], first_column=decay
    )
    directions = _orthonormal_columns(rng, num_params, 3)
    states = rng.standard_normal(num_params) + series @ directions.T

    drift = drift_mode(states)

    assert abs(drift.direction @ directions[:, 0]) == pytest.approx(1.0, abs=1e-10)
    assert drift.ratio == pytest.approx(np.var(decay, ddof=1) / 0.01, rel=1e-10)
    assert drift.monotonicity == 1.0
    assert drift.theta[-1] > drift.theta[0]
    np.testing.assert_allclose(np.diff(drift.theta), np.diff(decay), atol=1e-10)


def test_results_round_trip_through_npz(tmp_path):
    rng = np.random.default_rng(4)
    states = rng.standard_normal((10, 6))
    result = pca(states, n_components=2)
    result.save(tmp_path / "pca.npz")
    loaded = PCAResult.load(tmp_path / "pca.npz")
    for name in ("components", "explained_variance", "mean", "projections"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))

    drift = drift_mode(states)
    drift.save(tmp_path / "drift.npz")
    loaded_drift = DriftMode.load(tmp_path / "drift.npz")
    assert loaded_drift.ratio == drift.ratio and isinstance(loaded_drift.ratio, float)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pca(np.zeros(5)), "2-D"),
        (lambda: pca(np.zeros((1, 5))), "at least 2 rows"),
        (lambda: update_pca(np.zeros((2, 5))), "at least 3 rows"),
        (
            lambda: pca(np.random.default_rng(0).normal(size=(4, 5)), n_components=4),
            "n_components",
        ),
        (
            lambda: pca(np.random.default_rng(0).normal(size=(4, 5)), n_components=0),
            "n_components",
        ),
    ],
)
def test_bad_input_is_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
