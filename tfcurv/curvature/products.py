"""Curvature-matrix-vector products as pure TensorFlow functions.

The building block shared by the train step and the analysis tools is
:func:`hessian_vector_product_from_tape`: given an outer ``tf.GradientTape``
that recorded the computation of ``gradients`` (reverse-over-reverse), it returns
``H v`` without another forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


def hessian_vector_product_from_tape(
    outer_tape: tf.GradientTape,
    gradients: Sequence[tf.Tensor],
    vectors: Sequence[tf.Tensor],
    wrt: Sequence[tf.Variable],
) -> list[tf.Tensor]:
    """``H v`` restricted to ``wrt``, by differentiating ``<gradients, vectors>``.

    Args:
        outer_tape: a tape that was recording while ``gradients`` were computed by
            an inner tape (so the gradients are differentiable).
        gradients: first derivatives of the loss, one per variable.
        vectors: one tensor per gradient, of the same shape (zeros allowed).
        wrt: the variables whose rows of ``H v`` are wanted.

    Returns:
        One tensor per entry of ``wrt``; zeros where the product has no path to it.
    """
    with outer_tape:
        inner_product = tf.add_n(
            [
                tf.reduce_sum(tf.convert_to_tensor(g) * tf.cast(v, g.dtype))
                for g, v in zip(gradients, vectors)
                if g is not None
            ]
        )
    products = outer_tape.gradient(
        inner_product, list(wrt), unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    return [tf.convert_to_tensor(p) for p in products]
