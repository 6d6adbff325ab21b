"""SGD-PH: the official trajectories (float64 fixtures) through ``model.fit``, and unit tests.

The shared contract (serialization, strategies, mixed precision, ...) is in
``test_contract.py``; this file checks the update itself.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import reference_fixtures as rf

import tfcurv
from tfcurv.optimizers import SGDPH

SGDPH_FIXTURES = (
    "sgdph__bn_cnn__default",
    "sgdph__bn_cnn__tau5e-3_wd",
    "sgdph__ln_mlp__default",
)


def sgdph_for_fixture(fixture: rf.Fixture) -> SGDPH:
    hp = fixture.hyperparameters
    return SGDPH(
        learning_rate=hp["lr"],
        momentum=hp["momentum"],
        tau=hp["tau"],
        epsilon=hp["eps"],
        weight_decay=hp["weight_decay"],
    )


class SlotRecorder(rf.WeightRecorder):
    """Also records SGD-PH's momentum buffers and ``D`` after every step."""

    def __init__(self):
        super().__init__()
        self.buffers: list[list[np.ndarray]] = []
        self.diagonals: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        optimizer = self.model.optimizer
        self.buffers.append([b.numpy().copy() for b in optimizer.momentum_buffers])
        self.diagonals.append([d.numpy().copy() for d in optimizer.diagonals])


def zero_curvature_tensors(fixture: rf.Fixture) -> set[str]:
    """Biases directly in front of a normalisation layer (README §6.3).

    Shift invariance makes their ``H_kk·1`` zero (and, before BatchNormalization,
    their gradient too): the recorded values there are rounding noise, compared
    with an absolute tolerance of 1e-12.
    """
    return {
        f"{layer['name']}/bias"
        for layer, following in itertools.pairwise(fixture.spec["layers"])
        if following["type"] in ("BatchNormalization", "LayerNormalization")
    }


def zero_gradient_tensors(fixture: rf.Fixture) -> set[str]:
    return {
        name
        for name in zero_curvature_tensors(fixture)
        for layer, following in itertools.pairwise(fixture.spec["layers"])
        if name == f"{layer['name']}/bias" and following["type"] == "BatchNormalization"
    }


@pytest.mark.fixtures
@pytest.mark.parametrize("name", SGDPH_FIXTURES)
def test_fit_reproduces_the_official_trajectory(reference_dir, name):
    fixture = rf.load(reference_dir / f"{name}.npz")
    model = rf.build_model(fixture, tfcurv.Model)
    optimizer = sgdph_for_fixture(fixture)
    model.compile(optimizer=optimizer, loss=rf.loss_fn())
    x, y, batch_size = rf.training_data(fixture, reference_dir)
    recorder = SlotRecorder()
    history = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[recorder],
    )
    steps = fixture.meta["T"]
    assert len(recorder.steps) == steps

    trainable = fixture.trainable_names
    one_d = [
        n
        for n in trainable
        if fixture.arrays[f"init_{fixture.weight_index(n):02d}"].ndim == 1
    ]
    assert len(one_d) == fixture.meta["M"] == len(optimizer.diagonals)
    assert one_d[-1].endswith("/bias")  # the plain-SGD tensor is the classifier bias
    no_curvature = zero_curvature_tensors(fixture)
    no_gradient = zero_gradient_tensors(fixture)

    for step in range(steps):
        for index, name_ in enumerate(fixture.weight_names):
            atol = 1e-12 if name_ in no_gradient else 0.0
            rf.assert_close_to_reference(
                recorder.steps[step][index],
                fixture.arrays[f"traj_{index:02d}"][step],
                f"{name_} after step {step + 1}",
                atol=atol,
            )
        for position, name_ in enumerate(trainable):
            index = fixture.weight_index(name_)
            rf.assert_close_to_reference(
                recorder.buffers[step][position],
                fixture.arrays[f"state_momentum_buffer_{index:02d}"][step],
                f"momentum buffer of {name_} after step {step + 1}",
                atol=1e-12 if name_ in no_gradient else 0.0,
            )
        for position, name_ in enumerate(one_d):
            index = fixture.weight_index(name_)
            rf.assert_close_to_reference(
                recorder.diagonals[step][position],
                fixture.arrays[f"state_diag_{index:02d}"][step],
                f"D of {name_} after step {step + 1}",
                atol=1e-12 if name_ in no_curvature else 0.0,
            )
    np.testing.assert_allclose(
        history.history["loss"][0], np.mean(fixture.arrays["loss"]), rtol=1e-9
    )


def test_round_robin_target_follows_the_fixture(reference_dir):
    fixture = rf.load(reference_dir / "sgdph__ln_mlp__default.npz")
    model = rf.build_model(fixture, tfcurv.Model)
    model.compile(optimizer=sgdph_for_fixture(fixture), loss=rf.loss_fn())
    x, y, batch_size = rf.training_data(fixture, reference_dir)
    targets = []

    class Targets(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            curvature = [c.numpy() for c in self.model.optimizer.curvatures]
            nonzero = [j + 1 for j, c in enumerate(curvature) if np.any(c != 0)]
            targets.append(nonzero)

    model.fit(
        x, y, batch_size=batch_size, shuffle=False, verbose=0, callbacks=[Targets()]
    )
    # fc1/bias (k = 1) feeds LayerNormalization: its H·1 is rounding noise or 0.
    assert len(targets) == fixture.meta["T"]
    for step, (found, expected) in enumerate(zip(targets, fixture.arrays["sgdph_k"])):
        if expected == 1:
            assert set(found) <= {1}, step
        else:
            assert found == [int(expected)], step


def test_sgdph_without_the_tfcurv_step_says_how_to_fix_it():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=SGDPH(), loss="mse")
    with pytest.raises(RuntimeError, match=r"tfcurv\.attach"):
        model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)


def test_without_one_d_variables_it_is_momentum_sgd():
    kernel = np.array([[0.5, -1.0], [2.0, 0.25]], "float32")

    def trained(optimizer, model_class):
        model = model_class([keras.Input((2,)), keras.layers.Dense(2, use_bias=False)])
        model.set_weights([kernel])
        model.compile(optimizer=optimizer, loss="mse")
        x = np.array([[1.0, 2.0], [3.0, -1.0]], "float32")
        model.fit(x, x[:, ::-1], batch_size=2, epochs=3, verbose=0)
        return model.get_weights()[0]

    np.testing.assert_allclose(
        trained(SGDPH(learning_rate=0.01), tfcurv.Sequential),
        trained(keras.optimizers.SGD(0.01, momentum=np.float64(0.9)), keras.Sequential),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("learning_rate", -0.1),
        ("learning_rate", 0.0),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("tau", 0.0),
        ("epsilon", 0.0),
        ("epsilon", float("nan")),
        ("weight_decay", -1e-4),
        ("tau", "big"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_them(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        SGDPH(**{argument: value})


def test_config_round_trip():
    optimizer = SGDPH(
        learning_rate=0.05, momentum=0.8, tau=5e-3, epsilon=1e-5, weight_decay=1e-4
    )
    config = optimizer.get_config()
    restored = SGDPH.from_config(config)
    for key in ("momentum", "tau", "epsilon", "weight_decay"):
        assert getattr(restored, key) == getattr(optimizer, key)
    assert config["weight_decay"] == 1e-4
    assert (
        keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)).tau == 5e-3
    )
