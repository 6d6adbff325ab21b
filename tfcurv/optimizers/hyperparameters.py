"""Exact conversion of optimizer hyper-parameters to tensors.

:func:`constant` turns a Python number into a tensor of the variable's dtype
*without* rounding through float32 (``keras.ops.cast(0.9, "float64")`` gives
0.8999999761581421, which moves a float64 trajectory off its reference).
Argument checks live in :mod:`tfcurv._checks`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def constant(value: float, dtype) -> tf.Tensor:
    """``value`` as a scalar tensor of ``dtype``, rounded once, from float64."""
    return tf.constant(np.asarray(value, dtype=np.float64).astype(tf.as_dtype(dtype).as_numpy_dtype))
