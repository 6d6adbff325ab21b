"""Fixtures shared by the curvature tests: the Hessian reference models.

Each reference model and each operator on it is built once per test process
and shared by every test that asks for it: operators never change the model,
and sharing them means each compiled product is traced once.
"""

import keras
import pytest
import reference_fixtures as rf

HESSIAN_MODELS = ("bn_cnn", "ln_mlp", "mlp_tanh")

_REFERENCES = {}


class Reference:
    """A ``hessian__<name>.npz`` fixture with its Keras model at the initial weights."""

    def __init__(self, reference_dir, name):
        self.fixture = rf.load(reference_dir / f"hessian__{name}.npz")
        self.arrays = self.fixture.arrays
        self.model = rf.build_model(self.fixture)
        self.batch = (self.arrays["x"], self.arrays["y"])
        self.offsets = self.arrays["param_offsets"]
        self._operators = {}

    def operator(self, kind, **kwargs):
        """``kind(model, loss, batch, training=True, **kwargs)``, built once per arguments."""
        kwargs.setdefault("training", True)
        key = (kind, tuple(sorted((k, _hashable(v)) for k, v in kwargs.items())))
        if key not in self._operators:
            self._operators[key] = kind(self.model, rf.loss_fn(), self.batch, **kwargs)
        return self._operators[key]


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(id(item) for item in value)
    return value


def _reference(reference_dir, name):
    """The shared reference, with floatx float64 as building it leaves it (losses
    built afterwards, such as ``rf.loss_fn()``, then compute in float64 too)."""
    if (reference_dir, name) not in _REFERENCES:
        _REFERENCES[reference_dir, name] = Reference(reference_dir, name)
    keras.config.set_floatx("float64")
    return _REFERENCES[reference_dir, name]


@pytest.fixture(params=HESSIAN_MODELS)
def reference(request, reference_dir):
    return _reference(reference_dir, request.param)


@pytest.fixture
def make_reference(reference_dir):
    return lambda name: _reference(reference_dir, name)
