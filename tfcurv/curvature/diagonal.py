"""Diagonals of a symmetric operator known through products.

``matmat(V)`` returns the products with the rows of ``V`` (shape ``(k, P)``).
:func:`exact` uses one product per coordinate (unit vectors, in chunks);
:func:`hutchinson_samples` gives the single-sample estimates ``v * (A v)``
with Rademacher ``v`` (unbiased; variance ``sum_{j != i} A_ij^2``).
Probes go in blocks of :func:`~tfcurv.curvature.vectors.chunk_rows` rows, so
the memory of :func:`exact` and :func:`hutchinson` does not grow with ``P``
products or with the sample count.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tfcurv.curvature import vectors as vec

MatMat = Callable[[tf.Tensor], tf.Tensor]


def exact(matmat: MatMat, size: int, dtype) -> tf.Tensor:
    """``diag(A)`` from ``size`` products with unit vectors."""
    pieces, chunk = [], vec.chunk_rows(size, dtype)
    for start in range(0, size, chunk):
        indices = tf.range(start, min(start + chunk, size))
        rows = matmat(tf.one_hot(indices, size, dtype=dtype))
        pieces.append(tf.gather(rows, indices, axis=1, batch_dims=1))
    return tf.concat(pieces, axis=0)


def hutchinson_samples(
    matmat: MatMat, size: int, dtype, num_samples: int, seed: int
) -> tf.Tensor:
    """``(num_samples, P)`` independent estimates ``v * (A v)`` of ``diag(A)``."""
    return tf.concat(
        [
            probes * matmat(probes)
            for probes in vec.rademacher_chunks(num_samples, size, seed, dtype)
        ],
        axis=0,
    )


def hutchinson(
    matmat: MatMat, size: int, dtype, num_samples: int, seed: int
) -> tf.Tensor:
    """Mean of ``num_samples`` Hutchinson estimates of ``diag(A)``."""
    total = tf.zeros([size], dtype)
    for probes in vec.rademacher_chunks(num_samples, size, seed, dtype):
        total += tf.reduce_sum(probes * matmat(probes), axis=0)
    return total / num_samples
