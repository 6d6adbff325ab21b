"""Traces of a symmetric operator known through products.

* :func:`hutchinson`: mean of ``v^T A v`` over Rademacher ``v`` (unbiased).
* :func:`hutch_plus_plus`: Meyer, Musco, Musco & Woodruff (2021): the trace of
  ``A`` on a sketched top subspace exactly, plus Hutchinson on the rest; far
  lower variance when the spectrum decays. Uses exactly ``num_samples``
  products.
* exact traces come from the exact diagonal (:mod:`tfcurv.curvature.diagonal`).
"""

from __future__ import annotations

import tensorflow as tf

from tfcurv.curvature import vectors as vec
from tfcurv.curvature.diagonal import CHUNK, MatMat


def _quadratic_forms(matmat: MatMat, probes: tf.Tensor) -> tf.Tensor:
    """``v^T A v`` for every row ``v`` of ``probes``."""
    forms = [
        tf.reduce_sum(chunk * matmat(chunk), axis=1)
        for chunk in (
            probes[i : i + CHUNK] for i in range(0, int(probes.shape[0]), CHUNK)
        )
    ]
    return tf.concat(forms, axis=0)


def hutchinson(matmat: MatMat, size: int, dtype, num_samples: int, seed: int) -> float:
    probes = vec.rademacher([num_samples, size], vec.seed_pair(seed), dtype)
    return float(tf.reduce_mean(_quadratic_forms(matmat, probes)))


def hutch_plus_plus(
    matmat: MatMat, size: int, dtype, num_samples: int, seed: int
) -> float:
    """Hutch++ with ``num_samples >= 3`` products (a third each for sketch, basis, residual)."""
    if num_samples < 3:
        raise ValueError(
            f"num_samples must be at least 3 for hutch++, got {num_samples}"
        )
    sketch_size = num_samples // 3
    sketch = vec.rademacher([sketch_size, size], vec.seed_pair(seed, 0), dtype)
    basis, _ = tf.linalg.qr(tf.transpose(matmat(sketch)))  # (P, k) orthonormal
    basis_t = tf.transpose(basis)
    top_part = tf.reduce_sum(basis_t * matmat(basis_t))
    residual_count = num_samples - 2 * sketch_size
    probes = vec.rademacher([residual_count, size], vec.seed_pair(seed, 1), dtype)
    probes -= tf.matmul(tf.matmul(probes, basis), basis_t)
    return float(top_part + tf.reduce_mean(_quadratic_forms(matmat, probes)))
