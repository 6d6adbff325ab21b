"""The private Keras attributes of ``tfcurv/_keras.py``.

Each must still exist and still mean what the train step assumes (the
equivalence tests of ``test_train_step.py`` check the numbers end to end), and
Keras must still lack a public way to do the same (otherwise use it instead).
"""

import keras
import numpy as np

from tfcurv import _keras as keras_internals


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


def test_flatten_layers_finds_layers_inside_custom_layers_once():
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.inner = [keras.layers.Dense(3), keras.layers.Dense(3)]

        def call(self, x):
            return self.inner[1](self.inner[0](x))

    block = Block()
    model = keras.Sequential([keras.Input((3,)), block, block])
    found = keras_internals.flatten_layers(model)
    assert found[0] is model
    assert sum(layer is block for layer in found) == 1
    assert all(any(layer is inner for layer in found) for inner in block.inner)
    assert not hasattr(keras.Model, "flatten_layers")  # canary: still private


def test_optimizer_hooks_still_mean_the_same():
    """The base optimizer's variable index, decay exclusion and decay hook."""
    a, b = keras.Variable(np.ones(2), name="a"), keras.Variable(np.ones(2), name="b")
    optimizer = keras.optimizers.SGD(0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["b"])
    optimizer.build([a, b])
    assert keras_internals.variable_index(optimizer, b) == 1
    assert keras_internals.uses_weight_decay(optimizer, a)
    assert not keras_internals.uses_weight_decay(optimizer, b)
    try:
        keras_internals.variable_index(optimizer, keras.Variable(np.ones(1)))
    except KeyError:
        pass
    else:
        raise AssertionError("an unknown variable must raise KeyError")

    class NoDecay(keras.optimizers.SGD):
        calls = 0

        def _apply_weight_decay(self, variables):
            NoDecay.calls += 1

    c = keras.Variable(np.ones(2))
    NoDecay(0.1, weight_decay=0.5).apply([np.zeros(2)], [c])
    # Keras' apply still routes decay through the hook tfcurv overrides:
    assert NoDecay.calls == 1 and np.all(np.asarray(c) == 1.0)
    # canary: no public per-variable index or decay query yet
    assert not hasattr(keras.optimizers.Optimizer, "get_variable_index")
    assert not hasattr(keras.optimizers.Optimizer, "use_weight_decay")


def test_keras_still_has_the_multi_worker_defects_tfcurv_works_around():
    """Canaries of ``_keras.install_multi_worker_fixes`` and
    ``_keras.multi_worker_logs`` (keras-team/keras#20585): Keras' own ``fit``
    under MultiWorkerMirroredStrategy still averages the first batch across
    workers before the first step, and still reduces scalar logs with
    ``axis=0``. When either fails, Keras has changed: check whether tfcurv's
    fix can go (``tests/training/test_multi_worker.py`` runs plain Keras SGD
    through it)."""
    import inspect

    from keras.src.backend.tensorflow import trainer

    build = inspect.getsource(trainer.TensorFlowTrainer._maybe_symbolic_build)
    assert "distribute_strategy.reduce(" in build
    reduce = inspect.getsource(trainer.reduce_per_replica)
    assert 'strategy.reduce("MEAN", v, axis=0)' in reduce


def test_multi_worker_logs_only_reshape_under_several_workers():
    import tensorflow as tf

    logs = {"loss": tf.constant(1.5)}
    assert keras_internals.multi_worker_logs(logs) is logs
    assert not keras_internals.is_multi_worker(tf.distribute.get_strategy())
