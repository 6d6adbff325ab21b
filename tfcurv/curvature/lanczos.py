"""Extreme eigenpairs and Lanczos quadrature of a symmetric operator known by products.

* :func:`top_eigenpairs`: thick-restart Lanczos (Wu & Simon 2000). It keeps at
  most ``basis_size`` vectors (default ``max(top_n + 10, 20)``, capped at the
  dimension), so its memory does not grow with the number of products: when
  the basis is full it is compressed to the best ``keep`` Ritz vectors plus
  the residual direction, and the recurrence goes on from there.
* :func:`lanczos_tridiagonal`: the plain recurrence for quadrature (spectral
  densities). Without re-orthogonalisation it holds three vectors; the Gauss
  quadrature it defines stays accurate in floating point even after the basis
  has lost orthogonality (Knizhnerman 1996; Golub & Meurant, *Matrices,
  Moments and Quadrature*, 2010, ch. 4), which is why the spectral-density
  literature uses it this way. ``reorthogonalize=True`` stores the basis.
* :func:`power_iteration`: the deflated power method PyHessian uses (kept for
  parity with it).

The recurrences run in float64 whatever the operator's dtype: a float32
operator's products are cast up, and its inputs cast down, so rounding in the
recurrence does not limit the accuracy (a float32 recurrence stalls near 1e-6
relative). Vectors are flat ``tf.Tensor`` s; ``matvec`` maps one flat vector to
another; ``on_product`` (optional) is called once per product, for progress.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tfcurv.curvature import vectors as vec

MatVec = Callable[[tf.Tensor], tf.Tensor]


def default_basis_size(top_n: int, size: int) -> int:
    """The thick-restart basis size used unless one is given."""
    return min(size, max(top_n + 10, 20))


def _orthogonalise(w: tf.Tensor, basis: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``w`` minus its projection on the rows of ``basis`` (classical Gram-Schmidt,
    done twice for stability), and the projection's coefficients."""
    coefficients = tf.zeros(basis.shape[:1], w.dtype)
    for _ in range(2):
        step = tf.linalg.matvec(basis, w)
        w = w - tf.linalg.matvec(basis, step, transpose_a=True)
        coefficients += step
    return w, coefficients


def _product(matvec: MatVec, q: tf.Tensor, dtype, on_product) -> tf.Tensor:
    w = tf.cast(matvec(tf.cast(q, dtype)), tf.float64)
    if on_product is not None:
        on_product()
    return w


def _row_blocks(rows: list, size: int):
    """``(first, last, block)``: the rows' entries ``[first, last)`` stacked into
    one float64 ``(len(rows), last - first)`` block of at most 32 MiB."""
    step = max(1, 2**22 // len(rows))
    for first in range(0, size, step):
        last = min(first + step, size)
        yield first, last, tf.cast(tf.stack([r[first:last] for r in rows]), tf.float64)


def _orthogonalise_rows(w: tf.Tensor, rows: list) -> tuple[tf.Tensor, np.ndarray]:
    """:func:`_orthogonalise` against a list of rows (stored in any dtype, used
    in float64 a column block at a time: no stacked copy of the basis). The
    second pass runs only when the first cancelled much of ``w`` (the DGKS
    criterion, ``||w'|| < 0.7 ||w||``)."""
    size = int(w.shape[0])
    total = np.zeros(len(rows))
    norm = float(tf.norm(w))
    for sweep in range(2):
        if sweep == 1:
            previous, norm = norm, float(tf.norm(w))
            if norm >= 0.7 * previous:
                break
        coefficients = tf.zeros([len(rows)], tf.float64)
        for first, last, block in _row_blocks(rows, size):
            coefficients += tf.linalg.matvec(block, w[first:last])
        pieces = [
            w[first:last] - tf.linalg.matvec(block, coefficients, transpose_a=True)
            for first, last, block in _row_blocks(rows, size)
        ]
        w = tf.concat(pieces, axis=0)
        total += coefficients.numpy()
    return w, total


def top_eigenpairs(
    matvec: MatVec,
    size: int,
    dtype,
    top_n: int,
    tol: float,
    max_iter: int,
    seed: int,
    basis_size: int | None = None,
    on_product: Callable[[], None] | None = None,
) -> tuple[np.ndarray, tf.Tensor, int]:
    """The ``top_n`` largest algebraic eigenpairs (values descending).

    Converged when every wanted Ritz pair has residual norm ``||A y - theta y||``
    at most ``tol`` times the largest Ritz magnitude. At most ``max_iter``
    products. The basis is at most ``basis_size`` vectors stored in ``dtype``
    (a restart holds the kept combinations besides them for a moment); the
    recurrence's coefficients, orthogonalisation and Ritz values are computed
    in float64. Returns values, eigenvectors (rows, in ``dtype``) and the
    number of products used.
    """
    dtype = tf.as_dtype(dtype)
    capacity = default_basis_size(top_n, size) if basis_size is None else basis_size
    capacity = min(max(capacity, top_n + 2), size)
    keep = min(capacity - 1, top_n + (capacity - top_n) // 2)
    start = tf.cast(vec.random_flat(size, vec.seed_pair(seed), dtype), tf.float64)
    rows = [tf.cast(start / tf.norm(start), dtype)]
    del start
    projected = np.zeros((capacity, capacity))
    products = 0
    scale = np.finfo(np.float64).tiny

    def combine(weights):  # (len(rows), k) -> k vectors in `dtype`
        weights_t = tf.constant(weights.T)
        pieces = [[] for _ in range(weights.shape[1])]
        for _, _, block in _row_blocks(rows, size):
            combined = tf.cast(tf.matmul(weights_t, block), dtype)
            for index in range(len(pieces)):
                pieces[index].append(combined[index])
        return [tf.concat(piece, axis=0) for piece in pieces]

    while True:
        count = len(rows)
        w = _product(matvec, rows[-1], dtype, on_product)
        products += 1
        w, column = _orthogonalise_rows(w, rows)
        projected[:count, count - 1] = projected[count - 1, :count] = column
        beta = float(tf.norm(w))
        values, vectors = np.linalg.eigh(projected[:count, :count])
        scale = max(scale, float(np.max(np.abs(values))), beta)
        wanted = np.argsort(values)[::-1][: min(top_n, count)]
        residuals = np.abs(beta * vectors[-1, wanted])
        converged = len(wanted) == top_n and bool(
            np.all(residuals <= tol * np.max(np.abs(values)))
        )
        invariant = beta <= 1e-12 * scale
        if converged or invariant or products >= max_iter or count == size:
            ritz = tf.stack(combine(vectors[:, wanted]))
            return values[wanted], ritz, products
        if count == capacity:
            # Thick restart: the best `keep` Ritz vectors span the new basis; the
            # residual direction couples to each of them by beta * (last row).
            kept = np.argsort(values)[::-1][:keep]
            rows = combine(vectors[:, kept])
            projected[:] = 0.0
            projected[np.arange(keep), np.arange(keep)] = values[kept]
            coupling = beta * vectors[-1, kept]
            projected[keep, :keep] = projected[:keep, keep] = coupling
        rows.append(tf.cast(w / beta, dtype))


def lanczos_tridiagonal(
    matvec: MatVec,
    start: tf.Tensor,
    num_iter: int,
    reorthogonalize: bool = False,
    on_product: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``num_iter`` Lanczos steps from ``start``: the tridiagonal's
    diagonal ``alphas`` and off-diagonal ``betas`` (one shorter).

    Stops early when the Krylov space becomes invariant (``beta`` below 1e-12
    of the operator scale seen so far). Holds three vectors, or ``num_iter``
    with ``reorthogonalize=True`` (full re-orthogonalisation).
    """
    dtype = start.dtype
    q = tf.cast(start, tf.float64)
    q = q / tf.norm(q)
    previous = tf.zeros_like(q)
    basis = q[None] if reorthogonalize else None
    alphas, betas, beta, scale = [], [], 0.0, np.finfo(np.float64).tiny
    while True:
        w = _product(matvec, q, dtype, on_product)
        alpha = float(tf.tensordot(q, w, 1))
        alphas.append(alpha)
        w = w - alpha * q - beta * previous
        if basis is not None:
            w, _ = _orthogonalise(w, basis)
        beta = float(tf.norm(w))
        scale = max(scale, abs(alpha), beta)
        if beta <= 1e-12 * scale or len(alphas) >= num_iter:
            return np.asarray(alphas), np.asarray(betas)
        betas.append(beta)
        previous, q = q, w / beta
        if basis is not None:
            basis = tf.concat([basis, q[None]], axis=0)


def lanczos_tridiagonal_in_graph(
    product: MatVec, start: tf.Tensor, num_iter: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`lanczos_tridiagonal` without re-orthogonalisation, as TensorFlow ops.

    For a ``tf.function`` in which ``product`` reuses one forward pass: the
    whole recurrence is one ``tf.while_loop``, so no step returns to Python.
    Returns ``alphas`` (length ``n <= num_iter``) and ``betas`` (``n - 1``),
    float64.
    """
    dtype = start.dtype
    q = tf.cast(start, tf.float64)
    q = q / tf.norm(q)
    alphas = tf.TensorArray(tf.float64, size=num_iter)
    betas = tf.TensorArray(tf.float64, size=num_iter)
    tiny = tf.constant(np.finfo(np.float64).tiny, tf.float64)

    def body(step, q, previous, beta, scale, alphas, betas, done):
        w = tf.cast(product(tf.cast(q, dtype)), tf.float64)
        alpha = tf.tensordot(q, w, 1)
        w = w - alpha * q - beta * previous
        new_beta = tf.norm(w)
        scale = tf.maximum(scale, tf.maximum(tf.abs(alpha), new_beta))
        done = (new_beta <= 1e-12 * scale) | (step + 1 >= num_iter)
        next_q = tf.where(done, q, w / tf.where(done, tf.ones_like(new_beta), new_beta))
        return (step + 1, next_q, q, new_beta, scale, alphas.write(step, alpha),
                betas.write(step, new_beta), done)  # fmt: skip

    zero = tf.constant(0.0, tf.float64)
    step, *_, alphas, betas, _ = tf.while_loop(
        lambda step, *rest: tf.logical_not(rest[-1]),
        body,
        (tf.constant(0), q, tf.zeros_like(q), zero, tiny, alphas, betas,
         tf.constant(False)),
    )  # fmt: skip
    return alphas.stack()[:step], betas.stack()[: step - 1]


def tridiagonal_eigh(alphas, betas) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the symmetric tridiagonal matrix (ascending values)."""
    matrix = np.diag(np.asarray(alphas, dtype=np.float64))
    off = np.asarray(betas, dtype=np.float64)
    if off.size:
        matrix += np.diag(off, k=1) + np.diag(off, k=-1)
    return np.linalg.eigh(matrix)


def power_iteration(
    matvec: MatVec,
    size: int,
    dtype,
    top_n: int,
    tol: float,
    max_iter: int,
    seed: int,
    on_product: Callable[[], None] | None = None,
) -> tuple[np.ndarray, tf.Tensor, int]:
    """Deflated power iteration as in PyHessian: the ``top_n`` largest-|λ| eigenpairs.

    Each pair starts from a fresh random vector kept orthogonal to the pairs
    found before; it stops when the Rayleigh quotient changes by less than
    ``tol`` relative. Values are returned in descending (algebraic) order.
    Holds ``top_n + 2`` vectors.
    """
    found_values, found_vectors, products = [], [], 0
    for index in range(top_n):
        v = vec.random_flat(size, vec.seed_pair(seed, index), dtype, "gaussian")
        eigenvalue = None
        for _ in range(max_iter):
            if found_vectors:
                v, _ = _orthogonalise(v, tf.stack(found_vectors))
            v = v / tf.norm(v)
            hv = matvec(v)
            if on_product is not None:
                on_product()
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
            v, _ = _orthogonalise(v, tf.stack(found_vectors))
        found_values.append(eigenvalue)
        found_vectors.append(v / tf.norm(v))
    order = np.argsort(found_values)[::-1]
    return (
        np.asarray(found_values)[order],
        tf.gather(tf.stack(found_vectors), order),
        products,
    )
