"""SGD-PH: SGD with a partial Hessian for the channel-wise (1-D) parameters.

Sun et al., "A Novel Optimizer for Deep Neural Networks: SGD with Partial
Hessian". This is the update of the official implementation (``sgdph.py``,
class ``sgdph``), step for step. The model's 1-D trainable variables (biases,
BatchNormalization and LayerNormalization ``gamma``/``beta``), in
``model.trainable_variables`` order, are ``p_1 ... p_M``. At step ``s`` (0, 1,
...), with ``β`` the momentum:

1. ``k = s mod M``: one Hessian-vector product with the all-ones tangent on
   ``p_k`` only gives ``h = |H_kk·1|``, the row sums of ``p_k``'s own Hessian
   block with the sign removed (not the diagonal);
2. every variable: ``buf ← β·buf + g`` (no dampening; ``buf = g`` at s = 0);
3. 1-D variables: ``D_k ← β·D_k + (1 − β)·h`` for the round-robin target only;
   the step of ``p_j`` (all but the last) is
   ``d = τ·(1 − β^(⌊(s+1)/M⌋+1))·buf / (D_j + ε)`` (a bias correction whose
   exponent is shared by all 1-D variables, as in the official code);
4. the last 1-D variable (usually the classifier bias) and every other variable
   take ``d = buf`` (momentum SGD); the last one's ``D`` is still refreshed;
5. coupled L2: ``d ← d + wd·θ``; where ``d`` is the momentum buffer this is
   written into the buffer, as in the official code (PyTorch SGD with L2);
6. ``θ ← θ − lr·d``.

Option (off by default): with ``curvature_every = c > 1`` the product (and the
round-robin advance) happens only on the steps with ``s mod c = 0``; with
``r = ⌊s/c⌋`` the refresh count, the target is ``k = r mod M`` and the bias
correction exponent is ``⌊(r+1)/M⌋+1``. On the other steps no product is
computed and no ``D`` changes. ``c = 1`` is the official algorithm.

The product comes from the tfcurv train step (``tfcurv.Model``,
``tfcurv.Sequential`` or ``tfcurv.attach``), reverse over reverse on the
training step's own forward pass, exact through normalisation layers.
"""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf
from keras import ops

from tfcurv import _keras
from tfcurv._checks import check_integer, check_range
from tfcurv.optimizers.curvature_optimizer import CurvatureOptimizer
from tfcurv.optimizers.hyperparameters import constant


@keras.saving.register_keras_serializable(package="tfcurv")
class SGDPH(CurvatureOptimizer):
    """SGD-PH (Sun et al.), as in the authors' official code.

    Needs the tfcurv train step: train a ``tfcurv.Model``/``tfcurv.Sequential``
    or call ``tfcurv.attach(model)``.

    Args:
        learning_rate: a float > 0, a ``keras.optimizers.schedules`` schedule,
            or a zero-argument callable. Create the optimizer after
            ``keras.config.set_floatx("float64")`` for an exact float64 rate.
        momentum: ``β`` in [0, 1): the momentum of the buffer and the decay of
            the curvature EMA ``D``.
        tau: ``τ > 0``, the "second-order learning rate" of the 1-D variables.
        epsilon: ``ε > 0`` added to ``D`` in the denominator.
        weight_decay: coupled L2 coefficient ``wd >= 0`` (added to the step,
            not Keras' decoupled decay); ``exclude_from_weight_decay`` applies.
        curvature_every: an integer ``c >= 1``: the Hessian-vector product
            runs on the steps ``s`` with ``s mod c = 0`` only, each refreshing
            the ``D`` of the next variable in the round robin; the bias
            correction counts refreshes, not steps. ``1`` (the default) is the
            official algorithm; larger values trade curvature freshness for
            step time.
        **kwargs: the Keras optimizer arguments (``name``, ``clipnorm``,
            ``global_clipnorm``, ``clipvalue``, ``use_ema``, ``ema_momentum``,
            ``ema_overwrite_frequency``, ``loss_scale_factor``,
            ``gradient_accumulation_steps``).

    Slots: ``momentum_buffer`` (every variable), ``diag`` (``D``, 1-D
    variables) and ``curvature`` (the signed product ``H_kk·1`` of the current
    step written by the train step, 1-D variables; zero except on the target,
    and zero everywhere on a step without a product).
    With gradient accumulation the round robin advances once per update and the
    product of the last micro-batch is used.
    """

    @property
    def needs_hessian_vector_products(self) -> bool:
        """Products are needed unless the model has fewer than two 1-D variables.

        Before :meth:`build` the answer is ``True``; with none or one 1-D
        variable (the last one always takes the momentum-SGD step) no product
        can change an update, so the train step records no second tape.
        """
        return not self.built or self._num_one_d >= 2

    def __init__(
        self,
        learning_rate=0.1,
        momentum: float = 0.9,
        tau: float = 1e-3,
        epsilon: float = 1e-4,
        weight_decay: float = 0.0,
        curvature_every: int = 1,
        name: str | None = None,
        **kwargs,
    ):
        if isinstance(learning_rate, (int, float)) and not callable(learning_rate):
            learning_rate = check_range(
                "learning_rate", learning_rate, 0.0, None, low_inclusive=False
            )
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=check_range("weight_decay", weight_decay, 0.0),
            name=name,
            **kwargs,
        )
        self.momentum = check_range("momentum", momentum, 0.0, 1.0, high_inclusive=False)
        self.tau = check_range("tau", tau, 0.0, None, low_inclusive=False)
        self.epsilon = check_range("epsilon", epsilon, 0.0, None, low_inclusive=False)
        self.curvature_every = check_integer("curvature_every", curvature_every)

    def build(self, var_list):
        """Create the slots; decide which variables are 1-D and which is last."""
        if self.built:
            return
        super().build(var_list)
        one_d = [i for i, v in enumerate(var_list) if len(v.shape) == 1]
        self._one_d_position = {index: j for j, index in enumerate(one_d)}
        self._num_one_d = len(one_d)
        if self._num_one_d < 2:
            warnings.warn(
                f"SGDPH found {self._num_one_d} 1-D trainable variable(s): the last "
                "1-D variable always takes the momentum-SGD step, so every variable "
                "is updated as by keras.optimizers.SGD(momentum=momentum) with coupled "
                "L2, and no Hessian-vector products are computed. SGD-PH needs "
                "channel-wise parameters (biases, normalisation scales and shifts).",
                stacklevel=2,
            )
        self._decays_variable = [
            self.weight_decay > 0.0 and _keras.uses_weight_decay(self, v) for v in var_list
        ]
        self.momentum_buffers = [
            self.add_variable_from_reference(v, "momentum_buffer") for v in var_list
        ]
        self.diagonals = [self.add_variable_from_reference(var_list[i], "diag") for i in one_d]
        # Written by the train step in replica context with identical (already
        # all-reduced) values on every replica.
        self.curvatures = [
            self.add_variable(
                var_list[i].shape,
                dtype=var_list[i].dtype,
                aggregation="only_first_replica",
                name=f"{var_list[i].path.replace('/', '_')}_curvature",
            )
            for i in one_d
        ]

    def _apply_weight_decay(self, variables):
        """Do nothing: SGD-PH's L2 term is part of :meth:`update_step`.

        Keras' base class would otherwise also apply decoupled decay
        ``θ − θ·wd·lr`` whenever ``weight_decay`` is set.
        """

    def _refresh_count(self):
        """How many curvature refreshes came before this step (``⌊s/k⌋``)."""
        return self.iterations // self.curvature_every

    def _refreshes_now(self):
        """Whether this step computes a product: ``s mod k = 0``."""
        return ops.equal(self.iterations % self.curvature_every, 0)

    def _round_robin_target(self):
        return self._refresh_count() % self._num_one_d

    def compute_curvature(self, context):
        """``H_kk·1`` for this step's round-robin target ``k`` (zeros elsewhere).

        One Hessian-vector product whatever the number of 1-D variables: the
        tangent is ``1`` on the target and ``0`` on every other variable (the
        target is a tensor, so nothing retraces as it moves), differentiated
        with respect to the 1-D variables, of which the target's block is kept.
        This is the official construction (``Σ_j e_jᵀ g_j`` with ``e`` = ones on
        ``p_k``), and the graph holds one gradient and one product, so tracing
        does not grow with the number of 1-D variables. The second backward
        reaches the first 1-D variable of the model on every step (not only as
        deep as the target): measured in ``benchmarks/real_models.py``. On the
        steps between refreshes (``curvature_every > 1``) an ``ops.cond``
        skips the second backward entirely (with ``curvature_every = 1`` there
        is no cond: a cond around a second backward captures every tensor of
        the first one, which costs trace time). The sign is kept: ``|·|`` is taken
        after the all-reduce.
        """
        if self._num_one_d < 2:
            return [], []
        variables = list(context.variables)
        one_d = list(self._one_d_position)
        target = self._round_robin_target()
        is_target = [ops.equal(target, position) for position in range(len(one_d))]

        def product():
            vectors = [None] * len(variables)
            for index, selected in zip(one_d, is_target):
                variable = variables[index]
                vectors[index] = ops.broadcast_to(
                    ops.cast(selected, variable.dtype), variable.shape
                )
            products = context.hessian_vector_product(
                vectors, [variables[i] for i in one_d]
            )
            return [
                ops.where(selected, p, ops.zeros_like(p))
                for p, selected in zip(products, is_target)
            ]

        if self.curvature_every == 1:  # a product on every step: no cond to trace
            curvature = product()
        else:
            curvature = ops.cond(
                self._refreshes_now(),
                product,
                lambda: [ops.zeros(variables[i].shape, variables[i].dtype) for i in one_d],
            )
        return list(curvature), ["sum"] * len(curvature)

    def store_curvature(self, values):
        for slot, value in zip(self.curvatures, values):
            slot.assign(ops.cast(value, slot.dtype))

    def update_step(self, gradient, variable, learning_rate):
        """One SGD-PH step for one variable (official order of operations)."""
        dtype = variable.dtype
        index = _keras.variable_index(self, variable)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        gradient = ops.cast(gradient, dtype)
        learning_rate = ops.cast(learning_rate, dtype)
        momentum = constant(self.momentum, dtype)
        buffer = self.momentum_buffers[index]
        # The buffer starts at zero, so β·0 + g = g exactly at the first step.
        new_buffer = buffer * momentum + gradient

        position = self._one_d_position.get(index)
        if position is not None:
            new_diagonal = self._refresh_diagonal(position, dtype)
        if position is not None and position != self._num_one_d - 1:
            direction = (
                (1.0 / (new_diagonal + constant(self.epsilon, dtype)))
                * new_buffer
                * self._bias_correction(dtype)
                * constant(self.tau, dtype)
            )
            if self._decays_variable[index]:
                direction = direction + variable * constant(self.weight_decay, dtype)
            self.assign(buffer, new_buffer)
        else:
            direction = new_buffer
            if self._decays_variable[index]:
                direction = direction + variable * constant(self.weight_decay, dtype)
            self.assign(buffer, direction)  # the official buffer aliasing
        self.assign(variable, variable - learning_rate * direction)

    def _refresh_diagonal(self, position: int, dtype):
        """``D ← β·D + (1 − β)·|h|`` if this 1-D variable is the target, else ``D``."""
        diagonal = self.diagonals[position]
        curvature = ops.abs(ops.cast(self.curvatures[position], dtype))
        refreshed = diagonal * constant(self.momentum, dtype) + curvature * constant(
            1.0 - self.momentum, dtype
        )
        is_target = ops.logical_and(
            self._refreshes_now(), ops.equal(self._round_robin_target(), position)
        )
        new_diagonal = ops.where(is_target, refreshed, diagonal)
        self.assign(diagonal, new_diagonal)
        return new_diagonal

    def _bias_correction(self, dtype):
        """``1 − β^(⌊(r+1)/M⌋+1)`` with ``r = ⌊s/k⌋``, shared by all 1-D variables.

        ``r`` counts refreshes, so with ``k = 1`` this is the official phase.
        """
        exponent = (self._refresh_count() + 1) // self._num_one_d + 1
        return constant(1.0, dtype) - ops.power(
            constant(self.momentum, dtype), ops.cast(exponent, dtype)
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "tau": self.tau,
                "epsilon": self.epsilon,
                "curvature_every": self.curvature_every,
            }
        )
        return config
