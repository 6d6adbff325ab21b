"""A pytest plugin that runs Keras' own optimizer tests against one tfcurv optimizer.

Loaded by ``tests/optimizers/test_keras_conformance.py`` in a separate pytest
process (``-p plugin``) over test files of the installed Keras wheel, with
``TFCURV_CONFORMANCE_OPTIMIZER`` naming the optimizer (``AGD``, ``SGDPH``,
``AdaFisher``, ``AdaFisherW``). Before the Keras test modules are imported,
every Keras optimizer class the tests build (``optimizers.Adam``, ``SGD``,
``AdamW``, ...) is replaced by a stand-in that builds the tfcurv optimizer
with the Keras base-class arguments of the call (learning rate, clipping, EMA,
loss scale, gradient accumulation, weight decay, name); optimizer-specific
ones (``momentum``, ``beta_1``, ``nesterov``, ...) are dropped. For a
curvature optimizer, ``Sequential`` and ``Model`` are tfcurv's, so every model
a test trains goes through the tfcurv train step.

The tests listed in ``not_applicable.py`` (with the reason for each) are
deselected; the outcome of every other one is written as JSON to
``TFCURV_CONFORMANCE_REPORT``. This patching lives in a test process of its
own and never in tfcurv.
"""

from __future__ import annotations

import json
import os

import keras
import keras.src.models
import keras.src.models.sequential
import keras.src.optimizers
import keras.src.optimizers.adam
import keras.src.optimizers.sgd
import not_applicable
import pytest

import tfcurv
from tfcurv.optimizers.curvature_optimizer import CurvatureOptimizer

NAME = os.environ["TFCURV_CONFORMANCE_OPTIMIZER"]
TARGET = getattr(tfcurv.optimizers, NAME)
CURVATURE = issubclass(TARGET, CurvatureOptimizer)

#: Keras' base-optimizer arguments: what every optimizer accepts.
BASE_ARGUMENTS = (
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "name",
)
KERAS_OPTIMIZERS = (
    "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "Ftrl",
    "Lamb", "Lion", "Nadam", "RMSprop", "SGD",
)  # fmt: skip


class _StandInType(type):
    def __instancecheck__(cls, instance):
        return isinstance(instance, TARGET)


class StandIn(metaclass=_StandInType):
    """Called like a Keras optimizer class; builds the tfcurv optimizer."""

    def __new__(cls, *args, **kwargs):
        """The tfcurv optimizer's own defaults for what the call leaves out."""
        if args:
            kwargs["learning_rate"] = args[0]
        kept = {k: v for k, v in kwargs.items() if k in BASE_ARGUMENTS}
        if kept.get("weight_decay") is None:
            kept.pop("weight_decay", None)
        return TARGET(**kept)


_keras_get = keras.src.optimizers.get
_KERAS_NAMES = {name.lower() for name in KERAS_OPTIMIZERS}


def _get(identifier):
    """``optimizers.get`` with Keras' optimizer names and configs retargeted."""
    if isinstance(identifier, str) and identifier.lower() in _KERAS_NAMES:
        return StandIn()
    if isinstance(identifier, dict) and str(identifier.get("class_name", "")).lower() in (
        _KERAS_NAMES
    ):
        return StandIn(**identifier.get("config", {}))
    return _keras_get(identifier)


def _retarget() -> None:
    for name in KERAS_OPTIMIZERS:
        if hasattr(keras.src.optimizers, name):
            setattr(keras.src.optimizers, name, StandIn)
    keras.src.optimizers.get = _get
    keras.src.optimizers.adam.Adam = StandIn
    keras.src.optimizers.sgd.SGD = StandIn
    if CURVATURE:
        keras.src.models.Sequential = tfcurv.Sequential
        keras.src.models.sequential.Sequential = tfcurv.Sequential


_retarget()
_outcomes: dict[str, str] = {}


def pytest_configure(config):
    for marker in ("requires_trainable_backend", "skip_if_backend"):
        config.addinivalue_line("markers", f"{marker}: Keras test marker")


def _key(item) -> str:
    """``file::Class::test`` with the file relative to ``keras/src``."""
    path = str(item.path).split(os.sep + "keras" + os.sep + "src" + os.sep, 1)[-1]
    return f"{path}::{item.cls.__name__ if item.cls else ''}::{item.name}"


def pytest_collection_modifyitems(config, items):
    skip = not_applicable.for_optimizer(NAME, CURVATURE)
    kept, deselected = [], []
    for item in items:
        key = _key(item)
        reason = not_applicable.reason(skip, key)
        if reason is None:
            kept.append(item)
        else:
            _outcomes[key] = "not applicable: " + reason
            deselected.append(item)
    config.hook.pytest_deselected(items=deselected)
    items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    key = _key(item)
    if report.failed and CURVATURE and _refused_for_curvature(call):
        _outcomes[key] = (
            "not applicable: applies the optimizer without a model and its tfcurv "
            "train step, which a curvature optimizer refuses (checked: "
            f"RuntimeError '{not_applicable.CURVATURE_REFUSAL}')"
        )
        report.outcome = "skipped"
        report.longrepr = (str(item.path), 0, "Skipped: " + _outcomes[key])
    elif report.failed:
        _outcomes[key] = f"failed ({report.when}): " + str(report.longrepr)[-3000:]
    elif report.skipped:
        _outcomes.setdefault(key, "skipped by Keras: " + str(report.longrepr)[-300:])
    elif report.when == "call":
        _outcomes.setdefault(key, "passed")


def _refused_for_curvature(call) -> bool:
    error = call.excinfo.value if call.excinfo is not None else None
    return isinstance(error, RuntimeError) and not_applicable.CURVATURE_REFUSAL in str(error)


def pytest_sessionfinish(session, exitstatus):
    with open(os.environ["TFCURV_CONFORMANCE_REPORT"], "w") as f:
        json.dump({"optimizer": NAME, "keras": keras.__version__, "outcomes": _outcomes}, f, indent=1)
