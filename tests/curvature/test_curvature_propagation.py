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


# ------------------------------------------------ the layer table's other layers
def _sequence_model():
    """Embedding, causal Conv1D, EinsumDense and a Dense called on two inputs."""
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(12, 4, name="emb")(inputs)
    h = keras.layers.Conv1D(3, 3, padding="causal", activation="tanh", name="conv1d")(h)
    h = keras.layers.EinsumDense(
        "abc,cd->abd", (6, 5), bias_axes="d", activation="softplus", name="einsum"
    )(h)
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    cropped = keras.layers.Cropping1D((1, 0), name="crop")(h)
    h = keras.layers.Concatenate(axis=1, name="join")([shared(h), shared(cropped)])
    h = keras.layers.Flatten(name="flat")(h)
    outputs = keras.layers.Dense(3, name="logits")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(5)
    return model, (rng.integers(0, 12, size=(4, 6)), np.array([0, 1, 2, 1]))


def _image_model():
    """DepthwiseConv2D, Conv2DTranspose and SeparableConv2D."""
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(6)
    inputs = keras.Input((5, 5, 2))
    h = keras.layers.DepthwiseConv2D(
        3, depth_multiplier=2, activation="tanh", name="depthwise"
    )(inputs)
    h = keras.layers.Conv2DTranspose(
        2, 2, strides=2, activation="sigmoid", name="transpose"
    )(h)
    h = keras.layers.SeparableConv2D(3, 3, activation="elu", name="separable")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(3, name="logits")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(7)
    return model, (rng.standard_normal((4, 5, 5, 2)), np.array([0, 1, 2, 1]))


@pytest.mark.parametrize("kind", [Hessian, GaussNewton])
@pytest.mark.parametrize("build", [_sequence_model, _image_model])
def test_curvature_propagation_is_unbiased_on_every_table_layer_and_shared_ones(
    kind, build, operators
):
    operator = operators(kind, build)
    exact = operator.diagonal("exact")
    sizes = [v.shape.num_elements() for v in operator.variables]
    for block in np.split(exact, np.cumsum(sizes)[:-1]):
        assert np.any(np.abs(block) > 1e-6)  # every variable takes part
    _assert_unbiased(_cp_samples(operator, 400), exact)


def test_duplicated_variables_count_once():
    model, batch = _sequence_model()
    shared = model.get_layer("shared")
    once = Hessian(model, _loss(), batch, variables=[shared])
    twice = Hessian(model, _loss(), batch, variables=[shared, shared.kernel, shared])
    assert twice.size == once.size == shared.kernel.shape.num_elements() + 5
    np.testing.assert_array_equal(
        twice.diagonal("curvature_propagation", num_samples=4, seed=2),
        once.diagonal("curvature_propagation", num_samples=4, seed=2),
    )


def _gru_then_dense():
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(8)
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(10, 3, name="emb")(inputs)
    h = keras.layers.GRU(4, name="gru")(h)
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(h)
    outputs = keras.layers.Dense(3, name="logits")(h)
    rng = np.random.default_rng(9)
    return keras.Model(inputs, outputs), (
        rng.integers(0, 10, size=(6, 5)), np.array([0, 1, 2, 1, 0, 2])
    )


def test_layers_outside_the_table_are_constants_when_variables_leave_them_out():
    model, batch = _gru_then_dense()
    after = [model.get_layer("hidden"), model.get_layer("logits")]
    hessian = Hessian(model, _loss(), batch, variables=after)
    _assert_unbiased(
        hessian._propagation_estimator().samples(*batch, None, 400, 0).numpy(),
        hessian.diagonal("exact"),
    )
    # The GRU's own variables have no rule; the Embedding's lie before the GRU,
    # whose second derivatives CP does not have.
    with pytest.raises(ValueError, match="'gru' \\(GRU\\).*variables="):
        Hessian(model, _loss(), batch).diagonal("curvature_propagation", num_samples=1)
    before = Hessian(model, _loss(), batch, variables=[model.get_layer("emb")])
    with pytest.raises(ValueError, match="'gru'.*between a selected layer and the loss"):
        before.diagonal("curvature_propagation", num_samples=1)
    # The Gauss-Newton matrix needs no second derivatives of the GRU.
    gauss_newton = GaussNewton(model, _loss(), batch, variables=[model.get_layer("emb")])
    _assert_unbiased(
        gauss_newton._propagation_estimator().samples(*batch, None, 400, 0).numpy(),
        gauss_newton.diagonal("exact"),
    )


def test_shared_layer_called_on_its_own_output():
    """Exact for the Gauss-Newton matrix; refused for the Hessian, whose
    ``W tanh(W x)`` term between the calls CP does not carry."""
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(10)
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(shared(shared(inputs))))
    rng = np.random.default_rng(11)
    batch = rng.standard_normal((5, 4)), np.array([0, 1, 2, 1, 0])
    gauss_newton = GaussNewton(model, _loss(), batch)
    _assert_unbiased(_cp_samples(gauss_newton, 400), gauss_newton.diagonal("exact"))
    with pytest.raises(ValueError, match="'shared'.*its own output"):
        Hessian(model, _loss(), batch).diagonal("curvature_propagation", num_samples=1)
