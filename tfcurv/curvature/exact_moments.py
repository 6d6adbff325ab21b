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

This is the one place where tfcurv replaces a TensorFlow symbol, and it does so
only where it is needed: TF's nightly builds of 2.22 compute the variance in a
form whose second derivatives are exact, and there
:func:`stock_moments_are_exact` is true and the context changes nothing. The test
``tests/curvature/test_exact_moments.py`` checks on every TF/Keras version that
the replacement is active exactly when the stock layers give wrong second
derivatives, and that the Hessian then matches the PyTorch reference.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Iterator

import numpy as np
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


@functools.cache
def stock_moments_are_exact() -> bool:
    """Whether this TensorFlow's own ``tf.nn.moments`` has exact second derivatives.

    Compares one Hessian-vector product of the variance of a small float64
    vector under ``tf.nn.moments`` and under :func:`moments`, once per process.
    It runs in a fresh thread because TensorFlow keeps function tracing and
    gradient tapes per thread: there it executes eagerly with recording tapes
    even when first asked while a ``tf.function`` is being traced.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        stock, exact = (
            pool.submit(_variance_hessian_vector_product, fn).result()
            for fn in (_STOCK_MOMENTS, moments)
        )
    return bool(np.max(np.abs(stock - exact)) <= 1e-12 * np.max(np.abs(exact)))


def _variance_hessian_vector_product(moments_fn) -> np.ndarray:
    x = tf.constant([[0.5, -1.0, 2.0, 0.25]], tf.float64)
    direction = tf.constant([[1.0, 0.0, -2.0, 0.5]], tf.float64)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            _, variance = moments_fn(x, axes=[1])
        directional = tf.reduce_sum(inner.gradient(variance, x) * direction)
    return outer.gradient(directional, x).numpy()


@contextlib.contextmanager
def exact_second_derivatives() -> Iterator[None]:
    """Within this context, normalisation layers have exact second derivatives.

    Only the *tracing* (or eager execution) of the forward pass needs to happen
    inside the context; the gradient graph built from it stays exact afterwards.
    Re-entrant and thread-safe (MirroredStrategy traces replicas in threads).
    Changes nothing where :func:`stock_moments_are_exact`.
    """
    global _active_contexts
    if stock_moments_are_exact():
        yield
        return
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
