"""tfcurv.curvature.Fisher against independent references on a tiny model.

* Empirical Fisher: ``(1/N) sum_n g_n g_n^T`` from per-example gradients taken
  with ``tape.jacobian`` of the per-example losses (no tfcurv code involved).
* Sampled-label Fisher: for one seed it is the empirical Fisher at the labels it
  drew (checked exactly); the draws follow the model's softmax (z-test); the exact
  expectation over labels (enumerated) is the Gauss-Newton matrix; and for each
  supported loss the mean quadratic form over many seeds converges to the
  Gauss-Newton one (z-test).

Statistical tests use fixed seeds and ``Z = 5``: a false failure of one checked
quantity has probability below 6e-7 under the normal approximation, so below
1e-4 for every test here together (Bonferroni); being seeded, the outcome is
deterministic.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcurv import Fisher, GaussNewton
from tfcurv.curvature.fisher import sample_targets
from tfcurv.curvature.losses import LossKind

Z = 5.0
CLASSES = 3


def _model(outputs=CLASSES, regulariser=None):
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh", kernel_regularizer=regulariser),
            keras.layers.Dense(outputs),
        ]
    )


def _batch(count=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 4)), rng.integers(0, CLASSES, count)


def _sparse_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _per_example_gradients(model, x, labels):
    """``(N, P)``: row ``n`` is the gradient of example ``n``'s cross-entropy."""
    with tf.GradientTape() as tape:
        logits = model(x)
        losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    jacobians = tape.jacobian(losses, [v.value for v in model.trainable_variables])
    return np.concatenate([np.reshape(j.numpy(), (len(x), -1)) for j in jacobians], axis=1)


def _empirical_reference(model, x, labels):
    gradients = _per_example_gradients(model, x, labels)
    return gradients.T @ gradients / len(x)


def test_empirical_fisher_equals_mean_outer_product_of_per_example_gradients():
    model, (x, y) = _model(), _batch()
    fisher = Fisher(model, _sparse_loss(), (x, y))
    reference = _empirical_reference(model, x, y)
    np.testing.assert_allclose(fisher.dense(), reference, rtol=0, atol=1e-13)
    # The shared operator machinery works on it: vp, diagonal, trace, spectrum.
    rng = np.random.default_rng(1)
    vector = [rng.standard_normal(v.shape) for v in model.trainable_variables]
    flat = np.concatenate([v.ravel() for v in vector])
    product = np.concatenate([np.ravel(p) for p in fisher.vp(vector)])
    np.testing.assert_allclose(product, reference @ flat, atol=1e-13)
    np.testing.assert_allclose(fisher.diagonal("exact"), np.diag(reference), atol=1e-13)
    assert fisher.trace("exact") == pytest.approx(np.trace(reference), rel=1e-12)
    values, _ = fisher.eigenvalues(top_n=2, tol=1e-10)
    np.testing.assert_allclose(values, np.linalg.eigvalsh(reference)[::-1][:2], rtol=1e-8)


def test_empirical_fisher_over_a_dataset_is_the_mean_over_all_examples():
    model, (x, y) = _model(), _batch(count=7)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)  # 3, 3, 1
    np.testing.assert_allclose(
        Fisher(model, _sparse_loss(), dataset).dense(),
        _empirical_reference(model, x, y),
        atol=1e-13,
    )


def test_regularisation_adds_its_exact_hessian():
    x, y = _batch()
    plain = Fisher(_model(), _sparse_loss(), (x, y)).dense()
    regularised = Fisher(_model(regulariser=keras.regularizers.L2(0.25)), _sparse_loss(), (x, y))
    expected = plain.copy()
    kernel = np.arange(4 * 3)
    expected[kernel, kernel] += 0.5  # d^2 (0.25 w^2) / dw^2
    np.testing.assert_allclose(regularised.dense(), expected, atol=1e-13)


def _logits(model, x):
    return model(x).numpy()


def test_sampled_fisher_is_the_empirical_fisher_at_the_labels_it_drew():
    model, (x, y) = _model(), _batch()
    for seed in (0, 1):
        drawn = sample_targets(
            LossKind("softmax_crossentropy", sparse=True),
            tf.constant(_logits(model, x)),
            tf.constant([seed, 0], tf.int64),  # the seed of the first (only) batch
        ).numpy()
        sampled = Fisher(model, _sparse_loss(), (x, y), kind="sampled", seed=seed)
        np.testing.assert_allclose(
            sampled.dense(), _empirical_reference(model, x, drawn), atol=1e-13
        )


def test_sampled_labels_follow_the_softmax():
    """Each class frequency within Z standard errors of its probability."""
    logits = tf.constant([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], tf.float64)
    draws = 4000
    tiled = tf.tile(logits, [draws, 1])
    labels = sample_targets(
        LossKind("softmax_crossentropy", sparse=True), tiled, tf.constant([3, 0], tf.int64)
    ).numpy()
    labels = labels.reshape(draws, 2)
    probabilities = tf.nn.softmax(logits).numpy()
    for row in range(2):
        frequency = np.bincount(labels[:, row], minlength=CLASSES) / draws
        error = np.sqrt(probabilities[row] * (1 - probabilities[row]) / draws)
        assert np.all(np.abs(frequency - probabilities[row]) <= Z * error)


def test_expected_sampled_fisher_is_the_gauss_newton_matrix():
    """Exact expectation over the labels, each example's class weighted by its softmax.

    The sampled Fisher is a sum of one term per example, so its expectation over
    all joint label draws is the sum over examples of each term's expectation.
    """
    model, (x, y) = _model(), _batch()
    probabilities = tf.nn.softmax(_logits(model, x)).numpy()
    expectation = 0
    for label in range(CLASSES):
        gradients = _per_example_gradients(model, x, np.full(len(x), label))
        weighted = gradients * probabilities[:, label : label + 1]
        expectation = expectation + weighted.T @ gradients / len(x)
    gauss_newton = GaussNewton(model, _sparse_loss(), (x, y)).dense()
    np.testing.assert_allclose(expectation, gauss_newton, atol=1e-13)


@pytest.mark.parametrize(
    "loss, outputs, targets",
    [
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), 3, "sparse"),
        (keras.losses.CategoricalCrossentropy(from_logits=True), 3, "onehot"),
        (keras.losses.BinaryCrossentropy(from_logits=True), 2, "binary"),
        (keras.losses.MeanSquaredError(), 2, "real"),
    ],
)
def test_sampled_fisher_quadratic_forms_converge_to_gauss_newton(loss, outputs, targets):
    """``v^T F_s v`` over independent seeds: mean within Z standard errors of ``v^T G v``."""
    model = _model(outputs)
    x, labels = _batch(count=4)
    if targets == "sparse":
        y = labels
    elif targets == "onehot":
        y = np.eye(outputs)[labels]
    elif targets == "binary":
        y = (np.arange(4 * outputs).reshape(4, outputs) % 2).astype(float)
    else:
        y = np.linspace(-1, 1, 4 * outputs).reshape(4, outputs)
    rng = np.random.default_rng(5)
    vector = [rng.standard_normal(v.shape) for v in model.trainable_variables]
    flat = np.concatenate([v.ravel() for v in vector])

    def quadratic_form(operator):
        return flat @ np.concatenate([np.ravel(p) for p in operator.vp(vector)])

    expected = quadratic_form(GaussNewton(model, loss, (x, y)))
    # One operator per seed; the compiled product is shared by reseeding one.
    operator = Fisher(model, loss, (x, y), kind="sampled")
    forms = []
    for seed in range(300):
        operator.sampling_seed = seed
        forms.append(quadratic_form(operator))
    forms = np.array(forms)
    assert np.std(forms) > 0  # really sampled
    error = np.std(forms, ddof=1) / np.sqrt(len(forms))
    assert abs(forms.mean() - expected) <= Z * error, (forms.mean(), expected, error)


def test_bad_arguments_raise():
    model, batch = _model(), _batch()
    with pytest.raises(ValueError, match="kind"):
        Fisher(model, _sparse_loss(), batch, kind="true")
    with pytest.raises(ValueError, match="seed"):
        Fisher(model, _sparse_loss(), batch, kind="sampled", seed=0.5)
    with pytest.raises(ValueError, match="from_logits=True"):
        Fisher(model, keras.losses.SparseCategoricalCrossentropy(), batch, kind="sampled")
    with pytest.raises(ValueError, match="reduction"):
        Fisher(model, keras.losses.SparseCategoricalCrossentropy(reduction="sum"), batch)
    with pytest.raises(ValueError, match="mode"):
        Fisher(model, _sparse_loss(), batch, mode="forward_over_reverse")
    with pytest.raises(ValueError, match="curvature_propagation"):
        Fisher(model, _sparse_loss(), batch).diagonal("curvature_propagation")
    weighted = Fisher(model, _sparse_loss(), (*batch, np.ones(5)))
    with pytest.raises(ValueError, match="sample_weight"):
        weighted.dense()
