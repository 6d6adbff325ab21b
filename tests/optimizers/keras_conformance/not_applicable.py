"""Keras optimizer tests that cannot apply to a tfcurv optimizer, each with its reason.

Keys are ``file::Class::test`` (file relative to ``keras/src``); a key ending in
``*`` covers every test whose name starts with the part before it. Every other
test of the files in ``KERAS_TEST_FILES`` must pass.
"""

from __future__ import annotations

KERAS_TEST_FILES = (
    "optimizers/optimizer_test.py",
    "optimizers/optimizer_sparse_test.py",
    "optimizers/adam_test.py",
    "optimizers/loss_scale_optimizer_test.py",
    "callbacks/swap_ema_weights_test.py",
    "optimizers/schedules/learning_rate_schedule_test.py",
    "backend/tensorflow/optimizer_distribute_test.py",
)

_SGD_NUMBERS = (
    "asserts the weights that Keras' SGD reaches (golden values); the mechanism "
    "it exercises is in tfcurv's optimizer contract for every tfcurv optimizer"
)
_ADAM_NUMBERS = "asserts Keras Adam's numbers (golden values)"

#: For every tfcurv optimizer.
ALL: dict[str, str] = {
    "optimizers/optimizer_test.py::OptimizerTest::test_ema": _SGD_NUMBERS + " (use_ema)",
    "optimizers/optimizer_test.py::OptimizerTest::test_ema_with_model_fit": _SGD_NUMBERS
    + " (use_ema)",
    "optimizers/optimizer_test.py::OptimizerTest::test_empty_gradients": _SGD_NUMBERS
    + " (the 'No gradients provided' error is checked before the numbers and passes "
    "up to them)",
    "optimizers/optimizer_test.py::OptimizerTest::test_gradient_accumulation": (
        _SGD_NUMBERS + " (gradient_accumulation_steps)"
    ),
    "optimizers/optimizer_test.py::OptimizerTest::test_overwrite_with_gradient": (
        _SGD_NUMBERS + " for the variable updated normally (the overwritten one passes)"
    ),
    "optimizers/optimizer_test.py::OptimizerTest::"
    "test_overwrite_with_gradient_with_gradient_accumulation": (
        _SGD_NUMBERS + " for the variable updated normally"
    ),
    "optimizers/optimizer_test.py::OptimizerTest::test_static_loss_scaling": (
        _SGD_NUMBERS + " (loss_scale_factor)"
    ),
    "optimizers/optimizer_test.py::OptimizerTest::test_optimizer_auto_naming": (
        "asserts the names of Keras' classes (adam, adam_1, sgd, adam_w); the same "
        "convention for tfcurv's (agd, agd_1, ...) is in the contract"
    ),
    "optimizers/optimizer_sparse_test.py::OptimizerSparseTest::test_sparse_gradients_*": (
        "asserts which Keras optimizers update IndexedSlices sparsely; tfcurv's "
        "optimizers densify them (the official algorithms decay every row's "
        "moments), tested equal to the dense update"
    ),
    "optimizers/adam_test.py::AdamTest::test_correctness_with_golden": _ADAM_NUMBERS,
    "optimizers/loss_scale_optimizer_test.py::LossScaleOptimizerTest::"
    "test_apply_with_no_vars": _SGD_NUMBERS + " (LossScaleOptimizer)",
    "optimizers/loss_scale_optimizer_test.py::LossScaleOptimizerTest::"
    "test_finite_step_stateful": _SGD_NUMBERS + " (LossScaleOptimizer)",
    "optimizers/loss_scale_optimizer_test.py::LossScaleOptimizerTest::"
    "test_finite_step_with_inner_loss_scale_stateful": _SGD_NUMBERS
    + " (LossScaleOptimizer)",
    "optimizers/schedules/learning_rate_schedule_test.py::TestFitLRSchedulesFlow::"
    "test_fit_lr_correctness": _ADAM_NUMBERS + " (losses of a fit with a schedule)",
    "backend/tensorflow/optimizer_distribute_test.py::OptimizerDistributeTest::"
    "test_correctness_with_golden": _SGD_NUMBERS + " (MirroredStrategy)",
    "backend/tensorflow/optimizer_distribute_test.py::OptimizerDistributeTest::test_ema": (
        _SGD_NUMBERS + " (MirroredStrategy, use_ema)"
    ),
    "backend/tensorflow/optimizer_distribute_test.py::OptimizerDistributeTest::"
    "test_gradient_accumulation": _SGD_NUMBERS + " (MirroredStrategy)",
    "backend/tensorflow/optimizer_distribute_test.py::OptimizerDistributeTest::"
    "test_single_step0": _SGD_NUMBERS + " (MirroredStrategy)",
}

#: A curvature optimizer (SGD-PH, AdaFisher, AdaFisherW) applied to variables
#: directly, without a model and its tfcurv train step, must refuse with this
#: error (its curvature would be missing): such a test is not applicable, and
#: the plugin checks that it failed with exactly this error.
CURVATURE_REFUSAL = "needs curvature that only the tfcurv train step provides"


def for_optimizer(name: str, curvature: bool) -> dict[str, str]:
    return dict(ALL)


def reason(table: dict[str, str], key: str) -> str | None:
    if key in table:
        return table[key]
    for pattern, why in table.items():
        if pattern.endswith("*") and key.startswith(pattern[:-1]):
            return why
    return None
