"""Loading the PyTorch reference fixtures of ``../shared/reference`` into Keras.

The fixtures and their format are described in ``shared/reference/README.md``:
each file stores a model spec, initial weights (Keras layout), the batch order
and, for trajectory files, every weight and optimizer slot after every step.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import keras
import numpy as np


@dataclasses.dataclass
class Fixture:
    """One ``.npz`` fixture, with its JSON fields decoded."""

    path: pathlib.Path
    arrays: dict
    meta: dict
    spec: dict

    @property
    def weight_names(self) -> list[str]:
        return [str(s) for s in self.arrays["weight_names"]]

    @property
    def trainable_names(self) -> list[str]:
        flags = self.arrays["weight_trainable"]
        return [n for n, t in zip(self.weight_names, flags) if t]

    @property
    def hyperparameters(self) -> dict:
        return self.meta["hyperparameters"]

    def initial_weights(self) -> list[np.ndarray]:
        return [self.arrays[f"init_{i:02d}"] for i in range(len(self.weight_names))]

    def weight_index(self, name: str) -> int:
        return self.weight_names.index(name)


def load(path: pathlib.Path) -> Fixture:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return Fixture(
        path=path,
        arrays=arrays,
        meta=json.loads(str(arrays["meta_json"])),
        spec=json.loads(str(arrays["model_spec_json"])),
    )


def digits(reference_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits as the fixtures use them: x in [0, 1], float64."""
    with np.load(reference_dir / "digits.npz") as z:
        return z["x_raw"].astype("float64") / 16.0, z["y"]


def build_layers(spec: dict) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Functional graph for a fixture's ``model_spec_json`` (README §2)."""
    inputs = keras.Input(shape=tuple(spec["input_shape"]))
    outputs, previous = {}, inputs
    for entry in spec["layers"]:
        kind, name = entry["type"], entry["name"]
        if kind == "Dense":
            layer = keras.layers.Dense(
                entry["units"], use_bias=entry.get("use_bias", True), name=name
            )
        elif kind == "Conv2D":
            layer = keras.layers.Conv2D(
                entry["filters"],
                entry["kernel_size"],
                padding=entry["padding"],
                use_bias=entry.get("use_bias", True),
                name=name,
            )
        elif kind == "BatchNormalization":
            layer = keras.layers.BatchNormalization(
                epsilon=entry["epsilon"], momentum=entry["momentum"], name=name
            )
        elif kind == "LayerNormalization":
            layer = keras.layers.LayerNormalization(epsilon=entry["epsilon"], name=name)
        elif kind == "ReLU":
            layer = keras.layers.ReLU(name=name)
        elif kind == "Activation":
            layer = keras.layers.Activation(entry["activation"], name=name)
        elif kind == "GlobalAveragePooling2D":
            layer = keras.layers.GlobalAveragePooling2D(name=name)
        elif kind == "Add":
            layer = keras.layers.Add(name=name)
        else:
            raise ValueError(f"unknown layer type in fixture spec: {kind}")
        layer_input = (
            [outputs[k] for k in entry["inputs"]] if "inputs" in entry else previous
        )
        previous = outputs[name] = layer(layer_input)
    return inputs, previous


def build_model(fixture: Fixture, model_class=keras.Model) -> keras.Model:
    """The fixture's model in float64 with its initial weights loaded.

    ``model_class`` may be ``tfcurv.Model`` (functional construction) for
    optimizers that need the tfcurv train step.
    """
    keras.config.set_floatx("float64")
    inputs, outputs = build_layers(fixture.spec)
    model = model_class(inputs, outputs)
    assert [w.path for w in model.weights] == fixture.weight_names
    model.set_weights(fixture.initial_weights())
    return model


def training_data(fixture: Fixture, reference_dir: pathlib.Path):
    """``(x, y, batch_size)`` in the fixture's batch order (no shuffling)."""
    x, y = digits(reference_dir)
    order = fixture.arrays["batch_idx"].ravel()
    x = x[order].reshape((len(order),) + tuple(fixture.spec["input_shape"]))
    return x, y[order], fixture.arrays["batch_idx"].shape[1]


def loss_fn() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class WeightRecorder(keras.callbacks.Callback):
    """Records every model weight after every training batch."""

    def __init__(self):
        super().__init__()
        self.steps: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append([w.numpy().copy() for w in self.model.weights])


def assert_close_to_reference(actual, expected, name, rtol=1e-9, atol=0.0):
    """``|a - b| <= rtol * max(1, |b|) + atol`` elementwise, with a useful message."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    bound = rtol * np.maximum(1.0, np.abs(expected)) + atol
    err = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert np.all(err <= bound), (
        f"{name}: max |diff| {err.max():.3e} exceeds tolerance at {worst} "
        f"(actual {actual[worst]!r}, expected {expected[worst]!r})"
    )
