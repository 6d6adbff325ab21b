"""``tfcurv report``, end to end on a saved model, against the library's own numbers."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcurv import Hessian
from tfcurv.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 6)).astype("float32")
    y = rng.integers(0, 3, 60)
    folder = tmp_path_factory.mktemp("cli")
    model.fit(x, y, epochs=2, verbose=0)
    model.save(folder / "model.keras")
    np.savez(folder / "data.npz", x=x, y=y)
    (folder / "data_source.py").write_text(
        "import numpy as np\n"
        "import tensorflow as tf\n\n"
        "def validation():\n"
        f"    with np.load({str(folder / 'data.npz')!r}) as d:\n"
        "        return tf.data.Dataset.from_tensor_slices((d['x'], d['y'])).batch(25)\n"
    )
    return folder, x, y


def _run(capsys, *argv):
    capsys.readouterr()
    assert main(["report", *map(str, argv)]) == 0
    return capsys.readouterr().out


def test_report_prints_and_saves_the_library_numbers(saved, capsys):
    folder, x, y = saved
    out = _run(
        capsys, folder / "model.keras", "--data", folder / "data.npz",
        "--batch-size", 25, "--top-n", 2, "--trace-samples", 40,
        "--density-iter", 12, "--json", folder / "r.json",
        "--output-dir", folder / "plots", "--verbose", 0,
    )  # fmt: skip
    numbers = json.loads((folder / "r.json").read_text())
    model = keras.saving.load_model(folder / "model.keras")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(25)
    hessian = Hessian(model, None, data)
    values, _ = hessian.eigenvalues(2, tol=1e-4)
    np.testing.assert_allclose(numbers["top_eigenvalues"], values, rtol=1e-6)
    trace = hessian.trace("hutchinson", num_samples=40)
    assert numbers["trace"] == pytest.approx(trace, rel=1e-5)
    assert numbers["num_parameters"] == hessian.size == 6 * 8 + 8 + 8 * 3 + 3
    layers = numbers["layers"]
    assert [layer["name"] for layer in layers] == ["hidden", "logits"]
    assert [layer["parameters"] for layer in layers] == [56, 27]
    assert sum(layer["trace_share"] for layer in layers) == pytest.approx(1.0)
    for layer, keras_layer in zip(layers, model.layers):
        block, _ = Hessian(model, None, data, variables=keras_layer).eigenvalues(
            1, tol=1e-4
        )
        assert layer["top_eigenvalue"] == pytest.approx(block[0], rel=1e-6)
        assert layer["name"] in out
    assert f"{values[0]:.6g}" in out and "trace share" in out
    for name in ("density.png", "layers.png"):
        assert (folder / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_takes_a_dataset_function(saved, capsys):
    folder, _, _ = saved
    common = ("--top-n", 1, "--trace-samples", 10, "--density-iter", 5,
              "--no-plots", "--verbose", 0)  # fmt: skip
    from_function = _run(
        capsys, folder / "model.keras", "--dataset",
        f"{folder / 'data_source.py'}:validation", "--json", folder / "f.json", *common,
    )  # fmt: skip
    from_file = _run(
        capsys, folder / "model.keras", "--data", folder / "data.npz",
        "--batch-size", 25, "--json", folder / "n.json", *common,
    )  # fmt: skip
    assert from_function == from_file
    assert json.loads((folder / "f.json").read_text()) == json.loads(
        (folder / "n.json").read_text()
    )


def test_report_errors_say_what_to_do(saved, capsys, tmp_path):
    folder, x, _ = saved
    np.savez(tmp_path / "no_y.npz", x=x)
    with pytest.raises(SystemExit, match="has no array 'y'"):
        _run(capsys, folder / "model.keras", "--data", tmp_path / "no_y.npz")
    uncompiled = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    uncompiled.save(tmp_path / "uncompiled.keras")
    with pytest.raises(SystemExit, match="pass --loss"):
        _run(capsys, tmp_path / "uncompiled.keras", "--data", folder / "data.npz")
    with pytest.raises(SystemExit, match="has no function 'missing'"):
        _run(
            capsys, folder / "model.keras", "--dataset",
            f"{folder / 'data_source.py'}:missing",
        )  # fmt: skip


def test_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "tfcurv", "report", "--help"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tfcurv report")
    assert "Measure the curvature of a trained Keras model" in result.stdout
    assert "--dataset FILE.py:FUNCTION" in result.stdout
