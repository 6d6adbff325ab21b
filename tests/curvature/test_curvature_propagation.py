"""Curvature Propagation and Hutchinson diagonals: unbiasedness and variance (fixed seeds).

Unbiasedness is checked coordinate by coordinate with a z-test: with ``n``
independent samples, ``|mean - exact| <= Z * std / sqrt(n)``. ``Z = 5`` makes a
false failure of any one of P coordinates a < P * 6e-7 event (Bonferroni),
i.e. a confidence above 99.8 % for every model here; the seeds are fixed, so
the outcome is deterministic.
"""

import keras
import numpy as np
import pytest

from tfcurv import GaussNewton, Hessian
from tfcurv.curvature import diagonal as diagonal_lib

Z = 5.0


def _assert_unbiased(samples, exact):
    samples = np.asarray(samples)
    mean, std = samples.mean(axis=0), samples.std(axis=0, ddof=1)
    bound = Z * std / np.sqrt(samples.shape[0]) + 1e-12 * np.max(np.abs(exact))
    worst = np.argmax(np.abs(mean - exact) - bound)
    assert np.all(np.abs(mean - exact) <= bound), (
        worst,
        mean[worst],
        exact[worst],
        std[worst],
    )


def _tanh_mlp():
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(0)
    return model, (rng.standard_normal((3, 4)), np.array([0, 2, 1]))


def _conv_model():
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("softplus", name="softplus")(h)
    skip = keras.layers.Conv2D(3, 1, activation="sigmoid", name="skip")(inputs)
    h = keras.layers.Add(name="add")([h, skip])
    h = keras.layers.DepthwiseConv2D(
        3, depth_multiplier=2, activation="tanh", name="depthwise"
    )(h)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dropout(0.3, name="dropout")(h)
    outputs = keras.layers.Dense(4, activation="elu", name="hidden")(h)
    outputs = keras.layers.Dense(3, name="logits")(outputs)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    model.layers[2].moving_variance.assign(rng.uniform(0.5, 2.0, 3))
    return model, (rng.standard_normal((4, 6, 6, 2)), np.array([0, 1, 2, 1]))


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def operators():
    """``operators(kind, build)``: one operator per model and kind for the module.

    Shared so that each compiled product and CP estimator is traced once.
    """
    cache = {}

    def get(kind, build):
        if (kind, build) not in cache:
            model, batch = build()
            cache[kind, build] = kind(model, _loss(), batch)
        return cache[kind, build]

    return get


def _cp_samples(operator, num_samples, seed=0):
    x, y, _ = operator.data._batch
    estimator = operator._propagation_estimator()
    return estimator.samples(x, y, None, num_samples, seed).numpy()


@pytest.mark.parametrize("kind", [Hessian, GaussNewton])
@pytest.mark.parametrize("build", [_tanh_mlp, _conv_model])
def test_curvature_propagation_is_unbiased(kind, build, operators):
    operator = operators(kind, build)
    exact = operator.diagonal("exact")
    _assert_unbiased(_cp_samples(operator, 400), exact)
    # The public method is the mean of the same estimator's samples.
    mean = operator.diagonal("curvature_propagation", num_samples=16, seed=1)
    np.testing.assert_allclose(
        mean, _cp_samples(operator, 16, seed=1).mean(axis=0), rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("kind", [Hessian, GaussNewton])
def test_hutchinson_is_unbiased(kind, operators):
    operator = operators(kind, _tanh_mlp)
    samples = diagonal_lib.hutchinson_samples(
        operator._matmat, operator.size, operator.dtype, 400, seed=0
    ).numpy()
    _assert_unbiased(samples, operator.diagonal("exact"))


def test_curvature_propagation_gauss_newton_diagonal_matches_fixture(make_reference):
    reference = make_reference("mlp_tanh")
    operator = reference.operator(GaussNewton)
    _assert_unbiased(_cp_samples(operator, 200), reference.arrays["gn_diag"])


def test_curvature_propagation_variance_is_below_hutchinson_on_tanh_mlp(operators):
    """Measured: mean single-sample variance per coordinate, 2000 samples each."""
    operator = operators(Hessian, _tanh_mlp)
    cp = _cp_samples(operator, 2000, seed=3).var(axis=0).mean()
    hutchinson = (
        diagonal_lib.hutchinson_samples(
            operator._matmat, operator.size, operator.dtype, 2000, 3
        )
        .numpy()
        .var(axis=0)
        .mean()
    )
    # The spec's toy (same architecture) measured a ratio of about 1/8.6; the
    # estimated ratio has a few per cent of sampling error at 2000 samples.
    assert cp <= hutchinson / 4, (cp, hutchinson)


def test_unsupported_layer_is_named():
    keras.config.set_floatx("float64")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5), keras.layers.LayerNormalization(name="ln"),
         keras.layers.Dense(3)]
    )  # fmt: skip
    hessian = Hessian(model, _loss(), (np.zeros((2, 4)), np.array([0, 1])))
    with pytest.raises(ValueError, match="'ln'.*LayerNormalization"):
        hessian.diagonal("curvature_propagation", num_samples=1)


def test_batch_normalization_in_training_mode_is_refused():
    model, batch = _conv_model()
    hessian = Hessian(model, _loss(), batch, training=True)
    with pytest.raises(ValueError, match="'bn'.*inference"):
        hessian.diagonal("curvature_propagation", num_samples=1)


def test_probability_outputs_are_refused():
    model, batch = _tanh_mlp()
    hessian = Hessian(model, keras.losses.SparseCategoricalCrossentropy(), batch)
    with pytest.raises(ValueError, match="from_logits=True"):
        hessian.diagonal("curvature_propagation", num_samples=1)
