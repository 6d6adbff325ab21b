"""Behaviour of tfcurv.Hessian / GaussNewton beyond the fixtures: state, data, modes, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcurv import GaussNewton, Hessian


def _flat(vectors):
    return np.concatenate([np.asarray(v).ravel() for v in vectors])


def _mlp(regulariser=None, dropout=False, batch_norm=False):
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(1)
    layers = [keras.Input((6,)), keras.layers.Dense(5, kernel_regularizer=regulariser)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Activation("tanh"))
    if dropout:
        layers.append(keras.layers.Dropout(0.5))
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def _data(count=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 6)), rng.integers(0, 3, count)


def _logits_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_training_mode_never_changes_the_model():
    model = _mlp(dropout=True, batch_norm=True)
    dropout = model.layers[-2]
    state_before = [v.numpy().copy() for v in model.variables]
    seed_before = dropout.seed_generator.state.numpy().copy()
    hessian = Hessian(model, _logits_loss(), _data(), training=True)
    first = hessian.dense()
    hessian.eigenvalues(top_n=2)
    hessian.trace("hutchinson", num_samples=3)
    GaussNewton(model, _logits_loss(), _data(), training=True).dense()
    for before, after in zip(state_before, model.variables):
        np.testing.assert_array_equal(before, after.numpy())
    np.testing.assert_array_equal(seed_before, dropout.seed_generator.state.numpy())
    # One fixed function: the same mask and batch statistics every evaluation.
    np.testing.assert_array_equal(first, hessian.dense())
    inference = Hessian(model, _logits_loss(), _data(), training=False).dense()
    assert np.max(np.abs(first - inference)) > 1e-3 * np.max(np.abs(first))


def test_forward_over_reverse_equals_reverse_over_reverse(make_reference):
    reference = make_reference("bn_cnn")
    reverse = reference.operator(Hessian)
    forward = reference.operator(Hessian, mode="forward_over_reverse")
    rng = np.random.default_rng(3)
    vector = [rng.standard_normal(v.shape) for v in reference.model.trainable_variables]
    a, b = _flat(reverse.vp(vector)), _flat(forward.vp(vector))
    assert np.max(np.abs(a - b)) <= 1e-10 * np.max(np.abs(a))


@pytest.mark.parametrize("kind", [Hessian, GaussNewton])
def test_dataset_average_equals_one_big_batch(kind):
    model = _mlp()
    x, y = _data(25)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)  # 10, 10, 5
    rng = np.random.default_rng(4)
    vector = [rng.standard_normal(v.shape) for v in model.trainable_variables]
    whole = _flat(kind(model, _logits_loss(), (x, y)).vp(vector))
    batched = _flat(kind(model, _logits_loss(), dataset, progress=True).vp(vector))
    np.testing.assert_allclose(batched, whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "loss, labels",
    [
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sparse"),
        ("sparse_categorical_crossentropy", "sparse_probabilities"),
        (keras.losses.SparseCategoricalCrossentropy(), "sparse_probabilities"),
        (keras.losses.CategoricalCrossentropy(from_logits=True), "onehot"),
        ("categorical_crossentropy", "onehot_probabilities"),
    ],
)
def test_every_crossentropy_path_has_exact_second_derivatives(loss, labels):
    """TF 2.21 differentiates every path twice; a regression would fail here."""
    model = _mlp()
    x, y = _data()
    if labels.endswith("probabilities"):
        model = keras.Sequential([model, keras.layers.Softmax()])
    target = keras.ops.one_hot(y, 3) if labels.startswith("onehot") else y

    def plain_crossentropy(y_true, logits):
        return -tf.reduce_sum(
            tf.one_hot(y, 3, dtype=logits.dtype) * tf.nn.log_softmax(logits), -1
        )

    base = model.layers[0] if labels.endswith("probabilities") else model
    expected = Hessian(base, plain_crossentropy, (x, y)).dense()
    np.testing.assert_allclose(
        Hessian(model, loss, (x, target)).dense(), expected, atol=1e-12
    )


def test_regularisation_losses_are_included():
    x, y = _data()
    plain = Hessian(_mlp(), _logits_loss(), (x, y)).dense()
    regularised_model = _mlp(keras.regularizers.L2(0.25))
    regularised = Hessian(regularised_model, _logits_loss(), (x, y)).dense()
    kernel_size = 6 * 5
    expected = plain.copy()
    expected[np.arange(kernel_size), np.arange(kernel_size)] += (
        0.5  # d^2 (0.25 w^2) = 0.5
    )
    np.testing.assert_allclose(regularised, expected, atol=1e-12)
    gauss_newton = GaussNewton(regularised_model, _logits_loss(), (x, y)).dense()
    plain_gn = GaussNewton(_mlp(), _logits_loss(), (x, y)).dense()
    np.testing.assert_allclose(
        np.diag(gauss_newton - plain_gn)[:kernel_size], 0.5, atol=1e-12
    )


def test_variables_restrict_to_a_layer():
    model = _mlp()
    full = Hessian(model, _logits_loss(), _data()).dense()
    last = Hessian(model, _logits_loss(), _data(), variables=model.layers[-1]).dense()
    start = 6 * 5 + 5
    np.testing.assert_allclose(last, full[start:, start:], atol=1e-14)


def test_density_quadrature_is_exact_with_a_full_krylov_space():
    model = _mlp()
    hessian = Hessian(model, _logits_loss(), _data(), variables=model.layers[-1])
    eigenvalues = np.linalg.eigvalsh(hessian.dense())
    density = hessian.density(num_iter=hessian.size, num_runs=2, seed=5)
    np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, atol=1e-12)
    for nodes, weights in zip(density.nodes, density.weights):
        kept = weights > 1e-10
        distance = np.min(np.abs(nodes[kept][:, None] - eigenvalues[None]), axis=1)
        assert np.max(distance) <= 1e-8 * np.max(np.abs(eigenvalues))
    grid, smooth = density.smoothed()
    assert abs(np.trapezoid(smooth, grid) - 1) < 1e-3
    density.plot()


def test_traces_agree_with_exact_trace():
    model = _mlp()
    hessian = Hessian(model, _logits_loss(), _data())
    exact = np.trace(hessian.dense())
    assert hessian.trace("exact") == pytest.approx(exact, rel=1e-12)
    # Hutch++ with all P products sketches the whole space: exact up to rounding.
    assert hessian.trace("hutch++", num_samples=3 * hessian.size) == pytest.approx(
        exact, rel=1e-8
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda h: h.dense(max_size=10), "max_size=10"),
        (lambda h: h.eigenvalues(top_n=0), "top_n"),
        (lambda h: h.eigenvalues(method="arnoldi"), "method"),
        (lambda h: h.trace(method="exactly"), "method"),
        (lambda h: h.diagonal(method="becker_lecun"), "method"),
        (lambda h: h.diagonal("hutchinson", num_samples=0), "num_samples"),
        (lambda h: h.vp([np.zeros(3)]), "vectors"),
        (lambda h: h.vp([None] * len(h.variables)), "Argument `vectors`.*entry 0"),
        (lambda h: h.eigenvalues(tol="x"), "Argument `tol`"),
        (lambda h: h.eigenvalues(seed="abc"), "Argument `seed`"),
        (lambda h: h.trace(seed=2**70), "Argument `seed`.*2\\*\\*63"),
        (lambda h: h.diagonal("hutchinson", seed=-1), "Argument `seed`"),
        (lambda h: h.density(seed=1.5), "Argument `seed`"),
    ],
)
def test_bad_arguments_raise(call, message):
    hessian = Hessian(_mlp(), _logits_loss(), _data())
    with pytest.raises(ValueError, match=message):
        call(hessian)


def test_bad_constructor_arguments_raise():
    model = _mlp()
    with pytest.raises(ValueError, match="training"):
        Hessian(model, _logits_loss(), _data(), training="yes")
    with pytest.raises(ValueError, match="data"):
        Hessian(model, _logits_loss(), _data()[0])
    with pytest.raises(ValueError, match="loss"):
        Hessian(model, 3, _data())
    with pytest.raises(ValueError, match="variables"):
        Hessian(model, _logits_loss(), _data(), variables=[tf.Variable(1.0)])
    with pytest.raises(ValueError, match="mode"):
        Hessian(model, _logits_loss(), _data(), mode="forward")
    with pytest.raises(ValueError, match="Argument `model`.*keras.Model"):
        Hessian(None, _logits_loss(), _data())
    with pytest.raises(ValueError, match="Argument `model`.*keras.Model"):
        Hessian(model.layers[0], _logits_loss(), _data())
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="Argument `model` must be built"):
        Hessian(unbuilt, _logits_loss(), _data())
    x, y = _data()
    with pytest.raises(ValueError, match="Argument `data`.*0 rows"):
        Hessian(model, _logits_loss(), (x[:0], y[:0]))


def test_layerwise_summary_matches_the_blocks_of_the_dense_hessian():
    from tfcurv.curvature.layerwise import layerwise_summary

    model = _mlp()
    full = Hessian(model, _logits_loss(), _data()).dense()
    rows = layerwise_summary(
        model, _logits_loss(), _data(), trace_method="exact", tol=1e-10
    )
    assert [r["layer"] for r in rows] == [model.layers[0].name, model.layers[-1].name]
    start = 0
    for row in rows:
        block = full[
            start : start + row["parameters"], start : start + row["parameters"]
        ]
        assert row["trace"] == pytest.approx(np.trace(block), rel=1e-10)
        assert row["top_eigenvalue"] == pytest.approx(
            np.linalg.eigvalsh(block)[-1], rel=1e-8
        )
        start += row["parameters"]
    assert start == full.shape[0]
