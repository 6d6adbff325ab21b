"""PCA of weight trajectories and of their updates; the drift mode (Haink 2023, §5.3).

A trajectory is a (T, P) array of states ``w(t)`` (a numpy array or the memmap of
:meth:`Trajectory.states`). Following the official code, the covariance is
time-centred and divided by ``T - 1``, components are sorted by decreasing
variance, and the projections ``theta_k(t) = pc_k . w(t)`` are *not* centred.

The computation reads the data in blocks, so memory stays at O(min(T, P)^2) plus
one block: the P x P covariance when P <= T, otherwise the T x T Gram matrix of
the centred data (whose eigenvectors give the same components).

Sign convention: each component points the way the trajectory moved along it
(``pc_k . (w(T) - w(0)) >= 0``; for updates, ``pc_k . sum of updates >= 0``), so
the drift mode's ``theta_1`` increases from start to end.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcurv.analysis.results import SavableResult

_BLOCK_ELEMENTS = 4 * 2**20


@dataclasses.dataclass
class PCAResult(SavableResult):
    """Principal components of a set of rows.

    Attributes:
        components: (k, P) unit rows, by decreasing variance.
        explained_variance: (min(T-1, P),) variance along every principal axis.
        explained_variance_ratio: the same, divided by the total variance.
        mean: (P,) the time average that was subtracted.
        projections: (T, k) ``components @ row`` for every row, uncentred.
    """

    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    mean: np.ndarray
    projections: np.ndarray


@dataclasses.dataclass
class DriftMode(SavableResult):
    """The first principal component of a trajectory and how it moved.

    Attributes:
        direction: (P,) unit vector ``pc_1``, oriented along the net movement.
        theta: (T,) ``pc_1 . w(t)``.
        ratio: drift ratio ``var(theta_1) / var(theta_2)``.
        monotonicity: share of steps on which ``theta_1`` increased (1 = monotone).
        explained_variance_ratio: share of the total variance along ``pc_1``.
    """

    direction: np.ndarray
    theta: np.ndarray
    ratio: float
    monotonicity: float
    explained_variance_ratio: float


def pca(states: np.ndarray, n_components: int = 10) -> PCAResult:
    """PCA of a trajectory ``states`` of shape (T, P) (T >= 2 rows)."""
    return _pca(_Rows(states, differences=False), n_components)


def update_pca(states: np.ndarray, n_components: int = 10) -> PCAResult:
    """PCA of the updates ``w(t+1) - w(t)`` of a trajectory of shape (T, P), T >= 3.

    The rows of the result's ``projections`` are the T - 1 updates.
    """
    return _pca(_Rows(states, differences=True), n_components)


def drift_ratio(result: PCAResult) -> float:
    """``var(theta_1) / var(theta_2)``: how much the first direction dominates."""
    if len(result.explained_variance) < 2:
        raise ValueError("`result` needs at least two principal axes for a drift ratio")
    return float(result.explained_variance[0] / result.explained_variance[1])


def drift_mode(states: np.ndarray) -> DriftMode:
    """The drift mode of a trajectory: its first principal component and ``theta_1(t)``."""
    result = pca(states, n_components=1)
    theta = result.projections[:, 0]
    return DriftMode(
        direction=result.components[0],
        theta=theta,
        ratio=drift_ratio(result),
        monotonicity=float(np.mean(np.diff(theta) > 0)),
        explained_variance_ratio=float(result.explained_variance_ratio[0]),
    )


class _Rows:
    """Row and column blocks of a (T, P) array, or of its row differences, in float64."""

    def __init__(self, states: np.ndarray, differences: bool):
        if not hasattr(states, "shape") or len(states.shape) != 2:
            raise ValueError(
                "`states` must be a 2-D array (time, parameters). "
                f"Received shape {getattr(states, 'shape', None)}"
            )
        minimum = 3 if differences else 2
        if states.shape[0] < minimum:
            raise ValueError(
                f"`states` must have at least {minimum} rows. Received {states.shape[0]}"
            )
        self._states = states
        self._differences = differences
        self.shape = (states.shape[0] - int(differences), states.shape[1])

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self._differences:
            return np.diff(
                np.asarray(self._states[start : stop + 1], np.float64), axis=0
            )
        return np.asarray(self._states[start:stop], np.float64)

    def columns(self, start: int, stop: int) -> np.ndarray:
        block = np.asarray(self._states[:, start:stop], np.float64)
        return np.diff(block, axis=0) if self._differences else block

    def net_movement(self) -> np.ndarray:
        first, last = (np.asarray(self._states[i], np.float64) for i in (0, -1))
        return last - first

    def row_blocks(self):
        step = max(1, _BLOCK_ELEMENTS // self.shape[1])
        for start in range(0, self.shape[0], step):
            yield self.rows(start, min(start + step, self.shape[0]))

    def column_ranges(self):
        step = max(1, _BLOCK_ELEMENTS // self.shape[0])
        for start in range(0, self.shape[1], step):
            yield start, min(start + step, self.shape[1])


def _pca(data: _Rows, n_components: int) -> PCAResult:
    num_rows, num_params = data.shape
    rank = min(num_rows - 1, num_params)
    if (
        isinstance(n_components, bool)
        or not isinstance(n_components, (int, np.integer))
        or not (1 <= n_components <= rank)
    ):
        raise ValueError(
            f"`n_components` must be an integer in [1, {rank}] (min(T-1, P) for this data). "
            f"Received: n_components={n_components!r}"
        )
    mean = sum(block.sum(axis=0) for block in data.row_blocks()) / num_rows
    if num_params <= num_rows:
        scatter = np.zeros((num_params, num_params))
        for block in data.row_blocks():
            centred = block - mean
            scatter += centred.T @ centred
        values, vectors = np.linalg.eigh(scatter / (num_rows - 1))
        order = np.argsort(values)[::-1]
        values, components = values[order], vectors[:, order[:n_components]].T
    else:
        gram = np.zeros((num_rows, num_rows))
        for start, stop in data.column_ranges():
            centred = data.columns(start, stop) - mean[start:stop]
            gram += centred @ centred.T
        values, vectors = np.linalg.eigh(gram / (num_rows - 1))
        order = np.argsort(values)[::-1]
        values, left = values[order], vectors[:, order[:n_components]]
        scale = np.sqrt(
            np.maximum(values[:n_components], np.finfo(float).tiny) * (num_rows - 1)
        )
        components = np.empty((n_components, num_params))
        for start, stop in data.column_ranges():
            centred = data.columns(start, stop) - mean[start:stop]
            components[:, start:stop] = (centred.T @ left / scale).T
        components /= np.linalg.norm(components, axis=1, keepdims=True)
    variances = np.maximum(values[:rank], 0.0)
    components = _orient(components, data.net_movement())
    projections = np.concatenate([block @ components.T for block in data.row_blocks()])
    total = variances.sum()
    return PCAResult(
        components=components,
        explained_variance=variances,
        explained_variance_ratio=variances / total
        if total > 0
        else np.zeros_like(variances),
        mean=mean,
        projections=projections,
    )


def _orient(components: np.ndarray, movement: np.ndarray) -> np.ndarray:
    """Flip each component to point along the net movement (largest entry positive on ties)."""
    signs = np.sign(components @ movement)
    largest = components[
        np.arange(len(components)), np.argmax(np.abs(components), axis=1)
    ]
    signs = np.where(signs == 0, np.sign(largest), signs)
    return components * signs[:, None]
