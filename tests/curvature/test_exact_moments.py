"""The private replacement in ``tfcurv.curvature.exact_moments`` is still needed and still works."""

import contextlib

import keras
import numpy as np
import pytest
import reference_fixtures
import tensorflow as tf

from tfcurv.curvature import products
from tfcurv.curvature.exact_moments import (
    exact_second_derivatives,
    stock_moments_are_exact,
)

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
def test_replacement_is_active_exactly_when_stock_layers_give_wrong_hessians(
    make_reference, name
):
    """TF 2.20/2.21 need the replacement; TF nightly (2.22) fixed tf.nn.moments.

    Once every supported TF has the fix (``stock_moments_are_exact()`` true),
    drop exact_moments.py.
    """
    reference = make_reference(name)
    stock = _stock_hessian_vector_products(reference, exact=False)
    expected = reference.arrays["probe_HV"]
    stock_is_wrong = np.max(np.abs(stock - expected)) > 1e-3 * np.max(np.abs(expected))
    assert stock_is_wrong == (not stock_moments_are_exact())


@pytest.mark.skipif(
    not tf.__version__.startswith(("2.20.", "2.21.")),
    reason="only TF 2.20 and 2.21 are known to drop the second-order terms",
)
def test_supported_stable_tensorflow_still_needs_the_replacement():
    assert not stock_moments_are_exact()


@pytest.mark.parametrize("name", ["bn_cnn", "ln_mlp"])
def test_exact_second_derivatives_fix_them(make_reference, name):
    reference = make_reference(name)
    fixed = _stock_hessian_vector_products(reference, exact=True)
    expected = reference.arrays["probe_HV"]
    assert np.max(np.abs(fixed - expected)) <= 1e-8 * np.max(np.abs(expected))
    assert (
        tf.nn.moments.__module__ != "tfcurv.curvature.exact_moments"
    )  # restored on exit
