"""Every block of the layer table against an autodiff reference (BackPACK's way).

* per-example gradients: each example's weight gradient by an explicit
  one-example tape, for every parameterised block and a few configurations;
* Kronecker statistics by their definition: the input-side factor is the mean
  square of the layer's "rows" (the entries of ``d output / d weight``), which
  autodiff gives without any patch extraction, and the output-side factor the
  mean square of the output gradient over the same rows;
* the table's lookup rules.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcurv.curvature import layer_blocks

L = keras.layers


def _layers():
    """(name, layer, input shape without batch, integer input?)"""
    return [
        ("dense_rank3", L.Dense(3), (4, 5), False),
        ("einsum_query", L.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de"), (4, 5), False),
        ("einsum_output", L.EinsumDense("abcd,cde->abe", (4, 3), bias_axes="e"), (4, 2, 3), False),
        ("einsum_ellipsis", L.EinsumDense("...b,bc->...c", 3, bias_axes="c"), (2, 4), False),
        ("conv1d_causal", L.Conv1D(3, 3, padding="causal", dilation_rate=2), (9, 2), False),
        ("conv2d_groups", L.Conv2D(4, (3, 2), strides=(2, 1), groups=2), (7, 6, 4), False),
        ("conv2d_same", L.Conv2D(3, 3, padding="same", dilation_rate=2), (6, 6, 2), False),
        ("conv3d", L.Conv3D(2, 2, strides=(1, 2, 1)), (4, 4, 3, 2), False),
        ("depthwise2d", L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), (5, 5, 2), False),
        ("depthwise1d", L.DepthwiseConv1D(3, strides=2), (9, 3), False),
        ("separable2d", L.SeparableConv2D(3, 3, depth_multiplier=2), (6, 6, 2), False),
        ("separable1d", L.SeparableConv1D(3, 3, padding="same"), (7, 2), False),
        ("transpose2d", L.Conv2DTranspose(3, 3, strides=2, padding="same"), (4, 4, 2), False),
        ("transpose2d_valid", L.Conv2DTranspose(2, (3, 2), strides=(2, 1)), (3, 4, 2), False),
        ("transpose1d", L.Conv1DTranspose(3, 3, strides=2), (5, 2), False),
        ("transpose3d", L.Conv3DTranspose(2, 2, strides=2), (2, 3, 2, 2), False),
        ("embedding", L.Embedding(7, 3), (5,), True),
        ("batch_norm_rank3", L.BatchNormalization(), (4, 3), False),
        ("layer_norm", L.LayerNormalization(), (4, 3), False),
        ("group_norm", L.GroupNormalization(2), (4, 4), False),
        ("rms_norm", L.RMSNormalization(), (4, 3), False),
    ]  # fmt: skip


CASES = {name: (layer, shape, integer) for name, layer, shape, integer in _layers()}


def _built(name, seed=0):
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(seed)
    layer, shape, integer = _layers()[list(CASES).index(name)][1:]
    rng = np.random.default_rng(seed)
    if integer:
        x = tf.constant(rng.integers(0, layer.input_dim, size=(3, *shape)), "int32")
    else:
        x = tf.constant(rng.standard_normal((3, *shape)))
    layer(x)
    for variable in layer.trainable_variables:  # away from the initial ones/zeros
        variable.assign(rng.standard_normal(variable.shape))
    g = tf.constant(rng.standard_normal(layer(x).shape))
    return layer, x, g


@pytest.mark.parametrize("name", list(CASES))
def test_per_example_gradients_match_one_example_tapes(name):
    layer, x, g = _built(name)
    block = layer_blocks.block_for(layer)
    assert [id(v) for v in block.variables] == [id(v) for v in layer.trainable_variables]
    if isinstance(block, layer_blocks.BatchNormBlock):
        layer_call = lambda inputs: layer(inputs, training=False)  # noqa: E731
    else:
        layer_call = layer
    got = block.per_example_gradients(x, g)
    for n in range(x.shape[0]):
        with tf.GradientTape() as tape:
            y = layer_call(x[n : n + 1])
            objective = tf.reduce_sum(y * g[n : n + 1])
        expected = tape.gradient(objective, block.variables)
        for variable, per_example, reference in zip(block.variables, got, expected):
            np.testing.assert_allclose(
                per_example[n].numpy(), tf.convert_to_tensor(reference).numpy(),
                rtol=1e-10, atol=1e-12, err_msg=f"{name} {variable.path} example {n}",
            )  # fmt: skip


def _rows_by_autodiff(layer, x, kernel):
    """The input-side "rows" of a layer linear in ``kernel``: for each output
    entry, its derivative by the kernel, reduced to the kernel's input axes."""
    with tf.GradientTape() as tape:
        y = layer(x)
    jacobian = tape.jacobian(y, kernel)  # (*y.shape, *kernel.shape)
    return jacobian, y.shape


@pytest.mark.parametrize(
    "name", ["dense_rank3", "conv1d_causal", "conv2d_same", "conv3d", "einsum_output"]
)
def test_kernel_row_factors_are_the_mean_squared_rows(name):
    """``h`` (kernel part) = mean over rows of ``(d y[row, o] / d W[j, o])^2``
    for any one output unit ``o`` (the same for all), ``s`` = mean ``G^2``."""
    layer, x, g = _built(name)
    block = layer_blocks.block_for(layer)
    h, s = block.raw_factors(block.statistic_sums(x, g, "float64"))
    kernel = layer.kernel
    jacobian, y_shape = _rows_by_autodiff(layer, x, kernel)
    units = kernel.shape[-1]
    rows = jacobian.numpy().reshape(
        int(np.prod(y_shape[:-1])), units, -1, units
    )[:, 0, :, 0]  # d y[row, 0] / d W[j, 0]
    patch_length = rows.shape[1]
    if isinstance(block, layer_blocks.ConvBlock):  # the official normaliser
        expected_h = (rows**2).sum(0) / (rows.shape[0] * patch_length)
    else:
        expected_h = (rows**2).mean(0)
    np.testing.assert_allclose(h.numpy()[:patch_length], expected_h, rtol=1e-10)
    g_rows = g.numpy().reshape(-1, units)
    np.testing.assert_allclose(s.numpy(), (g_rows**2).mean(0), rtol=1e-10)


def test_embedding_factors_are_token_frequencies_and_mean_squared_gradients():
    layer, x, g = _built("embedding")
    block = layer_blocks.block_for(layer)
    (lead, last), = block.normalized_factors(block.statistic_sums(x, g, "float64"))
    ids = x.numpy().ravel()
    frequency = np.bincount(ids, minlength=7) / ids.size
    s = (g.numpy().reshape(-1, 3) ** 2).mean(0)

    def normalize(v):
        return (v - v.min()) / (v.max() - v.min() + 1e-6)

    np.testing.assert_allclose(lead.numpy(), normalize(frequency), rtol=1e-12)
    np.testing.assert_allclose(last.numpy(), normalize(s), rtol=1e-12)


@pytest.mark.parametrize("name", ["depthwise2d", "depthwise1d", "separable2d", "transpose2d",
                                  "transpose2d_valid", "transpose1d", "einsum_query",
                                  "group_norm", "rms_norm", "batch_norm_rank3"])  # fmt: skip
def test_every_block_gives_factor_pairs_shaped_for_its_variables(name):
    """``outer(lead, last)`` reshapes to each variable, non-negative; in [0, 1]
    where it is a product of two normalised factors (not a rank-one split)."""
    layer, x, g = _built(name)
    block = layer_blocks.block_for(layer)
    assert block.supports_statistics(x)
    pairs = block.normalized_factors(block.statistic_sums(x, g, "float64"))
    assert len(pairs) == len(block.variables)
    for variable, (lead, last) in zip(block.variables, pairs):
        shape = tuple(variable.shape)
        assert lead.shape == (int(np.prod(shape[:-1])) if len(shape) > 1 else 1,)
        assert last.shape == (shape[-1],)
        product = np.outer(lead.numpy(), last.numpy())
        assert np.all(np.isfinite(product)) and np.all(product >= 0), variable.path
        if name not in ("einsum_query", "depthwise2d", "separable2d"):
            assert np.all(product <= 1 + 1e-9), variable.path


def test_transposed_convolution_windows_reproduce_the_kernel_gradient():
    """The output-gradient windows the statistics use are the right ones: the
    sum over input positions of ``window (x) input`` is the kernel gradient."""
    for name in ("transpose2d", "transpose2d_valid", "transpose1d"):
        layer, x, g = _built(name)
        block = layer_blocks.block_for(layer)
        windows = block._windows(g)
        rows_in = x.numpy().reshape(-1, x.shape[-1])
        rows_w = windows.numpy().reshape(-1, windows.shape[-1])
        with tf.GradientTape() as tape:
            objective = tf.reduce_sum(layer(x) * g)
        kernel_gradient = tape.gradient(objective, layer.kernel).numpy()
        np.testing.assert_allclose(
            (rows_w.T @ rows_in).reshape(kernel_gradient.shape), kernel_gradient,
            rtol=1e-10, err_msg=name,
        )  # fmt: skip


def test_rank_one_factors_are_exact_for_a_rank_one_diagonal():
    a, b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0])
    lead, last = layer_blocks.rank_one_factors(tf.constant(np.outer(a, b)), (3, 2))
    np.testing.assert_allclose(np.outer(lead, last), np.outer(a, b), rtol=1e-14)


def test_lookup_refuses_overridden_calls_and_knows_parameter_free_layers():
    class MyDense(L.Dense):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    class PlainSubclass(L.Dense):
        pass

    assert layer_blocks.block_for(MyDense(2)) is None
    assert isinstance(layer_blocks.block_for(PlainSubclass(2)), layer_blocks.DenseBlock)
    assert layer_blocks.block_for(L.GRU(2)) is None
    assert layer_blocks.block_for(L.Flatten()).linear_in_input
    assert layer_blocks.block_for(L.Activation("tanh")).elementwise
    assert not layer_blocks.block_for(L.Activation("softmax")).elementwise
    assert L.Dense in layer_blocks.supported_layer_types(parameterised_only=True)
    assert L.Flatten not in layer_blocks.supported_layer_types(parameterised_only=True)
