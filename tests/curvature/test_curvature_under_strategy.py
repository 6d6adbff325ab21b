"""Curvature under a distribution strategy: each product spread over the
replicas' shares of every batch and summed with one all-reduce equals the
single-device product on the same data."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcurv import Fisher, GaussNewton, Hessian


def _model():
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh", dtype="float64"),
            keras.layers.LayerNormalization(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


def _data():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(21, 5)), rng.integers(0, 3, 21)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # 8, 8, 5 rows


@pytest.fixture(scope="module")
def models(two_replica_strategy):
    keras.utils.set_random_seed(3)
    single = _model()
    with two_replica_strategy.scope():
        mirrored = _model()
    for source, target in zip(single.weights, mirrored.weights):
        target.assign(source.numpy())
    return single, mirrored


@pytest.mark.parametrize("kind", [Hessian, GaussNewton, Fisher])
def test_products_under_mirrored_strategy_equal_one_device(kind, models):
    single, mirrored = models
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    one = kind(single, loss, _data())
    spread = kind(mirrored, loss, _data())
    assert one.strategy is None and spread.strategy.num_replicas_in_sync == 2
    np.testing.assert_allclose(spread.dense(), one.dense(), rtol=1e-12, atol=1e-14)
    values, _ = spread.eigenvalues(top_n=2, seed=1)
    expected, _ = one.eigenvalues(top_n=2, seed=1)
    np.testing.assert_allclose(values, expected, rtol=1e-10)
    np.testing.assert_allclose(
        spread.trace("hutchinson", num_samples=5, seed=2),
        one.trace("hutchinson", num_samples=5, seed=2),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        spread.density(num_iter=6, seed=4).nodes,
        one.density(num_iter=6, seed=4).nodes,
        rtol=1e-9,
    )


def test_explicit_strategy_and_bad_values(models, two_replica_strategy):
    single, _ = models
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(1)
    batch = rng.normal(size=(4, 5)), rng.integers(0, 3, 4)
    spread = Hessian(single, loss, batch, strategy=two_replica_strategy)
    np.testing.assert_allclose(
        spread.dense(), Hessian(single, loss, batch).dense(), rtol=1e-12, atol=1e-14
    )
    with pytest.raises(ValueError, match="Argument `strategy`"):
        Hessian(single, loss, batch, strategy="mirrored")
    tiny = Hessian(single, loss, (batch[0][:1], batch[1][:1]), strategy=two_replica_strategy)
    with pytest.raises(ValueError, match="one example per replica"):
        tiny.dense()


def test_loss_none_means_the_compiled_loss(models):
    single, _ = models
    rng = np.random.default_rng(2)
    batch = rng.normal(size=(4, 5)), rng.integers(0, 3, 4)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(ValueError, match="not compiled with a loss"):
        Hessian(single, None, batch)
    single.compile(loss=loss)
    np.testing.assert_array_equal(
        Hessian(single, None, batch).dense(), Hessian(single, loss, batch).dense()
    )


def test_curvature_monitor_under_mirrored_strategy_equals_one_device(
    two_replica_strategy,
):
    """The monitor builds a Hessian of the model, so it inherits its strategy.
    The learning rate is 0 so that both models keep the same weights (training
    itself is compared elsewhere): only the monitor's products differ in how
    they are computed."""
    from tfcurv.analysis import CurvatureMonitor

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(16, 5)), rng.integers(0, 3, 16)
    held_out = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    logged = []
    for scope in (None, two_replica_strategy):
        keras.utils.set_random_seed(7)
        if scope is None:
            model = _model()
            model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
        else:
            with scope.scope():
                model = _model()
                model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
        monitor = CurvatureMonitor(held_out, top_n=2, trace="exact")
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[monitor])
        logged.append(history.history)
        used = monitor._operators[""].strategy
        assert (used is None) == (scope is None)
    for name in ("hessian_top_eigenvalue", "hessian_eigenvalue_2", "hessian_trace"):
        np.testing.assert_allclose(logged[1][name], logged[0][name], rtol=1e-11)
