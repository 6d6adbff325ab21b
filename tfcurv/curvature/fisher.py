"""``Fisher``: empirical and sampled-label Fisher matrices of a Keras model's loss.

Both are ``(1/N) sum_n g_n g_n^T`` with ``g_n`` the gradient of example ``n``'s
loss, computed as ``J_n^T e_n`` (``e_n``: the gradient of that loss with respect
to the example's outputs), so a product costs one forward pass and three
backward passes, like a Gauss-Newton product:

* ``kind="empirical"``: ``g_n`` at the observed labels (any loss);
* ``kind="sampled"``: ``g_n`` at labels drawn from the model's own predictive
  distribution (softmax cross-entropy and sigmoid binary cross-entropy from
  logits, mean squared error as a Gaussian likelihood). Its expectation over the
  draws is the Gauss-Newton matrix; one draw per example and operator (fixed by
  ``seed`` and the batch's position in ``data``), so the operator is one fixed
  symmetric matrix.

The loss must average over the batch (Keras' default reduction) and
``sample_weight`` is refused: a weighted "per-example gradient" has no single
meaning. In ``training=True`` mode ``g_n`` is the gradient of example ``n``'s
loss through the whole batch's forward pass (batch statistics included).
"""

from __future__ import annotations

import tensorflow as tf

from tfcurv._checks import check_choice, check_seed
from tfcurv.curvature import losses as losses_lib
from tfcurv.curvature import products
from tfcurv.curvature.operators import OutputSpaceOperator

KINDS = ("empirical", "sampled")


def sample_targets(kind: losses_lib.LossKind, logits: tf.Tensor, seed: tf.Tensor):
    """Targets drawn from the predictive distribution the loss is the likelihood of.

    Softmax cross-entropy: a class per example (integers if ``kind.sparse``,
    else one-hot); sigmoid cross-entropy: a Bernoulli draw per output; squared
    error: ``logits + sqrt(C/2) * N(0, 1)`` (the Gaussian whose negative
    log-likelihood is the squared error averaged over the ``C`` outputs, up to
    a constant; its Fisher equals the loss' output Hessian ``(2/C) I``).
    """
    if kind.name == "softmax_crossentropy":
        classes = logits.shape[-1]
        flat = tf.reshape(logits, [-1, classes])
        drawn = tf.random.stateless_categorical(flat, 1, seed)[:, 0]
        labels = tf.reshape(drawn, tf.shape(logits)[:-1])
        return labels if kind.sparse else tf.one_hot(labels, classes, dtype=logits.dtype)
    if kind.name == "sigmoid_crossentropy":
        uniform = tf.random.stateless_uniform(tf.shape(logits), seed, dtype=logits.dtype)
        return tf.cast(uniform < tf.sigmoid(logits), logits.dtype)
    classes = tf.cast(tf.shape(logits)[-1], logits.dtype)
    noise = tf.random.stateless_normal(tf.shape(logits), seed, dtype=logits.dtype)
    return logits + tf.sqrt(classes / 2) * noise


def _likelihood_scale(kind: losses_lib.LossKind, logits: tf.Tensor) -> tf.Tensor:
    """Factor turning the loss' output gradient into the log-likelihood's.

    Keras' binary cross-entropy averages the ``C`` per-output likelihood terms,
    so its gradient outer products carry ``1/C^2`` where the output Hessian has
    ``1/C``: scaling the gradient by ``sqrt(C)`` makes the expectation match.
    """
    if kind.name == "sigmoid_crossentropy":
        return tf.sqrt(tf.cast(tf.shape(logits)[-1], logits.dtype))
    return tf.constant(1, logits.dtype)


class Fisher(OutputSpaceOperator):
    """A Fisher matrix ``(1/N) sum_n g_n g_n^T`` of the mean loss (see module docs).

    Takes the arguments of :class:`~tfcurv.curvature.operators.CurvatureOperator`
    (``mode`` must stay ``"reverse_over_reverse"``) and

    Args:
        kind: ``"empirical"`` (observed labels, default) or ``"sampled"``
            (labels drawn from the model's predictive distribution).
        seed: seed of the sampled labels (``kind="sampled"``).

    Model regularisation losses add their exact Hessian, as for
    :class:`~tfcurv.GaussNewton`.
    """

    def __init__(self, *args, kind: str = "empirical", seed: int = 0, **kwargs):
        check_choice("kind", kind, tuple(KINDS))
        check_seed(seed)
        super().__init__(*args, **kwargs)
        self.kind, self.sampling_seed = kind, seed
        reduction = getattr(self.loss, "reduction", None)
        if reduction != "sum_over_batch_size":
            raise ValueError(
                "Fisher needs a loss averaged over the batch "
                f"(reduction='sum_over_batch_size'), got reduction={reduction!r}"
            )
        self.loss_kind = losses_lib.loss_kind(self.loss) if kind == "sampled" else None

    def _output_gradients(self, y, outputs, seed):
        """``e``: row ``n`` is the gradient of example ``n``'s loss in its outputs."""
        scale = tf.constant(1, outputs.dtype)
        if self.kind == "sampled":
            y = sample_targets(self.loss_kind, outputs, seed)
            scale = _likelihood_scale(self.loss_kind, outputs)
        with tf.GradientTape() as tape:
            tape.watch(outputs)
            count = tf.cast(tf.shape(outputs)[0], outputs.dtype)
            summed = count * self._mean_loss(y, outputs)
        return scale * tape.gradient(summed, outputs)

    def _output_space_product_fn(self, outputs_fn, y, sample_weight, seed):
        if sample_weight is not None:
            raise ValueError("Fisher does not support sample_weight in data")
        return products.fisher_product_fn(
            outputs_fn,
            lambda outputs: self._output_gradients(y, outputs, seed),
            self.variables,
        )
