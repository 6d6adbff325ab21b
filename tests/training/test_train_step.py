"""The tfcurv train step: same numbers as Keras' step, and the right curvature.

Two kinds of checks, over model styles and Keras features:

* **equivalence**: a probe optimizer that needs curvature but updates with plain
  SGD, trained through the tfcurv step, must end at the same weights and logs
  as ``keras.optimizers.SGD`` trained through Keras' own step: loss, sample
  and class weights, several outputs and losses, metrics, regularisation,
  ``steps_per_execution``, ``jit_compile``, gradient accumulation, callbacks;
* **curvature**: the ``H·1`` and the layer output gradients that the step hands
  over equal references computed here with nested tapes at the same weights.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfcurv
from tests.training.probe_optimizers import HVPProbe, StatisticsProbe
from tfcurv.curvature.exact_moments import exact_second_derivatives

LEARNING_RATE = 0.05
BATCH = 6
STEPS = 4


def _data(outputs: int = 1):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH * STEPS, 4)).astype("float32")
    y = rng.integers(0, 3, BATCH * STEPS)
    weights = rng.uniform(0.2, 2.0, BATCH * STEPS).astype("float32")
    if outputs == 1:
        return x, y, weights
    return x, {"cls": y, "reg": x[:, :2] * 0.5}, {"cls": weights, "reg": weights[::-1]}


def _layers(two_outputs: bool):
    """Dense with a fused activation and a regulariser, BatchNormalization, heads."""
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(
        5,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(0.01),
        kernel_initializer=keras.initializers.GlorotUniform(seed=3),
    )(inputs)
    hidden = keras.layers.BatchNormalization()(hidden)
    logits = keras.layers.Dense(
        3, name="cls", kernel_initializer=keras.initializers.GlorotUniform(seed=4)
    )(hidden)
    if not two_outputs:
        return inputs, logits
    regression = keras.layers.Dense(
        2, name="reg", kernel_initializer=keras.initializers.GlorotUniform(seed=5)
    )(hidden)
    return inputs, {"cls": logits, "reg": regression}


class _Subclassed:
    """Builds the same network as a subclassed model of a given base class."""

    @staticmethod
    def make(base):
        class Network(base):
            def __init__(self):
                super().__init__()
                self.hidden = keras.layers.Dense(
                    5,
                    activation="tanh",
                    kernel_regularizer=keras.regularizers.L2(0.01),
                    kernel_initializer=keras.initializers.GlorotUniform(seed=3),
                )
                self.norm = keras.layers.BatchNormalization()
                self.head = keras.layers.Dense(
                    3, kernel_initializer=keras.initializers.GlorotUniform(seed=4)
                )

            def call(self, x, training=False):
                return self.head(self.norm(self.hidden(x), training=training))

        return Network()


def build(style: str, two_outputs: bool = False, tfcurv_step: bool = True):
    """The test network in one of the model styles, with or without the tfcurv step."""
    if style == "sequential":
        assert not two_outputs
        cls = tfcurv.Sequential if tfcurv_step else keras.Sequential
        model = cls(
            [
                keras.Input((4,)),
                keras.layers.Dense(
                    5,
                    activation="tanh",
                    kernel_regularizer=keras.regularizers.L2(0.01),
                    kernel_initializer=keras.initializers.GlorotUniform(seed=3),
                ),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(
                    3, kernel_initializer=keras.initializers.GlorotUniform(seed=4)
                ),
            ]
        )
        return model
    if style == "functional":
        cls = tfcurv.Model if tfcurv_step else keras.Model
        return cls(*_layers(two_outputs))
    if style == "subclassed":
        assert not two_outputs
        return _Subclassed.make(tfcurv.Model if tfcurv_step else keras.Model)
    if style == "attached":
        model = keras.Model(*_layers(two_outputs))
        return tfcurv.attach(model) if tfcurv_step else model
    raise ValueError(style)


def _compile(model, optimizer, two_outputs: bool, **kwargs):
    if two_outputs:
        loss = {
            "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "reg": keras.losses.MeanSquaredError(),
        }
        metrics = {"cls": ["sparse_categorical_accuracy"], "reg": ["mae"]}
        kwargs.setdefault("loss_weights", {"cls": 1.0, "reg": 0.5})
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = ["sparse_categorical_accuracy"]
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))


#: Feature combinations; each model style is trained with each of them.
COMBINATIONS = {
    # sample weights, two outputs with two losses and loss weights (where the
    # style allows it), metrics, several steps per execution, gradient
    # accumulation, callbacks
    "weights_outputs_steps_accumulation": {
        "sample_weight": True,
        "two_outputs": True,
        "steps_per_execution": 2,
        "gradient_accumulation_steps": 2,
    },
    "class_weight_jit_compile": {
        "class_weight": {0: 0.5, 1: 2.0, 2: 1.0},
        "jit_compile": True,
    },
}
STYLES = ("sequential", "functional", "subclassed", "attached")


def _train(style, combination, tfcurv_step):
    features = COMBINATIONS[combination]
    two_outputs = features.get("two_outputs", False) and style in (
        "functional",
        "attached",
    )
    model = build(style, two_outputs=two_outputs, tfcurv_step=tfcurv_step)
    optimizer_kwargs = {"learning_rate": LEARNING_RATE}
    if "gradient_accumulation_steps" in features:
        optimizer_kwargs["gradient_accumulation_steps"] = features[
            "gradient_accumulation_steps"
        ]
    optimizer = (
        HVPProbe(**optimizer_kwargs)
        if tfcurv_step
        else keras.optimizers.SGD(**optimizer_kwargs)
    )
    compile_kwargs = {
        key: features[key]
        for key in ("steps_per_execution", "jit_compile")
        if key in features
    }
    _compile(model, optimizer, two_outputs, **compile_kwargs)
    x, y, weights = _data(2 if two_outputs else 1)
    fit_kwargs = {}
    if features.get("sample_weight"):
        fit_kwargs["sample_weight"] = weights
    if "class_weight" in features:
        fit_kwargs["class_weight"] = features["class_weight"]
    logs = _BatchLogs()
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[logs],
        **fit_kwargs,
    )
    return model, history.history, logs.logs


_keras_results: dict = {}


def _keras_result(style, combination):
    """Keras' own step on the same network (identical for every style: cached)."""
    two_outputs = "two_outputs" in COMBINATIONS[combination] and style in (
        "functional",
        "attached",
    )
    key = (combination, two_outputs)
    if key not in _keras_results:
        model, history, logs = _train(
            "functional" if two_outputs else "sequential",
            combination,
            tfcurv_step=False,
        )
        _keras_results[key] = ([w.numpy() for w in model.weights], history, logs)
        keras.utils.clear_session()
    return _keras_results[key]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    "combination",
    [
        pytest.param(
            name, marks=[pytest.mark.xla, pytest.mark.slow] if "jit" in name else []
        )
        for name in COMBINATIONS
    ],
)
def test_tfcurv_step_gives_the_numbers_of_keras_step(style, combination):
    weights, reference_history, reference_logs = _keras_result(style, combination)
    model, history, batch_logs = _train(style, combination, tfcurv_step=True)
    assert sorted(history) == sorted(reference_history)
    for key in reference_history:
        np.testing.assert_allclose(
            history[key], reference_history[key], rtol=1e-6, err_msg=key
        )
    assert len(batch_logs) == len(reference_logs)  # callbacks saw every step
    for got, expected in zip(batch_logs, reference_logs):
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)
    assert len(model.weights) == len(weights)
    for got, expected in zip(model.weights, weights):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)
    # The probe really got curvature, and it was finite.
    products = np.concatenate([p.numpy().ravel() for p in model.optimizer.products])
    assert np.all(np.isfinite(products)) and np.any(products != 0)


def _reference_hvp_of_ones(model, x, y, sample_weight=None, variables=None):
    """``H·1`` of the training loss at the current weights, by nested tapes,
    restricted to ``variables`` (ones there, rows there; default: all)."""
    variables = variables or model.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            with exact_second_derivatives():
                y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred, sample_weight, training=True)
        gradients = inner.gradient(loss, variables)
        total = tf.add_n([tf.reduce_sum(g) for g in gradients])
    products = outer.gradient(
        total, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    return [p.numpy() for p in products]


@pytest.mark.parametrize("style", ["functional", "subclassed", "attached"])
def test_the_product_handed_over_is_the_hessian_of_the_training_loss(style):
    keras.config.set_floatx("float64")
    model = build(style)
    _compile(model, HVPProbe(learning_rate=LEARNING_RATE), two_outputs=False)
    x, y, weights = _data()
    x, y, weights = (
        x[:BATCH].astype("float64"),
        y[:BATCH],
        weights[:BATCH].astype("float64"),
    )
    model(x)  # build the subclassed model
    initial = [w.numpy() for w in model.weights]
    expected = _reference_hvp_of_ones(model, x, y, weights)
    model.set_weights(initial)  # undo the reference pass' BatchNorm statistics
    model.fit(x, y, sample_weight=weights, batch_size=BATCH, verbose=0)
    for got, want in zip(model.optimizer.products, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


def test_layer_statistics_are_the_output_gradients_of_the_training_loss():
    keras.config.set_floatx("float64")
    model = build("functional")
    _compile(model, StatisticsProbe(learning_rate=LEARNING_RATE), two_outputs=False)
    x, y, _ = _data()
    x, y = x[:BATCH].astype("float64"), y[:BATCH]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    # Reference: a model exposing each Dense pre-activation as an extra input to
    # the loss, via the capture-free route of separate tapes on the layers.
    hidden, norm, head = dense[0], model.layers[2], dense[1]
    initial = [w.numpy() for w in model.weights]
    with tf.GradientTape() as tape:
        pre_hidden = tf.matmul(x, hidden.kernel) + hidden.bias
        tape.watch(pre_hidden)
        logits_in = norm(tf.tanh(pre_hidden), training=True)
        logits = tf.matmul(logits_in, head.kernel) + head.bias
        tape.watch(logits)
        loss = model.compute_loss(x, y, logits, training=True)
    expected_dz = [
        (g.numpy() ** 2).sum(0) for g in tape.gradient(loss, [pre_hidden, logits])
    ]
    expected_x = [(x**2).mean(0), (logits_in.numpy() ** 2).mean(0)]
    model.set_weights(initial)
    model.fit(x, y, batch_size=BATCH, verbose=0)
    stored = [s.numpy() for s in model.optimizer.stored]
    for layer in range(2):
        np.testing.assert_allclose(stored[2 * layer], expected_dz[layer], rtol=1e-9)
        np.testing.assert_allclose(stored[2 * layer + 1], expected_x[layer], rtol=1e-9)


def test_plain_optimizer_runs_keras_own_step_unchanged(monkeypatch):
    def refuse(model, data):
        raise AssertionError("the tfcurv step ran for a plain optimizer")

    monkeypatch.setattr(tfcurv.training.models, "curvature_train_step", refuse)
    x, y, _ = _data()
    trained, initial = [], None
    for tfcurv_step in (True, False):
        model = build("functional", tfcurv_step=tfcurv_step)
        initial = initial or model.get_weights()
        model.set_weights(initial)
        _compile(model, keras.optimizers.SGD(LEARNING_RATE), two_outputs=False)
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
        trained.append([w.numpy() for w in model.weights])
    for got, expected in zip(*trained):
        np.testing.assert_array_equal(got, expected)


def test_evaluate_and_predict_are_keras_own():
    model = build("functional")
    _compile(model, HVPProbe(learning_rate=LEARNING_RATE), two_outputs=False)
    reference = build("functional", tfcurv_step=False)
    reference.set_weights(model.get_weights())
    _compile(reference, keras.optimizers.SGD(LEARNING_RATE), two_outputs=False)
    x, y, _ = _data()
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), reference.predict(x, verbose=0)
    )
    np.testing.assert_array_equal(
        model.evaluate(x, y, verbose=0), reference.evaluate(x, y, verbose=0)
    )


@pytest.mark.skipif(
    not hasattr(keras.optimizers, "MultiOptimizer"),
    reason="this Keras (3.13) has no MultiOptimizer",
)
def test_multi_optimizer_is_looked_through_and_each_curvature_optimizer_served():
    """Two HVP probes and Keras SGD behind one MultiOptimizer: each probe gets
    ``H·1`` restricted to its own variables (ones there, rows there)."""
    keras.config.set_floatx("float64")
    x, y, _ = _data()
    x, y = x[:BATCH].astype("float64"), y[:BATCH]
    model = build("functional")
    hidden, head = (
        layer for layer in model.layers if isinstance(layer, keras.layers.Dense)
    )
    probes = [HVPProbe(learning_rate=LEARNING_RATE) for _ in range(2)]
    optimizer = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(LEARNING_RATE),
            {f"{hidden.name}/.*": probes[0], f"{head.name}/.*": probes[1]},
        )
    )
    _compile(model, optimizer, two_outputs=False)
    initial = model.get_weights()
    expected = []
    for layer in (hidden, head):
        expected.append(
            _reference_hvp_of_ones(model, x, y, variables=layer.trainable_variables)
        )
        model.set_weights(initial)
    model.fit(x, y, batch_size=BATCH, verbose=0)
    for probe, want in zip(probes, expected):
        assert len(probe.products) == len(want) == 2
        for got, reference in zip(probe.products, want):
            np.testing.assert_allclose(got.numpy(), reference, rtol=1e-5, atol=1e-7)
