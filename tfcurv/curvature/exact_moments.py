"""Second-derivative-exact batch moments for Keras' normalisation layers.

Why this module exists
----------------------
On the TensorFlow backend, Keras' ``BatchNormalization`` (training mode),
``LayerNormalization`` and ``GroupNormalization`` get their statistics from
``tf.nn.moments``, which computes the variance as
``mean((x - stop_gradient(mean))**2)``. The ``stop_gradient`` leaves first
derivatives exact (the derivative of the variance with respect to the mean is
zero), but it drops the second-order terms: every Hessian-vector product through
such a layer is wrong, by 1-25 % on typical models.

:func:`exact_second_derivatives` swaps ``tf.nn.moments`` for a version without
the ``stop_gradient`` while a computation is being traced. Its forward values are
bit-identical to ``tf.nn.moments``; only the gradient graph differs. tfcurv wraps
every forward pass that it differentiates twice in this context, so the stock
layers give exact Hessians.

This is the one place where tfcurv replaces a TensorFlow symbol. The test
``tests/curvature/test_exact_moments.py`` checks on every TF/Keras version that
the replacement is still needed (stock layers still give wrong second
derivatives) and that it still works (the Hessian matches the PyTorch reference).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import tensorflow as tf

_STOCK_MOMENTS = tf.nn.moments
_lock = threading.RLock()
_active_contexts = 0


def moments(x, axes, shift=None, keepdims=False, name=None):
    """``tf.nn.moments`` with the gradient of the mean kept inside the variance.

    Same signature and forward values as ``tf.nn.moments`` (``shift`` is
    ignored there too).
    """
    del shift  # unused by tf.nn.moments as well
    with tf.name_scope(name or "moments"):
        y = tf.cast(x, tf.float32) if x.dtype == tf.float16 else x
        mean = tf.reduce_mean(y, axes, keepdims=True, name="mean")
        variance = tf.reduce_mean(
            tf.math.squared_difference(y, mean), axes, keepdims=True, name="variance"
        )
        if not keepdims:
            mean = tf.squeeze(mean, axes)
            variance = tf.squeeze(variance, axes)
        if x.dtype == tf.float16:
            return tf.cast(mean, tf.float16), tf.cast(variance, tf.float16)
        return mean, variance


@contextlib.contextmanager
def exact_second_derivatives() -> Iterator[None]:
    """Within this context, normalisation layers have exact second derivatives.

    Only the *tracing* (or eager execution) of the forward pass needs to happen
    inside the context; the gradient graph built from it stays exact afterwards.
    Re-entrant and thread-safe (MirroredStrategy traces replicas in threads).
    """
    global _active_contexts
    with _lock:
        if _active_contexts == 0:
            tf.nn.moments = moments
        _active_contexts += 1
    try:
        yield
    finally:
        with _lock:
            _active_contexts -= 1
            if _active_contexts == 0:
                tf.nn.moments = _STOCK_MOMENTS
