"""WeightTrajectory under fit: what it records, that it changes nothing, its budget."""

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcurv.analysis import Trajectory, TrajectoryBudgetError, WeightTrajectory, pca

trajectory_module = importlib.import_module("tfcurv.analysis.trajectory")

_X = np.random.default_rng(0).standard_normal((32, 5)).astype("float32")
_Y = np.random.default_rng(1).integers(0, 3, 32)


def _model():
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="relu", name="hidden"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy"
    )
    return model


class _EveryStep(keras.callbacks.Callback):
    """Independent reference: the weights after each step, kept in memory."""

    def on_train_begin(self, logs=None):
        self.states = [[v.numpy().copy() for v in self.model.trainable_variables]]

    def on_train_batch_end(self, batch, logs=None):
        self.states.append([v.numpy().copy() for v in self.model.trainable_variables])


def _fit(model, callbacks, epochs=2, **kwargs):
    model.fit(
        _X,
        _Y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **kwargs,
    )


def test_records_every_step_exactly_and_changes_nothing(tmp_path):
    reference = _EveryStep()
    reference_model = _model()
    _fit(reference_model, [reference])

    recorder = WeightTrajectory(tmp_path / "run")
    model = _model()
    _fit(model, [recorder])

    for mine, theirs in zip(
        model.trainable_variables, reference_model.trainable_variables
    ):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    trajectory = recorder.trajectory
    assert trajectory.names == [v.path for v in model.trainable_variables]
    np.testing.assert_array_equal(trajectory.steps, np.arange(9))
    for index, name in enumerate(trajectory.names):
        states = trajectory.states(name, flatten=False)
        assert isinstance(states, np.memmap) and states.shape == (
            9,
            *trajectory.shape(name),
        )
        np.testing.assert_array_equal(
            states, np.stack([s[index] for s in reference.states])
        )


def test_every_k_steps_selected_variables_and_appending_fits(tmp_path):
    model = _model()
    recorder = WeightTrajectory(tmp_path, variables=["out", "hidden/kernel"], every=3)
    _fit(model, [recorder])
    _fit(model, [recorder], epochs=1)  # continues the same record

    trajectory = Trajectory(tmp_path)
    assert trajectory.names == [
        v.path for v in model.get_layer("out").trainable_variables
    ] + [model.get_layer("hidden").kernel.path]
    np.testing.assert_array_equal(trajectory.steps, [0, 3, 6, 9, 12])
    np.testing.assert_array_equal(
        trajectory.states("sequential/hidden/kernel")[-1].reshape(5, 4),
        model.get_layer("hidden").kernel.numpy(),
    )
    assert pca(
        trajectory.states(trajectory.names[0]), n_components=2
    ).components.shape == (2, 12)


def test_small_buffer_flushes_in_chunks_with_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(trajectory_module, "_BUFFER_BYTES", 1)
    reference = _EveryStep()
    _fit(_model(), [reference])
    recorder = WeightTrajectory(tmp_path, variables=["out/kernel"])
    _fit(_model(), [recorder])
    np.testing.assert_array_equal(
        recorder.trajectory.states("out/kernel", flatten=False),
        np.stack([s[2] for s in reference.states]),
    )


def test_budget_stops_before_training_when_the_plan_does_not_fit(tmp_path):
    model = _model()
    before = [v.numpy().copy() for v in model.trainable_variables]
    record_bytes = 8 + 4 * (5 * 4 + 4 + 4 * 3 + 3)
    recorder = WeightTrajectory(
        tmp_path, max_bytes=8 * record_bytes
    )  # the plan needs 9
    with pytest.raises(TrajectoryBudgetError, match="max_bytes"):
        _fit(model, [recorder])
    for variable, value in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)

    exact = WeightTrajectory(tmp_path / "exact", max_bytes=9 * record_bytes)
    _fit(_model(), [exact])
    assert exact.record_bytes == record_bytes and len(exact.trajectory) == 9


def test_budget_is_checked_before_each_record_when_steps_are_unknown(tmp_path):
    def batches():
        for start in range(0, 32, 8):
            yield _X[start : start + 8], _Y[start : start + 8]

    dataset = tf.data.Dataset.from_generator(
        batches,
        output_signature=(
            tf.TensorSpec((None, 5), tf.float32),
            tf.TensorSpec((None,), tf.int64),
        ),
    )
    model = _model()
    recorder = WeightTrajectory(
        tmp_path, variables=["out/bias"], max_bytes=3 * (8 + 12)
    )
    with pytest.raises(TrajectoryBudgetError, match="step 3"):
        model.fit(dataset, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
    data_bytes = sum(f.stat().st_size for f in tmp_path.glob("*.bin"))
    assert data_bytes <= recorder.max_bytes
    assert len(recorder.trajectory) == 3


def test_existing_trajectory_is_protected_unless_overwrite(tmp_path):
    _fit(_model(), [WeightTrajectory(tmp_path, variables=["out/bias"])])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _fit(_model(), [WeightTrajectory(tmp_path, variables=["out/bias"])])
    _fit(
        _model(),
        [WeightTrajectory(tmp_path, variables=["hidden/bias"], overwrite=True)],
        epochs=1,
    )
    trajectory = Trajectory(tmp_path)
    assert len(trajectory.names) == 1 and trajectory.names[0].endswith("/hidden/bias")
    assert len(trajectory) == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every": 0}, "every"),
        ({"every": 1.5}, "every"),
        ({"max_bytes": 0}, "max_bytes"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightTrajectory(tmp_path, **kwargs)


def test_unknown_variable_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="matches 0 variables"):
        _fit(_model(), [WeightTrajectory(tmp_path, variables=["nope"])])
    with pytest.raises(ValueError, match="no recorded trajectory"):
        Trajectory(tmp_path / "empty")
