"""Test-session set-up shared by the whole suite.

Everything here runs before TensorFlow or Keras is imported by any test:

* every cache and temporary folder (Keras, TensorFlow Datasets, Matplotlib,
  ``TMPDIR``) points into one temporary folder of this test process, so the
  suite never writes into the user's home and never reaches the network;
* the CPU is split into two logical devices, so ``MirroredStrategy`` tests run
  on a machine without accelerators (this must happen before TF initialises).
"""

import os
import pathlib
import tempfile

_SANDBOX = pathlib.Path(tempfile.mkdtemp(prefix="tfcurv-tests-"))
for _name in ("KERAS_HOME", "TFDS_DATA_DIR", "MPLCONFIGDIR", "TMPDIR"):
    (_SANDBOX / _name.lower()).mkdir()
    os.environ[_name] = str(_SANDBOX / _name.lower())
tempfile.tempdir = None  # re-read TMPDIR
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import tensorflow as tf

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras

REFERENCE_DIR = pathlib.Path(
    os.environ.get(
        "TFCURV_REFERENCE_DIR",
        pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "reference",
    )
)


@pytest.fixture(autouse=True)
def _float32_and_clean_session():
    """Every test starts from float32 and a fresh Keras session."""
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def two_replica_strategy() -> tf.distribute.MirroredStrategy:
    """One ``MirroredStrategy`` over the two logical CPUs, shared by the session.

    Shared because on TF 2.21 a second ``MirroredStrategy`` created in the same
    process reuses the first one's collective instance keys, and the next model
    of another size then fails with "Shape mismatch in the collective instance"
    (plain Keras SGD too). One strategy for many models is the normal use.
    """
    return tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])


@pytest.fixture
def reference_dir() -> pathlib.Path:
    """The folder of reference fixtures (``../shared/reference`` by default).

    Missing fixtures are an error in CI and a skip elsewhere, with the reason.
    """
    if not REFERENCE_DIR.is_dir():
        message = (
            f"reference fixtures not found at {REFERENCE_DIR}; "
            "set TFCURV_REFERENCE_DIR"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return REFERENCE_DIR
