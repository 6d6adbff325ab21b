"""Traces of a symmetric operator known through products.

* :func:`hutchinson`: mean of ``v^T A v`` over Rademacher ``v`` (unbiased;
  variance ``2 sum_{i != j} A_ij^2`` per sample). Memory: one block of
  probes, whatever the sample count.
* :func:`hutch_plus_plus`: Meyer, Musco, Musco & Woodruff (2021): the trace of
  ``A`` on a sketched top subspace exactly, plus Hutchinson on the rest; far
  lower variance when the spectrum decays. Uses exactly ``num_samples``
  products; holds the sketch (``num_samples // 3`` vectors, twice: the
  products and their orthonormal basis) plus one block of probes.
* exact traces come from the exact diagonal (:mod:`tfcurv.curvature.diagonal`).
"""

from __future__ import annotations

import tensorflow as tf

from tfcurv.curvature import vectors as vec
from tfcurv.curvature.diagonal import MatMat


def _sum_of_forms(matmat: MatMat, blocks) -> tf.Tensor:
    """``sum v^T A v`` over the rows ``v`` of every block."""
    total = None
    for block in blocks:
        forms = tf.reduce_sum(block * matmat(block))
        total = forms if total is None else total + forms
    return total


def hutchinson(matmat: MatMat, size: int, dtype, num_samples: int, seed: int) -> float:
    blocks = vec.rademacher_chunks(num_samples, size, seed, dtype)
    return float(_sum_of_forms(matmat, blocks)) / num_samples


def hutch_plus_plus(
    matmat: MatMat, size: int, dtype, num_samples: int, seed: int
) -> float:
    """Hutch++ with ``num_samples >= 3`` products (a third each for sketch, basis, residual)."""
    if num_samples < 3:
        raise ValueError(
            "Argument `num_samples` must be at least 3 for hutch++. "
            f"Received: num_samples={num_samples}"
        )
    sketch_size = num_samples // 3
    sketched = tf.concat(
        [matmat(b) for b in vec.rademacher_chunks(sketch_size, size, seed, dtype)],
        axis=0,
    )
    basis_t = tf.transpose(tf.linalg.qr(tf.transpose(sketched))[0])  # (k, P)
    del sketched
    rows = vec.chunk_rows(size, dtype)
    top_part = _sum_of_forms(
        matmat, (basis_t[i : i + rows] for i in range(0, sketch_size, rows))
    )
    residual_count = num_samples - 2 * sketch_size

    def residual_blocks():
        for probes in vec.rademacher_chunks(
            residual_count, size, seed, dtype, salt=2**20
        ):
            yield probes - tf.matmul(tf.matmul(probes, basis_t, transpose_b=True), basis_t)

    residual = _sum_of_forms(matmat, residual_blocks()) / residual_count
    return float(top_part + residual)
