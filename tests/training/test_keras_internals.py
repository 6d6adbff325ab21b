"""The private Keras attributes of ``tfcurv/training/keras_internals.py``.

Each must still exist and still mean what the train step assumes (the
equivalence tests of ``test_train_step.py`` check the numbers end to end), and
Keras must still lack a public way to do the same (otherwise use it instead).
"""

import keras
import numpy as np

from tfcurv.training import keras_internals


def _compiled_model():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_keras_still_has_no_public_equivalent():
    assert "Functional" not in dir(keras) and "Functional" not in dir(keras.models)
    assert not hasattr(keras.Model, "loss_tracker")
    assert "unscale_loss_for_distribution" not in dir(keras.losses)


def test_functional_construction_helpers_still_mean_the_same():
    model = _compiled_model()
    assert type(model) is keras_internals.Functional
    assert keras_internals.functional_init_arguments((1, 2), {})
    assert keras_internals.functional_init_arguments((), {"inputs": 1, "outputs": 2})
    assert not keras_internals.functional_init_arguments((), {"name": "m"})
    # Keras 3.13 has no MultiOptimizer; keras_internals then offers an empty tuple
    assert keras_internals.MultiOptimizer is getattr(keras.optimizers, "MultiOptimizer", ())


def test_loss_and_loss_tracker_helpers_still_work():
    model = _compiled_model()
    x = np.ones((4, 3), "float32")
    y = np.zeros((4, 2), "float32")
    y_pred = keras_internals.call_for_training(model, x)
    loss = keras_internals.compute_loss(model, x, y, y_pred, None)
    np.testing.assert_allclose(loss, np.mean(np.square(y_pred)), rtol=1e-6)
    keras_internals.update_loss_tracker(model, loss, 4)
    tracker = next(m for m in model.metrics if m.name == "loss")
    np.testing.assert_allclose(tracker.result(), loss, rtol=1e-6)


def test_optimizer_variables_are_the_ones_it_was_built_with():
    model = _compiled_model()
    model.optimizer.build(model.trainable_variables)
    assert keras_internals.optimizer_variables(model.optimizer) == list(
        model.trainable_variables
    )
