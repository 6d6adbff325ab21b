"""Extreme eigenpairs of a symmetric operator known only through products.

:func:`lanczos` runs the Lanczos recurrence with full re-orthogonalisation (in
float64 if the operator is), :func:`top_eigenpairs` stops it as soon as the
wanted largest algebraic Ritz pairs have converged, and :func:`power_iteration`
is the deflated power method PyHessian uses (kept for parity with it).
Vectors are flat ``tf.Tensor`` s; ``matvec`` maps one flat vector to another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tfcurv.curvature import vectors as vec

MatVec = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass
class LanczosResult:
    """The tridiagonal ``T = Q^T A Q`` after ``len(alphas)`` steps.

    ``basis`` holds the orthonormal Lanczos vectors as rows; ``num_products``
    counts calls of ``matvec``; ``residual`` is the last off-diagonal entry
    ``beta_k`` (zero when an invariant subspace was found).
    """

    alphas: list
    betas: list
    basis: tf.Tensor
    residual: float
    num_products: int

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and the eigenvectors of ``T`` as columns."""
        return tridiagonal_eigh(self.alphas, self.betas)


def tridiagonal_eigh(alphas, betas) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the symmetric tridiagonal matrix (ascending values)."""
    diagonal = tf.constant(np.asarray(alphas, dtype=np.float64))
    off = np.asarray(betas, dtype=np.float64)
    matrix = tf.linalg.diag(diagonal)
    if off.size:
        matrix += tf.linalg.diag(off, k=1) + tf.linalg.diag(off, k=-1)
    values, vectors = tf.linalg.eigh(matrix)
    return values.numpy(), vectors.numpy()


def _orthogonalise(w: tf.Tensor, basis: tf.Tensor) -> tf.Tensor:
    """Classical Gram-Schmidt against the rows of ``basis``, done twice (stable)."""
    for _ in range(2):
        w = w - tf.linalg.matvec(basis, tf.linalg.matvec(basis, w), transpose_a=True)
    return w


def lanczos(
    matvec: MatVec,
    start: tf.Tensor,
    num_iter: int,
    converged: Callable[[LanczosResult], bool] | None = None,
) -> LanczosResult:
    """Up to ``num_iter`` Lanczos steps from ``start`` with full re-orthogonalisation.

    Stops early when ``converged(result)`` is true or when the Krylov space
    becomes invariant (``beta`` below 1e-12 of the operator scale seen so far).
    """
    q = start / tf.norm(start)
    rows, alphas, betas = [q], [], []
    scale = 0.0
    beta = 0.0
    while True:
        w = matvec(q)
        alpha = float(tf.tensordot(q, w, 1))
        alphas.append(alpha)
        basis = tf.stack(rows)
        w = _orthogonalise(w, basis)
        beta = float(tf.norm(w))
        scale = max(scale, abs(alpha), beta)
        result = LanczosResult(alphas, betas, basis, beta, len(alphas))
        invariant = beta <= 1e-12 * max(scale, np.finfo(np.float64).tiny)
        if invariant or len(alphas) >= num_iter or (converged and converged(result)):
            if invariant:
                result.residual = 0.0
            return result
        betas.append(beta)
        q = w / beta
        rows.append(q)


def top_eigenpairs(
    matvec: MatVec,
    size: int,
    dtype,
    top_n: int,
    tol: float,
    max_iter: int,
    seed: int,
) -> tuple[np.ndarray, tf.Tensor, int]:
    """The ``top_n`` largest algebraic eigenpairs (values descending).

    Converged when every wanted Ritz pair has residual ``|beta_k s_ki|`` at most
    ``tol`` times the largest Ritz magnitude. Returns values, eigenvectors
    (rows) and the number of products used.
    """

    def wanted_converged(result: LanczosResult) -> bool:
        if len(result.alphas) < top_n:
            return False
        values, vectors = result.ritz()
        residuals = np.abs(result.residual * vectors[-1, -top_n:])
        return bool(np.all(residuals <= tol * np.max(np.abs(values))))

    start = vec.random_flat(size, vec.seed_pair(seed), dtype)
    result = lanczos(matvec, start, min(max_iter, size), wanted_converged)
    values, vectors = result.ritz()
    order = np.argsort(values)[::-1][:top_n]
    ritz_vectors = tf.matmul(
        tf.constant(vectors[:, order].T, dtype=result.basis.dtype), result.basis
    )
    return values[order], ritz_vectors, result.num_products


def power_iteration(
    matvec: MatVec,
    size: int,
    dtype,
    top_n: int,
    tol: float,
    max_iter: int,
    seed: int,
) -> tuple[np.ndarray, tf.Tensor, int]:
    """Deflated power iteration as in PyHessian: the ``top_n`` largest-|λ| eigenpairs.

    Each pair starts from a fresh random vector kept orthogonal to the pairs
    found before; it stops when the Rayleigh quotient changes by less than
    ``tol`` relative. Values are returned in descending (algebraic) order.
    """
    found_values, found_vectors, products = [], [], 0
    for index in range(top_n):
        v = vec.random_flat(size, vec.seed_pair(seed, index), dtype, "gaussian")
        eigenvalue = None
        for _ in range(max_iter):
            if found_vectors:
                v = _orthogonalise(v, tf.stack(found_vectors))
            v = v / tf.norm(v)
            hv = matvec(v)
            products += 1
            estimate = float(tf.tensordot(hv, v, 1))
            v = hv
            if eigenvalue is not None and abs(estimate - eigenvalue) <= tol * (
                abs(eigenvalue) + 1e-6
            ):
                eigenvalue = estimate
                break
            eigenvalue = estimate
        if found_vectors:
            v = _orthogonalise(v, tf.stack(found_vectors))
        found_values.append(eigenvalue)
        found_vectors.append(v / tf.norm(v))
    order = np.argsort(found_values)[::-1]
    return (
        np.asarray(found_values)[order],
        tf.gather(tf.stack(found_vectors), order),
        products,
    )
