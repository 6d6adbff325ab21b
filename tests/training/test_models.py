"""tfcurv.Model / Sequential / attach: construction, class hierarchy, saving."""

import keras
import numpy as np
import pytest

import tfcurv
from tests.training.probe_optimizers import HVPProbe
from tfcurv.training import is_attached


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 4)).astype("float32"), rng.integers(0, 3, 8)


def _functional_layers():
    inputs = keras.Input((4,))
    return inputs, keras.layers.Dense(3)(keras.layers.Dense(5)(inputs))


class Subclassed(tfcurv.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(5)
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.hidden(x))


def _compile_and_fit(model, epochs=1, **fit_kwargs):
    model.compile(
        optimizer=HVPProbe(learning_rate=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data()
    return model.fit(x, y, batch_size=4, epochs=epochs, verbose=0, **fit_kwargs)


def test_functional_tfcurv_model_is_functional_and_a_tfcurv_model():
    model = tfcurv.Model(*_functional_layers())
    assert isinstance(model, tfcurv.Model)
    assert isinstance(model, keras.Model)
    assert len(model.layers) == 3  # Input, Dense, Dense: a Functional graph
    _compile_and_fit(model)
    assert np.all(np.isfinite(model.optimizer.products[0].numpy()))


def test_functional_construction_leaves_tfcurv_model_subclassable():
    tfcurv.Model(*_functional_layers())
    inputs = keras.Input((2,))
    tfcurv.Model(inputs=inputs, outputs=keras.layers.Dense(1)(inputs))
    assert tfcurv.Model.__bases__[-1] is keras.Model
    model = Subclassed()
    history = _compile_and_fit(model)
    assert np.isfinite(history.history["loss"][0])


def test_subclass_called_functionally_becomes_functional_without_touching_tfcurv_model():
    class Wrapped(tfcurv.Model):
        pass

    model = Wrapped(*_functional_layers())
    assert isinstance(model, Wrapped) and isinstance(model, tfcurv.Model)
    assert len(model.layers) == 3
    assert tfcurv.Model.__bases__[-1] is keras.Model
    _compile_and_fit(model)
    assert np.isfinite(_compile_and_fit(Subclassed()).history["loss"][0])


def test_sequential():
    model = tfcurv.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert isinstance(model, keras.Sequential)
    assert np.isfinite(_compile_and_fit(model).history["loss"][0])


def test_curvature_optimizer_on_plain_keras_model_fails_at_first_step_with_the_fix():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(RuntimeError, match=r"tfcurv\.attach\(model\).*tfcurv\.Model"):
        _compile_and_fit(model)


@pytest.mark.parametrize("style", ["sequential", "functional", "subclassed"])
def test_attach_gives_any_keras_model_the_step_and_is_idempotent(style):
    if style == "sequential":
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    elif style == "functional":
        model = keras.Model(*_functional_layers())
    else:

        class KerasSubclassed(keras.Model):
            def __init__(self):
                super().__init__()
                self.head = keras.layers.Dense(3)

            def call(self, x):
                return self.head(x)

        model = KerasSubclassed()
    assert tfcurv.attach(model) is model
    assert tfcurv.attach(model) is model
    assert is_attached(model)
    assert np.isfinite(_compile_and_fit(model).history["loss"][0])


def test_attach_after_a_failed_fit_resets_the_cached_train_function():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(RuntimeError):
        _compile_and_fit(model)
    assert model.train_function is not None
    tfcurv.attach(model)
    assert model.train_function is None
    x, y = _data()
    assert np.isfinite(model.fit(x, y, verbose=0).history["loss"][0])


def test_attach_is_a_no_op_for_tfcurv_models():
    model = tfcurv.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert tfcurv.attach(model) is model
    assert "train_step" not in model.__dict__


def test_attach_rejects_non_models_and_custom_train_steps():
    with pytest.raises(TypeError, match="`model` must be a keras.Model"):
        tfcurv.attach(keras.layers.Dense(3))

    class OwnStep(keras.Model):
        def train_step(self, data):
            return {}

    with pytest.raises(ValueError, match="defines its own `train_step`"):
        tfcurv.attach(OwnStep())


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_saved_tfcurv_model_loads_back_as_one(tmp_path, kind):
    if kind == "functional":
        model = tfcurv.Model(*_functional_layers())
    else:
        model = tfcurv.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert is_attached(loaded)
    x, _ = _data()
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_loaded_plain_model_can_be_attached(tmp_path):
    model = keras.Model(*_functional_layers())
    model.compile(
        optimizer=keras.optimizers.SGD(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    path = tmp_path / "plain.keras"
    model.save(path)
    loaded = tfcurv.attach(keras.models.load_model(path))
    assert np.isfinite(_compile_and_fit(loaded).history["loss"][0])


def test_keras_tensorboard_callback_logs_a_curvature_fit(tmp_path):
    """Keras' own TensorBoard callback in the README environment (the examples
    extra installs ``tensorboard``): the epoch losses it writes are the fit's."""
    import tensorflow as tf

    model = tfcurv.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    history = _compile_and_fit(
        model, 3, callbacks=[keras.callbacks.TensorBoard(log_dir=str(tmp_path))]
    )
    logged = {}
    for path in (tmp_path / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "epoch_loss":
                    logged[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(logged) == [0, 1, 2]
    np.testing.assert_allclose(
        [logged[step] for step in range(3)], history.history["loss"], rtol=1e-6
    )

