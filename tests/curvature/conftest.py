"""Fixtures shared by the curvature tests: the Hessian reference models."""

import pytest
import reference_fixtures as rf

HESSIAN_MODELS = ("bn_cnn", "ln_mlp", "mlp_tanh")


class Reference:
    """A ``hessian__<name>.npz`` fixture with its Keras model at the initial weights."""

    def __init__(self, reference_dir, name):
        self.fixture = rf.load(reference_dir / f"hessian__{name}.npz")
        self.arrays = self.fixture.arrays
        self.model = rf.build_model(self.fixture)
        self.batch = (self.arrays["x"], self.arrays["y"])
        self.offsets = self.arrays["param_offsets"]

    def operator(self, kind, **kwargs):
        kwargs.setdefault("training", True)
        return kind(self.model, rf.loss_fn(), self.batch, **kwargs)


@pytest.fixture(params=HESSIAN_MODELS)
def reference(request, reference_dir):
    return Reference(reference_dir, request.param)


@pytest.fixture
def make_reference(reference_dir):
    return lambda name: Reference(reference_dir, name)
