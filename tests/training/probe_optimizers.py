"""Curvature optimizers for testing the train step: plain SGD that records what it got.

``HVPProbe`` asks for ``H·1`` over all its variables and ``StatisticsProbe`` for
the output gradients of Dense layers. Both update with plain SGD
(``w -= lr * g``), so a model trained with them must follow exactly the
trajectory of ``keras.optimizers.SGD(momentum=0)`` under Keras' own step: any
difference in the loss, sample weights, metrics or gradients that the tfcurv
step computes shows up as a difference in weights or logs.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfcurv.optimizers.curvature_optimizer import CurvatureOptimizer


class _PlainSGD(CurvatureOptimizer):
    def update_step(self, gradient, variable, learning_rate):
        self.assign_sub(
            variable,
            tf.cast(learning_rate, variable.dtype) * tf.cast(gradient, variable.dtype),
        )


class HVPProbe(_PlainSGD):
    """Stores ``H·1`` (all-ones vector on every variable) of each step in ``products``."""

    needs_hessian_vector_products = True

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.products = [
            self.add_variable(v.shape, dtype="float32", name="hv_probe")
            for v in var_list
        ]

    def compute_curvature(self, context):
        ones = [tf.ones(v.shape, v.dtype) for v in context.variables]
        products = context.hessian_vector_product(ones, context.variables)
        return [tf.cast(p, "float32") for p in products], ["sum"] * len(products)

    def store_curvature(self, values):
        for slot, value in zip(self.products, values):
            slot.assign(value)


class StatisticsProbe(_PlainSGD):
    """Stores, per Dense layer, the column sums of its squared output gradient
    and the column means of its squared input (slots made from the Dense
    kernels, in order)."""

    statistics_layer_types = (keras.layers.Dense,)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.stored = []
        for kernel in (v for v in var_list if len(v.shape) == 2):
            self.stored.append(self.add_variable((kernel.shape[1],), name="dz_sum"))
            self.stored.append(self.add_variable((kernel.shape[0],), name="x_mean"))

    def compute_curvature(self, context):
        values, reductions = [], []
        for statistics in context.layer_statistics:
            values.append(tf.reduce_sum(tf.square(statistics.output_gradients), 0))
            values.append(tf.reduce_mean(tf.square(statistics.inputs), 0))
            reductions += ["sum", "mean"]
        return values, reductions

    def store_curvature(self, values):
        for slot, value in zip(self.stored, values):
            slot.assign(tf.cast(value, slot.dtype))
