"""Spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017).

Each run starts Lanczos from a normalised Rademacher vector ``v``; the Ritz
values ``theta_j`` and weights ``w_j = s_{0j}^2`` (squared first components of
the tridiagonal's eigenvectors) form a quadrature rule with
``sum_j w_j f(theta_j) ~ v^T f(A) v / ||v||^2``, whose mean over runs
estimates the normalised spectral measure ``(1/P) sum_i delta(lambda_i)``.
:meth:`SpectralDensity.smoothed` turns it into a density with Gaussian kernels
(as PyHessian does) and :meth:`SpectralDensity.plot` draws it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcurv._checks import check_range
from tfcurv.curvature import lanczos as lanczos_lib
from tfcurv.curvature import vectors as vec


@dataclasses.dataclass
class SpectralDensity:
    """Quadrature nodes and weights, one row per run (``num_runs, num_iter``)."""

    nodes: np.ndarray
    weights: np.ndarray

    def smoothed(
        self,
        grid: np.ndarray | None = None,
        sigma: float | None = None,
        num_points: int = 1000,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(grid, density)``: the weights spread by Gaussians of width ``sigma``.

        Defaults: ``sigma`` = 1 % of the node range, the grid spans the nodes
        plus 5 ``sigma``. The density integrates to 1 over the real line.
        """
        low, high = float(np.min(self.nodes)), float(np.max(self.nodes))
        if sigma is None:
            sigma = max(0.01 * (high - low), 1e-12 + 1e-3 * max(abs(low), abs(high)))
        check_range("sigma", sigma, 0.0, low_inclusive=False)
        if grid is None:
            grid = np.linspace(low - 5 * sigma, high + 5 * sigma, num_points)
        grid = np.asarray(grid, dtype=np.float64)
        kernels = np.exp(
            -0.5 * ((grid[:, None] - self.nodes.ravel()[None]) / sigma) ** 2
        )
        kernels /= sigma * np.sqrt(2 * np.pi)
        density = kernels @ self.weights.ravel() / self.nodes.shape[0]
        return grid, density

    def plot(
        self, ax=None, sigma: float | None = None, log: bool = True, **line_kwargs
    ):
        """Draw the smoothed density on a matplotlib axis (created if ``None``)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots()
        grid, density = self.smoothed(sigma=sigma)
        ax.plot(grid, density, **line_kwargs)
        # Explicit limits: autoscaling a log axis over kernel tails of 1e-300
        # puts the top decades above the peak.
        peak = max(float(density.max()), np.finfo(float).tiny)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(peak * 1e-8, peak * 2)
        else:
            ax.set_ylim(0, peak * 1.05)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


def stochastic_lanczos_quadrature(
    matvec,
    size: int,
    dtype,
    num_iter: int,
    num_runs: int,
    seed: int,
    reorthogonalize: bool = False,
    on_product=None,
    tridiagonal=None,
) -> SpectralDensity:
    """``num_runs`` Lanczos runs of at most ``num_iter`` steps each.

    Each run holds three vectors (``num_iter`` with ``reorthogonalize=True``,
    which stores the basis and re-orthogonalises every step against it).
    ``tridiagonal(start, num_iter)`` (optional) runs a whole recurrence
    without re-orthogonalisation at once, in place of ``matvec``'s steps.
    """
    nodes, weights = [], []
    for run in range(num_runs):
        start = vec.random_flat(size, vec.seed_pair(seed, run), dtype)
        if tridiagonal is not None and not reorthogonalize:
            alphas, betas = tridiagonal(start, min(num_iter, size))
        else:
            alphas, betas = lanczos_lib.lanczos_tridiagonal(
                matvec, start, min(num_iter, size), reorthogonalize, on_product
            )
        values, vectors = lanczos_lib.tridiagonal_eigh(alphas, betas)
        padding = num_iter - len(values)  # an invariant subspace ends a run early
        nodes.append(np.pad(values, (0, padding), constant_values=values[-1]))
        weights.append(np.pad(vectors[0] ** 2, (0, padding)))
    return SpectralDensity(np.stack(nodes), np.stack(weights))
