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

from tfcurv import _keras
from tfcurv._checks import check_bool, check_range
from tfcurv.optimizers.hyperparameters import constant

#: Accepted values of ``bias_correction_dtype`` (``None``: the variable's dtype).
BIAS_CORRECTION_DTYPES = (None, "float32", "float64")


class Settings(NamedTuple):
    """The Python-valued options of one variable's AGD step."""

    beta_1: float
    beta_2: float
    delta: float
    clip: float | None
    #: ``None``: no decay for this variable; else ``"decoupled"``, ``"fixed"``
    #: or ``"coupled"`` with coefficient ``weight_decay``.
    decay_mode: str | None
    weight_decay: float
    bias_correction_dtype: str | None


def agd_step(
    parameters,
    gradient,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    step,
    learning_rate,
    settings: Settings,
):
    """The official AGD step of one tensor, as a pure function.

    ``step`` is the 1-based step counter (integer tensor), ``learning_rate``
    a scalar of the parameters' dtype. Returns the new ``(parameters, exp_avg,
    exp_avg_sq, max_exp_avg_sq)``; ``max_exp_avg_sq`` is ``None`` without
    amsgrad. Operations and their order follow the official code.
    """
    dtype = parameters.dtype
    scalar_dtype = settings.bias_correction_dtype or dtype
    step = tf.cast(step, scalar_dtype)
    one = constant(1.0, scalar_dtype)
    beta_1 = constant(settings.beta_1, scalar_dtype)
    bias_correction_1 = one - tf.pow(beta_1, step)
    sqrt_bias_correction_2 = tf.sqrt(
        one - tf.pow(constant(settings.beta_2, scalar_dtype), step)
    )
    inverse_bias_correction_1 = tf.cast(one / bias_correction_1, dtype)
    # 1 / (1 − β1^0) is 1/0: the t = 1 difference has no previous term.
    inverse_previous_bias_correction_1 = tf.cast(
        tf.math.divide_no_nan(one, one - tf.pow(beta_1, step - one)), dtype
    )
    denominator_floor = tf.cast(
        constant(settings.delta, scalar_dtype) * sqrt_bias_correction_2, dtype
    )
    step_size = tf.cast(
        tf.cast(learning_rate, scalar_dtype)
        * sqrt_bias_correction_2
        / bias_correction_1,
        dtype,
    )

    if settings.decay_mode == "coupled":
        gradient = gradient + constant(settings.weight_decay, dtype) * parameters
    elif settings.decay_mode == "fixed":
        parameters = parameters * constant(1.0 - settings.weight_decay, dtype)
    elif settings.decay_mode == "decoupled":
        parameters = parameters * (
            1.0 - learning_rate * constant(settings.weight_decay, dtype)
        )
    new_exp_avg = (
        exp_avg * constant(settings.beta_1, dtype)
        + constant(1.0 - settings.beta_1, dtype) * gradient
    )
    difference = (
        new_exp_avg * inverse_bias_correction_1
        - exp_avg * inverse_previous_bias_correction_1
    )
    new_exp_avg_sq = (
        exp_avg_sq * constant(settings.beta_2, dtype)
        + (constant(1.0 - settings.beta_2, dtype) * difference) * difference
    )
    second_moment = new_exp_avg_sq
    if max_exp_avg_sq is not None:
        max_exp_avg_sq = second_moment = tf.maximum(max_exp_avg_sq, new_exp_avg_sq)
    direction = new_exp_avg / tf.maximum(tf.sqrt(second_moment), denominator_floor)
    if settings.clip is not None:
        clip = constant(settings.clip, dtype)
        direction = tf.clip_by_value(direction, -clip, clip)
    return (
        parameters - step_size * direction,
        new_exp_avg,
        new_exp_avg_sq,
        max_exp_avg_sq,
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
        fused: compile each variable's step with XLA into one kernel
            (default). ``False`` runs the same operations as separate
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
        name: str | None = None,
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
        self.amsgrad = check_bool("amsgrad", amsgrad)
        self.decoupled_weight_decay = check_bool(
            "decoupled_weight_decay", decoupled_weight_decay
        )
        self.fixed_decay = check_bool("fixed_decay", fixed_decay)
        if bias_correction_dtype not in BIAS_CORRECTION_DTYPES:
            raise ValueError(
                "`bias_correction_dtype` must be one of "
                f"{BIAS_CORRECTION_DTYPES}. Received: "
                f"bias_correction_dtype={bias_correction_dtype!r}"
            )
        self.bias_correction_dtype = bias_correction_dtype
        self.fused = check_bool("fused", fused)

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
        self._settings = [self._settings_for(v) for v in var_list]
        # agd_step compiled by XLA into one kernel per variable shape (unfused,
        # each of its ~15 elementwise operations is one pass over memory and
        # each of its ~15 scalar operations one kernel launch). One compiled
        # function per optimizer: a function shared by every instance keeps
        # traces made inside other models' train functions, and reusing one of
        # them reads tensors of a graph that no longer exists ("out of scope").
        # No AutoGraph: agd_step branches on Python settings only.
        self._fused_step = tf.function(
            agd_step, jit_compile=True, reduce_retracing=True, autograph=False
        )

    def _settings_for(self, variable) -> Settings:
        decays = bool(self.weight_decay) and _keras.uses_weight_decay(self, variable)
        if not decays:
            decay_mode = None
        elif not self.decoupled_weight_decay:
            decay_mode = "coupled"
        else:
            decay_mode = "fixed" if self.fixed_decay else "decoupled"
        return Settings(
            self.beta_1,
            self.beta_2,
            self.delta,
            self.clip,
            decay_mode,
            self.weight_decay or 0.0,
            self.bias_correction_dtype,
        )

    def _apply_weight_decay(self, variables):
        """Do nothing: AGD applies its own decay inside :meth:`update_step`.

        Keras' base class would otherwise also decay every variable by
        ``θ − θ·wd·lr`` whenever ``weight_decay`` is set. AGD's three decay
        modes (one of which changes the gradient) are part of its update, in
        the official order and arithmetic, so the base hook must stay off.
        """

    def update_step(self, gradient, variable, learning_rate):
        """One AGD step for one variable."""
        index = _keras.variable_index(self, variable)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)  # sums duplicate indices
        slots = [self._exp_avgs[index], self._exp_avg_sqs[index]]
        if self.amsgrad:
            slots.append(self._max_exp_avg_sqs[index])
        step = self._fused_step if self.fused else agd_step
        new_parameters, *new_slots = step(
            tf.convert_to_tensor(variable),
            ops.cast(gradient, variable.dtype),
            *(tf.convert_to_tensor(slot) for slot in slots),
            *([] if self.amsgrad else [None]),
            self.iterations + 1,
            ops.cast(learning_rate, variable.dtype),
            self._settings[index],
        )
        for slot, value in zip(slots, new_slots):
            self.assign(slot, value)
        self.assign(variable, new_parameters)

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
