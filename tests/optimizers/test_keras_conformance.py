"""Keras' own optimizer tests, from the installed wheel, against every tfcurv optimizer.

For each optimizer, one pytest process runs the Keras test files listed in
``keras_conformance/not_applicable.py`` in the order Keras runs them, with the
Keras optimizer each test builds replaced by the tfcurv one
(``keras_conformance/plugin.py`` says how). Tests that cannot apply are
deselected with their reason; a curvature optimizer applied without its train
step must refuse with the documented error, and the plugin checks that it did.
Every other test must pass. The per-optimizer counts are printed (``-s``) and
attached to the test report as ``conformance``.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

HERE = pathlib.Path(__file__).resolve().parent / "keras_conformance"
_spec = importlib.util.spec_from_file_location("not_applicable", HERE / "not_applicable.py")
not_applicable = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(not_applicable)

KERAS_SRC = pathlib.Path(keras.__file__).resolve().parent / "src"
OPTIMIZERS = ("AGD", "SGDPH", "AdaFisher", "AdaFisherW")
TIMEOUT_S = 1200
# Keras releases whose wheel ships Keras' own test files (checked on the package
# index for 3.13.0 to 3.15.1: only 3.15.1's does; the wheels of 3.13.x, 3.14.x and
# 3.15.0 ship none, nor do the sdists of 3.13.2 and 3.15.0). On these releases a
# missing file is a failure; on the others the test is skipped, saying why.
SHIPS_ITS_TESTS = ("3.15.1",)


def _outcome_kind(outcome: str) -> str:
    return outcome.split(":", 1)[0].split(" (", 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_keras_optimizer_tests_pass(name, tmp_path, record_property):
    files = [KERAS_SRC / f for f in not_applicable.KERAS_TEST_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if len(missing) == len(files) and keras.__version__ not in SHIPS_ITS_TESTS:
        pytest.skip(
            f"the Keras {keras.__version__} wheel does not ship its test files (of "
            f"the releases since 3.13 only {', '.join(SHIPS_ITS_TESTS)} does): "
            "nothing to run Keras' tests from"
        )
    assert not missing, f"Keras {keras.__version__} does not ship {missing}"

    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\naddopts = -q -p no:cacheprovider -p no:warnings\n")
    report = tmp_path / "report.json"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTEST_", "COV_"))
    }
    env.update(
        TFCURV_CONFORMANCE_OPTIMIZER=name,
        TFCURV_CONFORMANCE_REPORT=str(report),
        PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
        KERAS_BACKEND="tensorflow",
    )
    # KERAS_HOME, TFDS_DATA_DIR, MPLCONFIGDIR and TMPDIR are the suite's sandbox
    # (conftest.py), inherited; the Keras tests write only below TMPDIR.
    process = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(tmp_path),
         "-p", "plugin", *map(str, files)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert report.is_file(), process.stdout[-5000:] + process.stderr[-5000:]
    outcomes = json.loads(report.read_text())["outcomes"]

    counts = collections.Counter(map(_outcome_kind, outcomes.values()))
    record_property("conformance", dict(counts))
    print(f"\n{name} against Keras {keras.__version__}: {dict(counts)}")

    failed = {key: why for key, why in outcomes.items() if why.startswith("failed")}
    assert not failed, "\n\n".join(f"{key}\n{why}" for key, why in failed.items())
    assert process.returncode == 0, process.stdout[-5000:]
    assert counts["passed"] > 0
    # The list of inapplicable tests is not stale: each entry names a collected test.
    for pattern in not_applicable.for_optimizer(name, True):
        assert any(
            not_applicable.reason({pattern: ""}, key) is not None for key in outcomes
        ), f"not_applicable.py lists {pattern!r}, which Keras no longer has"
