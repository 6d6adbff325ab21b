"""AGD: the auto-switchable optimizer with stepwise gradient difference.

Yue et al., "AGD: an Auto-switchable Optimizer using Stepwise Gradient
Difference as Preconditioning Matrix", NeurIPS 2023. This is the update of the
official implementation (``atorch/optimizers/agd.py``, class ``AGD``), step for
step, for every variable ``θ`` with gradient ``g`` at step ``t = 1, 2, ...``:

1. weight decay, first: decoupled ``θ ← θ·(1 − lr·wd)`` (default), fixed
   ``θ ← θ·(1 − wd)``, or coupled ``g ← g + wd·θ``;
2. ``m ← β1·m + (1 − β1)·g``;
3. ``s = m/(1 − β1^t) − m_prev/(1 − β1^(t−1))`` (just ``m/(1 − β1)`` at t = 1):
   the stepwise difference of the bias-corrected first moment;
4. ``b ← β2·b + (1 − β2)·s²``; with ``amsgrad``, ``b_max ← max(b_max, b)`` is
   used below instead of ``b``;
5. ``u = m / max(√b, δ·√(1 − β2^t))``, clamped to ``[−clip, clip]`` if ``clip``;
6. ``θ ← θ − lr·√(1 − β2^t)/(1 − β1^t)·u``.

Where ``√b̂`` falls below ``δ`` a coordinate takes SGD-with-momentum steps
(``lr/δ·m̂``); elsewhere the step is adaptive, like Adam's.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf
from keras import ops

from tfcurv.optimizers.hyperparameters import check_range, constant

#: Accepted values of ``bias_correction_dtype`` (``None``: the variable's dtype).
BIAS_CORRECTION_DTYPES = (None, "float32", "float64")


class Coefficients(NamedTuple):
    """Scalars of one AGD step for one variable, in the variable's dtype.

    ``None`` marks an absent option (it selects a different computation).
    """

    beta_1: tf.Tensor
    one_minus_beta_1: tf.Tensor
    beta_2: tf.Tensor
    one_minus_beta_2: tf.Tensor
    inverse_bias_correction_1: tf.Tensor  # 1 / (1 − β1^t)
    inverse_previous_bias_correction_1: tf.Tensor  # 1 / (1 − β1^(t−1)); 0 at t = 1
    denominator_floor: tf.Tensor  # δ·√(1 − β2^t)
    step_size: tf.Tensor  # lr·√(1 − β2^t) / (1 − β1^t)
    parameter_decay_factor: tf.Tensor | None = None  # decoupled: 1 − lr·wd or 1 − wd
    gradient_decay: tf.Tensor | None = None  # coupled: wd
    clip: tf.Tensor | None = None


def agd_arithmetic(parameters, gradient, exp_avg, exp_avg_sq, max_exp_avg_sq, c):
    """The official update of one tensor, as a pure function.

    Returns the new ``(parameters, exp_avg, exp_avg_sq, max_exp_avg_sq)``
    (the last is ``None`` without amsgrad). Operations and their order follow
    the official code, so float64 results agree with it to rounding.
    """
    if c.gradient_decay is not None:
        gradient = gradient + c.gradient_decay * parameters
    if c.parameter_decay_factor is not None:
        parameters = parameters * c.parameter_decay_factor
    new_exp_avg = exp_avg * c.beta_1 + c.one_minus_beta_1 * gradient
    difference = (
        new_exp_avg * c.inverse_bias_correction_1
        - exp_avg * c.inverse_previous_bias_correction_1
    )
    new_exp_avg_sq = (
        exp_avg_sq * c.beta_2 + (c.one_minus_beta_2 * difference) * difference
    )
    second_moment = new_exp_avg_sq
    if max_exp_avg_sq is not None:
        max_exp_avg_sq = second_moment = tf.maximum(max_exp_avg_sq, new_exp_avg_sq)
    direction = new_exp_avg / tf.maximum(tf.sqrt(second_moment), c.denominator_floor)
    if c.clip is not None:
        direction = tf.clip_by_value(direction, -c.clip, c.clip)
    return (
        parameters - c.step_size * direction,
        new_exp_avg,
        new_exp_avg_sq,
        max_exp_avg_sq,
    )


#: :func:`agd_arithmetic` compiled by XLA into one fused loop per variable shape.
#: Unfused, each of its ~15 elementwise operations is one pass over memory.
fused_agd_arithmetic = tf.function(
    agd_arithmetic, jit_compile=True, reduce_retracing=True
)


@keras.saving.register_keras_serializable(package="tfcurv")
class AGD(keras.optimizers.Optimizer):
    """AGD (Yue et al., NeurIPS 2023), as in the authors' official code.

    Args:
        learning_rate: a float > 0, a ``keras.optimizers.schedules``
            schedule, or a zero-argument callable. Keras keeps a float rate in a
            variable of ``keras.config.floatx()`` at construction: create the
            optimizer after ``set_floatx("float64")`` to train float64 models
            with an exact float64 rate.
        beta_1: decay of the first moment ``m``, in [0, 1).
        beta_2: decay of ``b``, the second moment of the stepwise difference,
            in [0, 1).
        delta: the switch threshold δ > 0: where ``√b̂ < δ`` the coordinate
            takes momentum-SGD steps of size ``lr/δ``. There is no separate ε.
        amsgrad: use the running maximum of ``b``.
        clip: if set (> 0), clamp the preconditioned step ``m/denominator`` to
            ``[−clip, clip]`` before the learning-rate factor.
        weight_decay: ``None`` or a float >= 0.
        decoupled_weight_decay: ``True`` (default): multiply ``θ`` by
            ``1 − lr·wd`` before the update; ``False``: add ``wd·θ`` to the
            gradient (L2 regularisation).
        fixed_decay: with decoupled decay, multiply by ``1 − wd`` instead
            (independent of the learning rate).
        bias_correction_dtype: ``None`` (default) computes ``β^t``, the bias
            corrections, ``δ·√(1 − β2^t)`` and the step size in the variable's
            dtype. ``"float32"`` computes them in float32 and applies them to
            the variable's dtype, as the official code does when PyTorch's
            default dtype is float32 (its step counter is a float32 tensor)
            while the model is float64.
        fused: compile each variable's elementwise update with XLA into one
            loop (default). ``False`` runs the same operations as separate
            TensorFlow kernels (slower; for platforms without XLA).
        **kwargs: the Keras optimizer arguments (``name``, ``clipnorm``,
            ``global_clipnorm``, ``clipvalue``, ``use_ema``, ``ema_momentum``,
            ``ema_overwrite_frequency``, ``loss_scale_factor``,
            ``gradient_accumulation_steps``). ``exclude_from_weight_decay``
            works as for Keras' optimizers.

    Slots (per variable): ``exp_avg`` (m), ``exp_avg_sq`` (b) and, with
    ``amsgrad``, ``max_exp_avg_sq``. Sparse ``tf.IndexedSlices`` gradients
    (``Embedding``) are densified: every row's moments decay and every row
    moves, exactly as with the equivalent dense gradient.
    """

    def __init__(
        self,
        learning_rate=1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        delta: float = 1e-5,
        amsgrad: bool = False,
        clip: float | None = None,
        weight_decay: float | None = None,
        decoupled_weight_decay: bool = True,
        fixed_decay: bool = False,
        bias_correction_dtype: str | None = None,
        fused: bool = True,
        name: str = "agd",
        **kwargs,
    ):
        if isinstance(learning_rate, (int, float)) and not callable(learning_rate):
            learning_rate = check_range(
                "learning_rate", learning_rate, 0.0, None, low_inclusive=False
            )
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=(
                None
                if weight_decay is None
                else check_range("weight_decay", weight_decay, 0.0)
            ),
            name=name,
            **kwargs,
        )
        self.beta_1 = check_range("beta_1", beta_1, 0.0, 1.0, high_inclusive=False)
        self.beta_2 = check_range("beta_2", beta_2, 0.0, 1.0, high_inclusive=False)
        self.delta = check_range("delta", delta, 0.0, None, low_inclusive=False)
        self.clip = (
            None
            if clip is None
            else check_range("clip", clip, 0.0, None, low_inclusive=False)
        )
        self.amsgrad = _check_bool("amsgrad", amsgrad)
        self.decoupled_weight_decay = _check_bool(
            "decoupled_weight_decay", decoupled_weight_decay
        )
        self.fixed_decay = _check_bool("fixed_decay", fixed_decay)
        if bias_correction_dtype not in BIAS_CORRECTION_DTYPES:
            raise ValueError(
                "`bias_correction_dtype` must be one of "
                f"{BIAS_CORRECTION_DTYPES}. Received: "
                f"bias_correction_dtype={bias_correction_dtype!r}"
            )
        self.bias_correction_dtype = bias_correction_dtype
        self.fused = _check_bool("fused", fused)

    def build(self, var_list):
        """Create the slots ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``)."""
        if self.built:
            return
        super().build(var_list)
        self._exp_avgs = [
            self.add_variable_from_reference(v, "exp_avg") for v in var_list
        ]
        self._exp_avg_sqs = [
            self.add_variable_from_reference(v, "exp_avg_sq") for v in var_list
        ]
        self._max_exp_avg_sqs = (
            [self.add_variable_from_reference(v, "max_exp_avg_sq") for v in var_list]
            if self.amsgrad
            else []
        )
        # Decided here, where variables still have their paths
        # (update_step may see per-device components).
        self._decays_variable = [
            self.weight_decay is not None
            and self.weight_decay > 0.0
            and self._use_weight_decay(v)
            for v in var_list
        ]

    def _apply_weight_decay(self, variables):
        """Do nothing: AGD applies its own decay inside :meth:`update_step`.

        Keras' base class would otherwise also decay every variable by
        ``θ − θ·wd·lr`` whenever ``weight_decay`` is set. AGD's three decay
        modes (one of which changes the gradient) are part of its update, in
        the official order and arithmetic, so the base hook must stay off.
        """

    def update_step(self, gradient, variable, learning_rate):
        """One AGD step for one variable."""
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)  # sums duplicate indices
        slots = [self._exp_avgs[index], self._exp_avg_sqs[index]]
        if self.amsgrad:
            slots.append(self._max_exp_avg_sqs[index])
        arithmetic = fused_agd_arithmetic if self.fused else agd_arithmetic
        new_parameters, *new_slots = arithmetic(
            tf.convert_to_tensor(variable),
            ops.cast(gradient, dtype),
            *(tf.convert_to_tensor(slot) for slot in slots),
            *([] if self.amsgrad else [None]),
            self._coefficients(ops.cast(learning_rate, dtype), dtype, index),
        )
        for slot, value in zip(slots, new_slots):
            self.assign(slot, value)
        self.assign(variable, new_parameters)

    def _coefficients(self, learning_rate, dtype, index) -> Coefficients:
        """The scalars of this step for variable ``index``, in ``dtype``.

        Bias corrections, the δ floor and the step size are computed in
        ``bias_correction_dtype`` (default ``dtype``) and then converted, as the
        official code computes them in its step counter's dtype and applies
        them to the parameter's.
        """
        compute_dtype = self.bias_correction_dtype or dtype
        step = ops.cast(self.iterations + 1, compute_dtype)
        one = constant(1.0, compute_dtype)
        beta_1 = constant(self.beta_1, compute_dtype)
        bias_correction_1 = one - ops.power(beta_1, step)
        previous_bias_correction_1 = one - ops.power(beta_1, step - one)
        sqrt_bias_correction_2 = ops.sqrt(
            one - ops.power(constant(self.beta_2, compute_dtype), step)
        )
        step_scalars = (
            one / bias_correction_1,
            # 1 / (1 − β1^0) is 1/0: the t = 1 difference has no previous term.
            tf.math.divide_no_nan(one, previous_bias_correction_1),
            constant(self.delta, compute_dtype) * sqrt_bias_correction_2,
            ops.cast(learning_rate, compute_dtype)
            * sqrt_bias_correction_2
            / bias_correction_1,
        )
        parameter_decay_factor = gradient_decay = None
        if self._decays_variable[index]:
            if not self.decoupled_weight_decay:
                gradient_decay = constant(self.weight_decay, dtype)
            elif self.fixed_decay:
                parameter_decay_factor = constant(1.0 - self.weight_decay, dtype)
            else:
                parameter_decay_factor = 1.0 - learning_rate * constant(
                    self.weight_decay, dtype
                )
        return Coefficients(
            constant(self.beta_1, dtype),
            constant(1.0 - self.beta_1, dtype),
            constant(self.beta_2, dtype),
            constant(1.0 - self.beta_2, dtype),
            *(ops.cast(s, dtype) for s in step_scalars),
            parameter_decay_factor=parameter_decay_factor,
            gradient_decay=gradient_decay,
            clip=None if self.clip is None else constant(self.clip, dtype),
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "delta": self.delta,
                "amsgrad": self.amsgrad,
                "clip": self.clip,
                "decoupled_weight_decay": self.decoupled_weight_decay,
                "fixed_decay": self.fixed_decay,
                "bias_correction_dtype": self.bias_correction_dtype,
                "fused": self.fused,
            }
        )
        return config


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(  # noqa: TRY004 (the project reports bad arguments as ValueError)
            f"`{name}` must be True or False. Received: {name}={value!r}"
        )
    return value
