"""The private replacement in ``tfcurv.curvature.exact_moments`` is still needed and still works."""

import contextlib

import keras
import numpy as np
import pytest
import reference_fixtures
import tensorflow as tf

from tfcurv.curvature import products
from tfcurv.curvature.exact_moments import exact_second_derivatives

pytestmark = pytest.mark.fixtures


def _stock_hessian_vector_products(reference, exact: bool):
    variables = reference.model.trainable_variables
    shapes = [v.shape for v in variables]
    x, y = (tf.constant(t) for t in reference.batch)
    probes = reference.arrays["probe_V"]
    loss = reference_fixtures.loss_fn()

    def loss_fn():
        with keras.StatelessScope():  # the reference model is shared: leave it as is
            return loss(y, reference.model(x, training=True))

    columns = []
    for column in range(probes.shape[1]):
        sizes = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]
        vector = [
            p.reshape(s) for p, s in zip(np.split(probes[:, column], sizes), shapes)
        ]
        with exact_second_derivatives() if exact else contextlib.nullcontext():
            (product,) = products.hessian_vector_products(loss_fn, variables, [vector])
        columns.append(np.concatenate([p.numpy().ravel() for p in product]))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("name", ["bn_cnn", "ln_mlp"])
def test_stock_normalisation_layers_still_give_wrong_hessians(make_reference, name):
    """If this fails, TF/Keras fixed tf.nn.moments: drop exact_moments.py."""
    reference = make_reference(name)
    stock = _stock_hessian_vector_products(reference, exact=False)
    expected = reference.arrays["probe_HV"]
    assert np.max(np.abs(stock - expected)) > 1e-3 * np.max(np.abs(expected))


@pytest.mark.parametrize("name", ["bn_cnn", "ln_mlp"])
def test_exact_second_derivatives_fix_them(make_reference, name):
    reference = make_reference(name)
    fixed = _stock_hessian_vector_products(reference, exact=True)
    expected = reference.arrays["probe_HV"]
    assert np.max(np.abs(fixed - expected)) <= 1e-8 * np.max(np.abs(expected))
    assert (
        tf.nn.moments.__module__ != "tfcurv.curvature.exact_moments"
    )  # restored on exit
