"""Training under MultiWorkerMirroredStrategy: two worker processes on the
loopback address (free ports, a timeout on every process).

Each case starts real worker processes (about 20 s per case on 2 cores), so
the module is marked slow; it runs in CI.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

JOB = pathlib.Path(__file__).with_name("multi_worker_job.py")
TIMEOUT = 300  # seconds, per process


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment() -> dict:
    """This process' environment (conftest already points KERAS_HOME, TMPDIR,
    ... into the test sandbox), without a TF_CONFIG of its own."""
    environment = dict(os.environ)
    environment.pop("TF_CONFIG", None)
    return environment


def _start(arguments, tmp_path, log_name):
    log = open(tmp_path / log_name, "w")
    return subprocess.Popen(
        [sys.executable, str(JOB), *map(str, arguments)],
        stdout=log, stderr=subprocess.STDOUT, env=_environment(),
    ), log  # fmt: skip


def _finish(process, log, tmp_path, log_name) -> str:
    try:
        process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    return (tmp_path / log_name).read_text()


@pytest.mark.parametrize("optimizer", ["sgd", "agd", "sgdph", "adafisher"])
def test_two_workers_equal_one_process(optimizer, tmp_path):
    """Weights after two epochs, and the Hessian at them (each product spread
    over the two workers), equal one process on the global batch."""
    ports = [_free_port(), _free_port()]
    runs = [
        _start([optimizer, tmp_path / f"w{i}.npz", i, *ports], tmp_path, f"w{i}.log")
        for i in range(2)
    ] + [_start([optimizer, tmp_path / "single.npz"], tmp_path, "single.log")]
    logs = [
        _finish(process, log, tmp_path, name)
        for (process, log), name in zip(runs, ["w0.log", "w1.log", "single.log"])
    ]
    for text, (process, _) in zip(logs, runs):
        assert process.returncode == 0, text[-3000:]
    assert all("HESSIAN REPLICAS 2" in text for text in logs[:2])
    assert "HESSIAN REPLICAS 1" in logs[2]
    single = np.load(tmp_path / "single.npz")
    for worker in ("w0", "w1"):
        result = np.load(tmp_path / f"{worker}.npz")
        for key in single.files:
            np.testing.assert_allclose(
                result[key], single[key], rtol=1e-12, atol=1e-14,
                err_msg=f"{optimizer} {worker} {key}",
            )  # fmt: skip


def test_a_killed_worker_makes_the_other_fail_within_bounded_time(tmp_path):
    ports = [_free_port(), _free_port()]
    runs = [
        _start(["agd", tmp_path / f"w{i}.npz", i, *ports, "--epochs", "100000"],
               tmp_path, f"w{i}.log")
        for i in range(2)
    ]  # fmt: skip
    survivor, victim = runs[0][0], runs[1][0]
    deadline = time.monotonic() + TIMEOUT
    while "STEP" not in (tmp_path / "w1.log").read_text():
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.5)
    victim.kill()
    killed_at = time.monotonic()
    text = _finish(survivor, runs[0][1], tmp_path, "w0.log")
    seconds = time.monotonic() - killed_at
    _finish(victim, runs[1][1], tmp_path, "w1.log")
    assert survivor.returncode != 0
    assert "Unavailable" in text or "unavailable" in text or "Aborted" in text, text[-3000:]
    assert seconds < 120, seconds
    print(f"survivor failed {seconds:.1f} s after the kill")



def test_backup_and_restore_resumes_the_pair_to_the_single_process_result(tmp_path):
    """Worker 1 dies in the second epoch, so worker 0 fails too; both restart
    from their BackupAndRestore folders and finish equal to one process."""
    backup = tmp_path / "backup"
    ports = [_free_port(), _free_port()]
    common = ["--epochs", 3, "--backup", backup]
    runs = [
        _start(["adafisher", tmp_path / "w0.npz", 0, *ports, *common], tmp_path, "a0.log"),
        _start(["adafisher", tmp_path / "w1.npz", 1, *ports, *common, "--crash-after", 6],
               tmp_path, "a1.log"),
        _start(["adafisher", tmp_path / "single.npz", "--epochs", 3], tmp_path, "s.log"),
    ]  # fmt: skip
    logs = [
        _finish(process, log, tmp_path, name)
        for (process, log), name in zip(runs, ["a0.log", "a1.log", "s.log"])
    ]
    assert runs[1][0].returncode == 3, logs[1][-2000:]
    assert runs[0][0].returncode != 0 and not (tmp_path / "w0.npz").exists()
    assert runs[2][0].returncode == 0, logs[2][-2000:]
    ports = [_free_port(), _free_port()]
    again = [
        _start(["adafisher", tmp_path / f"w{i}.npz", i, *ports, *common], tmp_path, f"b{i}.log")
        for i in range(2)
    ]
    for i, (process, log) in enumerate(again):
        text = _finish(process, log, tmp_path, f"b{i}.log")
        assert process.returncode == 0, text[-3000:]
        # Resumed after the first epoch (4 steps), not restarted: 8 steps left.
        assert text.count("STEP") == 8, text.count("STEP")
    single = np.load(tmp_path / "single.npz")
    for worker in ("w0", "w1"):
        result = np.load(tmp_path / f"{worker}.npz")
        for key in single.files:
            expected = single[key][-len(result[key]) :] if key == "loss" else single[key]
            np.testing.assert_allclose(
                result[key], expected, rtol=1e-12, atol=1e-14, err_msg=f"{worker} {key}"
            )
