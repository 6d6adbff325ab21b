"""CurvatureMonitor: the logged values, and that training is exactly unchanged."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcurv.analysis import CurvatureMonitor


def test_logs_known_eigenvalues_and_traces_into_history(quadratic, tmp_path):
    model = quadratic.model()
    monitor = CurvatureMonitor(
        quadratic.data,
        every=2,
        top_n=2,
        trace="exact",
        per_layer=True,
        log_dir=tmp_path,
        tol=1e-12,
    )
    history = model.fit(
        *quadratic.data, epochs=3, batch_size=8, verbose=0, callbacks=[monitor]
    )

    values, _ = quadratic.eigh()
    expected = {
        "hessian_top_eigenvalue": values[0],
        "hessian_eigenvalue_2": values[1],
        "hessian_trace": np.trace(quadratic.hessian),
    }
    for layer, block in quadratic.layer_slices.items():
        layer_values, _ = quadratic.eigh(block)
        expected[f"{layer}_hessian_top_eigenvalue"] = layer_values[0]
        expected[f"{layer}_hessian_eigenvalue_2"] = layer_values[1]
        expected[f"{layer}_hessian_trace"] = np.trace(quadratic.hessian[block, block])
    for name, value in expected.items():
        logged = history.history[name]
        assert len(logged) == 3 and math.isnan(logged[0]) and math.isnan(logged[2])
        assert logged[1] == pytest.approx(value, rel=1e-9)
        assert monitor.history[name] == [pytest.approx(value, rel=1e-9)]
    assert monitor.history["epoch"] == [1]

    scalars = {}  # TensorBoard scalars are float32
    for record in tf.data.TFRecordDataset(
        [str(p) for p in tmp_path.glob("events.out.tfevents.*")]
    ):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
            assert value.metadata.plugin_data.plugin_name == "scalars"
            scalars[(value.tag, event.step)] = tf.make_ndarray(value.tensor)
    assert len(scalars) == len(expected)
    for name in expected:
        assert scalars[(name, 1)] == np.float32(monitor.history[name][0])


def _batchnorm_dropout_model():
    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dropout(0.4),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(),
    )
    return model


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training_mode"])
def test_training_is_bit_identical_with_and_without_the_monitor(training):
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((64, 6)).astype("float32"), rng.integers(0, 3, 64)
    held_out = (x[:16] + 0.5, y[:16])

    def train(callbacks):
        model = _batchnorm_dropout_model()
        history = model.fit(
            x, y, batch_size=16, epochs=3, shuffle=True, verbose=0, callbacks=callbacks
        )
        return model, history.history["loss"]

    plain, plain_losses = train([])
    monitor = CurvatureMonitor(
        held_out, top_n=2, per_layer=True, training=training, trace_samples=3
    )
    monitored, monitored_losses = train([monitor])

    assert len(monitor.history["hessian_top_eigenvalue"]) == 3
    assert monitored_losses == plain_losses
    for mine, theirs in zip(
        monitored.variables, plain.variables
    ):  # incl. BN moving statistics
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(theirs)
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every": 0}, "every"),
        ({"top_n": 1.0}, "top_n"),
        ({"trace_samples": -1}, "trace_samples"),
        ({"trace": "exactly"}, "trace"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CurvatureMonitor((np.ones((1, 2)), np.ones((1,))), **kwargs)
