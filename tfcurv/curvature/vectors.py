"""Vectors in parameter space: lists of tensors shaped like a variable list.

Curvature operators act on such lists; the spectral and trace estimators work
on one flat vector (variables flattened in order, C order). This module converts
between the two and draws reproducible random probes with TF's stateless RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

ParameterVector = list  # list[tf.Tensor], one tensor per variable


def sizes(shapes: Sequence[tf.TensorShape]) -> list[int]:
    return [int(np.prod(shape)) for shape in shapes]


def flatten(vectors: Sequence[tf.Tensor]) -> tf.Tensor:
    """One flat vector: every tensor raveled in C order, concatenated."""
    return tf.concat([tf.reshape(v, [-1]) for v in vectors], axis=0)


def unflatten(flat: tf.Tensor, shapes: Sequence[tf.TensorShape]) -> ParameterVector:
    """Inverse of :func:`flatten` for tensors of the given shapes."""
    pieces = tf.split(flat, sizes(shapes))
    return [tf.reshape(p, s) for p, s in zip(pieces, shapes)]


def seed_pair(seed: int, index: int = 0) -> tf.Tensor:
    """A stateless-RNG seed for probe number ``index`` of a run seeded ``seed``."""
    return tf.constant([int(seed), int(index)], dtype=tf.int64)


def rademacher(shape, seed: tf.Tensor, dtype) -> tf.Tensor:
    """Entries +1 or -1 with equal probability (stateless)."""
    bits = tf.random.stateless_uniform(shape, seed, minval=0, maxval=2, dtype=tf.int32)
    return tf.cast(2 * bits - 1, dtype)


def gaussian(shape, seed: tf.Tensor, dtype) -> tf.Tensor:
    return tf.random.stateless_normal(shape, seed, dtype=dtype)


def random_flat(size: int, seed: tf.Tensor, dtype, distribution: str = "rademacher"):
    if distribution == "rademacher":
        return rademacher([size], seed, dtype)
    if distribution == "gaussian":
        return gaussian([size], seed, dtype)
    raise ValueError(
        f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}"
    )


# Estimators send probes in chunks of at most this many bytes per (k, P) block,
# so their memory does not grow with the number of samples.
CHUNK_BYTES = 64 * 2**20
MAX_CHUNK_ROWS = 64


def chunk_rows(size: int, dtype) -> int:
    """Rows of a ``(k, size)`` block of ``dtype`` that fit in :data:`CHUNK_BYTES`
    (at least 1, at most :data:`MAX_CHUNK_ROWS`)."""
    row_bytes = size * tf.as_dtype(dtype).size
    return int(max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(row_bytes, 1))))


def rademacher_chunks(count: int, size: int, seed: int, dtype, salt: int = 0):
    """``count`` Rademacher rows of length ``size`` in blocks of :func:`chunk_rows`
    rows; block ``i`` is drawn from seed ``(seed, salt + i)``."""
    rows = chunk_rows(size, dtype)
    for index, start in enumerate(range(0, count, rows)):
        yield rademacher(
            [min(rows, count - start), size], seed_pair(seed, salt + index), dtype
        )
