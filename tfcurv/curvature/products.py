"""Curvature-matrix-vector products as pure TensorFlow functions.

The building block shared by the train step and the analysis tools is
:func:`hessian_vector_product_from_tape`: given an outer ``tf.GradientTape``
that recorded the computation of ``gradients`` (reverse-over-reverse), it returns
``H v`` without another forward pass.

The analysis operators use :func:`hessian_product_fn` (reverse-over-reverse
or forward-over-reverse), :func:`gauss_newton_product_fn` and
:func:`fisher_product_fn` (empirical or sampled-label Fisher): each runs the
forward pass once and returns a function ``v -> A v`` that reuses it, so many
products (in a ``tf.while_loop``, for instance) cost one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from tfcurv._checks import check_choice


def _primals(variables) -> list:
    """The ``tf.Variable`` s behind Keras variables.

    ``ForwardAccumulator`` rejects Keras variables, and ``tape.gradient`` with
    ``UnconnectedGradients.ZERO`` fails on them (their ``dtype`` is a string).
    """
    return [
        getattr(v, "value", v) if isinstance(v, keras.Variable) else v
        for v in variables
    ]


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
        inner_product, _primals(wrt), unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    return [tf.convert_to_tensor(p) for p in products]


LossClosure = Callable[[], tf.Tensor]
OutputsClosure = Callable[[], tf.Tensor]

MODES = ("reverse_over_reverse", "forward_over_reverse")


ProductFn = Callable[[Sequence[tf.Tensor]], list]


def hessian_product_fn(
    loss_fn: LossClosure,
    variables: Sequence[tf.Variable],
    mode: str = "reverse_over_reverse",
) -> ProductFn:
    """A function ``v -> H v``, where ``H`` is the Hessian of ``loss_fn()``.

    ``reverse_over_reverse`` (default) runs the forward pass and the gradient
    pass once, here, and each product is one more backward pass through them
    (the tapes are persistent; in a ``tf.function`` the product may be called
    in a ``tf.while_loop`` body). ``forward_over_reverse`` pushes each vector
    forward through the gradient computation with a
    ``tf.autodiff.ForwardAccumulator``, so each product runs its own forward
    and gradient pass; it does not go through every op (e.g. Keras RNN
    while-loops in graphs).
    """
    check_choice("mode", mode, tuple(MODES))
    primals = _primals(variables)
    if mode == "forward_over_reverse":

        def forward_product(vector):
            tangents = [tf.cast(t, p.dtype) for t, p in zip(vector, primals)]
            with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
                with tf.GradientTape() as tape:
                    loss = loss_fn()
                gradients = tape.gradient(
                    loss, primals, unconnected_gradients=tf.UnconnectedGradients.ZERO
                )
            return [
                accumulator.jvp(g, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                for g in gradients
            ]

        return forward_product
    with tf.GradientTape(persistent=True) as outer_tape:
        with tf.GradientTape() as inner_tape:
            loss = loss_fn()
        gradients = inner_tape.gradient(
            loss, primals, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
    return lambda vector: hessian_vector_product_from_tape(
        outer_tape, gradients, vector, variables
    )


def hessian_vector_products(
    loss_fn: LossClosure,
    variables: Sequence[tf.Variable],
    vectors: Sequence[Sequence[tf.Tensor]],
    mode: str = "reverse_over_reverse",
) -> list[list[tf.Tensor]]:
    """``H v`` for every ``v`` in ``vectors`` (see :func:`hessian_product_fn`)."""
    product = hessian_product_fn(loss_fn, variables, mode)
    return [product(v) for v in vectors]


def _output_hessian_product_fn(loss_of_outputs, outputs):
    """A function ``u -> (d^2 loss / d outputs^2) u`` (``u`` structured like ``outputs``)."""
    flat_outputs = tf.nest.flatten(outputs)
    with tf.GradientTape(persistent=True) as outer_tape:
        outer_tape.watch(flat_outputs)
        with tf.GradientTape() as inner_tape:
            inner_tape.watch(flat_outputs)
            loss = loss_of_outputs(tf.nest.pack_sequence_as(outputs, flat_outputs))
        output_gradients = inner_tape.gradient(loss, flat_outputs)
    return lambda u: hessian_vector_product_from_tape(
        outer_tape, output_gradients, tf.nest.flatten(u), flat_outputs
    )


class _Linearisation:
    """``J v`` and ``J^T u`` of ``outputs_fn`` at the current point, from one forward pass.

    ``J v`` uses the double-VJP identity ``J v = d/du <J^T u, v>`` (reverse mode
    only, so it works through every op that has a gradient of its gradient).
    """

    def __init__(self, outputs_fn: OutputsClosure, variables):
        self.variables = _primals(variables)
        with tf.GradientTape(persistent=True) as self._tape:
            self.outputs = outputs_fn()
        self.flat_outputs = tf.nest.flatten(self.outputs)
        self._dummy = [tf.zeros_like(o) for o in self.flat_outputs]
        with tf.GradientTape(persistent=True) as self._dual_tape:
            self._dual_tape.watch(self._dummy)
            self._transposed = self.transpose_product(self._dummy)

    def transpose_product(self, output_vectors) -> list[tf.Tensor]:
        """``J^T u`` (zeros for variables the outputs do not depend on)."""
        return self._tape.gradient(
            self.flat_outputs,
            self.variables,
            output_gradients=list(output_vectors),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    def product(self, vector) -> list[tf.Tensor]:
        """``J v`` as a flat list shaped like the outputs."""
        with self._dual_tape:
            inner = tf.add_n(
                [
                    tf.reduce_sum(g * tf.cast(v, g.dtype))
                    for g, v in zip(self._transposed, vector)
                ]
            )
        return self._dual_tape.gradient(
            inner, self._dummy, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )


def gauss_newton_product_fn(
    outputs_fn: OutputsClosure,
    loss_of_outputs: Callable[[tf.Tensor], tf.Tensor],
    variables: Sequence[tf.Variable],
) -> ProductFn:
    """A function ``v -> J^T (d^2 loss/d outputs^2) J v``: the generalised
    Gauss-Newton matrix times ``v``, from one forward pass made here.

    ``J`` is the Jacobian of ``outputs_fn()`` with respect to ``variables``. For
    losses convex in the outputs (cross-entropy from logits, squared error) the
    result is positive semi-definite.
    """
    linearisation = _Linearisation(outputs_fn, variables)
    output_curvature = _output_hessian_product_fn(
        loss_of_outputs, linearisation.outputs
    )

    def product(vector):
        jv = tf.nest.pack_sequence_as(
            linearisation.outputs, linearisation.product(vector)
        )
        return linearisation.transpose_product(output_curvature(jv))

    return product


def gauss_newton_vector_products(
    outputs_fn: OutputsClosure,
    loss_of_outputs: Callable[[tf.Tensor], tf.Tensor],
    variables: Sequence[tf.Variable],
    vectors: Sequence[Sequence[tf.Tensor]],
) -> list[list[tf.Tensor]]:
    """:func:`gauss_newton_product_fn` applied to every vector of ``vectors``."""
    product = gauss_newton_product_fn(outputs_fn, loss_of_outputs, variables)
    return [product(v) for v in vectors]


def fisher_product_fn(
    outputs_fn: OutputsClosure,
    per_example_output_gradients: Callable[[tf.Tensor], tf.Tensor],
    variables: Sequence[tf.Variable],
) -> ProductFn:
    """A function ``v -> (1/N) sum_n J_n^T e_n e_n^T J_n v``: a Fisher matrix in
    output space, times ``v``, from one forward pass made here.

    ``per_example_output_gradients(outputs)`` returns ``e`` of shape
    ``(N, ...)`` with row ``n`` the gradient of example ``n``'s loss with respect
    to its outputs: with the observed labels this gives the empirical Fisher,
    with labels sampled from the model's predictive distribution the (Monte
    Carlo) Fisher. Examples are treated as independent (exact without
    batch-coupling layers such as BatchNormalization in training mode).
    """
    linearisation = _Linearisation(outputs_fn, variables)
    if len(linearisation.flat_outputs) != 1:
        raise ValueError(
            "Fisher products need a model with one output tensor, got "
            f"{len(linearisation.flat_outputs)}"
        )
    (outputs,) = linearisation.flat_outputs
    e = tf.stop_gradient(per_example_output_gradients(outputs))
    count = tf.cast(tf.shape(e)[0], e.dtype)
    reduce_axes = list(range(1, len(e.shape)))

    def product(vector):
        (jv,) = linearisation.product(vector)
        per_example = tf.reduce_sum(e * jv, axis=reduce_axes, keepdims=True)
        return linearisation.transpose_product([e * per_example / count])

    return product
