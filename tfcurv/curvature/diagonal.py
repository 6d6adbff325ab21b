"""Diagonals of a symmetric operator known through products.

``matmat(V)`` returns the products with the rows of ``V`` (shape ``(k, P)``).
:func:`exact` uses one product per coordinate (unit vectors, in chunks);
:func:`hutchinson_samples` gives the single-sample estimates ``v * (A v)``
with Rademacher ``v`` (unbiased; variance ``sum_{j != i} A_ij^2``).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tfcurv.curvature import vectors as vec

MatMat = Callable[[tf.Tensor], tf.Tensor]
CHUNK = 64


def exact(matmat: MatMat, size: int, dtype, chunk: int = CHUNK) -> tf.Tensor:
    """``diag(A)`` from ``size`` products with unit vectors."""
    pieces = []
    for start in range(0, size, chunk):
        indices = tf.range(start, min(start + chunk, size))
        rows = matmat(tf.one_hot(indices, size, dtype=dtype))
        pieces.append(tf.gather(rows, indices, axis=1, batch_dims=1))
    return tf.concat(pieces, axis=0)


def hutchinson_samples(
    matmat: MatMat, size: int, dtype, num_samples: int, seed: int, chunk: int = CHUNK
) -> tf.Tensor:
    """``(num_samples, P)`` independent estimates ``v * (A v)`` of ``diag(A)``."""
    pieces = []
    for index, start in enumerate(range(0, num_samples, chunk)):
        count = min(chunk, num_samples - start)
        probes = vec.rademacher([count, size], vec.seed_pair(seed, index), dtype)
        pieces.append(probes * matmat(probes))
    return tf.concat(pieces, axis=0)


def hutchinson(
    matmat: MatMat, size: int, dtype, num_samples: int, seed: int
) -> tf.Tensor:
    """Mean of ``num_samples`` Hutchinson estimates of ``diag(A)``."""
    return tf.reduce_mean(
        hutchinson_samples(matmat, size, dtype, num_samples, seed), axis=0
    )
