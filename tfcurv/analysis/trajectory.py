"""Recording weights during ``fit`` to disk, with a memory and disk budget.

:class:`WeightTrajectory` is a Keras callback that appends the chosen variables to
one raw binary file per variable after every ``every`` optimizer steps (and once
at the start, so that the first update is part of the record). Only a small
buffer is held in memory; the files are read back as ``numpy.memmap`` arrays by
:class:`Trajectory`, so a trajectory of a large layer never has to fit in memory.

Layout of the directory::

    trajectory.json          variables (name, file, shape, dtype)
    steps.bin                int64 optimizer iteration of each record
    <variable>.bin           the records of one variable, C order, appended
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Sequence

import keras
import numpy as np

from tfcurv._checks import check_integer
from tfcurv.curvature.layers import select_variables

_META_FILE = "trajectory.json"
_STEPS_FILE = "steps.bin"
_STEP_DTYPE = np.dtype("int64")
_BUFFER_BYTES = 16 * 2**20


class TrajectoryBudgetError(RuntimeError):
    """Raised before a :class:`WeightTrajectory` would write more than ``max_bytes``."""


class Trajectory:
    """Read access to a recorded trajectory (memory-mapped, read-only).

    Args:
        directory: the folder a :class:`WeightTrajectory` wrote.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        meta_path = self.directory / _META_FILE
        if not meta_path.is_file():
            raise ValueError(
                f"`directory` holds no recorded trajectory ({meta_path} is missing). "
                f"Received: directory={str(directory)!r}"
            )
        self._variables = {
            v["name"]: v for v in json.loads(meta_path.read_text())["variables"]
        }
        steps_path = self.directory / _STEPS_FILE
        count = (
            steps_path.stat().st_size // _STEP_DTYPE.itemsize
            if steps_path.exists()
            else 0
        )
        self.steps: np.ndarray = (
            np.fromfile(steps_path, dtype=_STEP_DTYPE, count=count)
            if count
            else np.zeros(0, _STEP_DTYPE)
        )

    @property
    def names(self) -> list[str]:
        """Variable names (Keras ``variable.path``) in recording order."""
        return list(self._variables)

    def __len__(self) -> int:
        return len(self.steps)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one record of variable ``name``."""
        return tuple(self._entry(name)["shape"])

    def states(self, name: str, flatten: bool = True) -> np.ndarray:
        """All records of ``name`` as a read-only memmap, shape ``(T, P)`` or ``(T, *shape)``.

        ``name`` is a variable path, or its end (``"dense/kernel"``) if that is unique.
        """
        entry = self._entry(name)
        shape = tuple(entry["shape"])
        if len(self) == 0:
            return np.zeros(
                (0, int(np.prod(shape))) if flatten else (0, *shape), entry["dtype"]
            )
        full_shape = (
            (len(self), int(np.prod(shape))) if flatten else (len(self), *shape)
        )
        return np.memmap(
            self.directory / entry["file"],
            dtype=entry["dtype"],
            mode="r",
            shape=full_shape,
        )

    def _entry(self, name: str) -> dict:
        matches = [n for n in self._variables if n == name or n.endswith("/" + name)]
        if len(matches) != 1:
            raise ValueError(
                "`name` must be one of the recorded variables (or the end of exactly one "
                f"path) {self.names}. Received: name={name!r}"
            )
        return self._variables[matches[0]]


class WeightTrajectory(keras.callbacks.Callback):
    """Keras callback recording chosen variables during ``fit`` (Haink 2023, §5.3).

    The state when recording starts and the state after every optimizer step whose
    number (``optimizer.iterations``) is a multiple of ``every`` are appended to
    files in ``directory``; read them with :attr:`trajectory`
    (or :class:`Trajectory`), e.g. ``pca(callback.trajectory.states(name))``.
    Recording only reads the variables, so training is unchanged. Several ``fit``
    calls with the same callback append to the same record.

    Args:
        directory: folder for the files (created if needed).
        variables: what to record: ``None`` for all trainable variables, or a list of
            Keras variables, layers (their trainable variables), layer names or
            variable paths (``"dense_1/kernel"`` matches ``"sequential/dense_1/kernel"``).
        every: record after every ``every`` optimizer steps (positive integer).
        max_bytes: budget for the recorded data on disk; training stops with a
            :class:`TrajectoryBudgetError` *before* it would be exceeded (checked at
            the start of ``fit`` from the planned number of steps, and before each
            record). ``None`` for no budget.
        overwrite: whether an existing trajectory in ``directory`` may be replaced;
            if ``False`` an existing one raises ``FileExistsError``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        variables: Sequence | None = None,
        every: int = 1,
        max_bytes: int | None = None,
        overwrite: bool = False,
    ):
        super().__init__()
        check_integer("every", every)
        if max_bytes is not None:
            check_integer("max_bytes", max_bytes)
        self.directory = pathlib.Path(directory)
        self.every = int(every)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.overwrite = overwrite
        self._requested = variables
        self._variables: list | None = None
        self._buffer: list[tuple[int, list[np.ndarray]]] = []
        self._last_step: int | None = None
        self._bytes_written = 0
        self._batch_counter = 0

    @property
    def trajectory(self) -> Trajectory:
        """The recorded trajectory (flushes the in-memory buffer first)."""
        self._flush()
        return Trajectory(self.directory)

    @property
    def record_bytes(self) -> int:
        """Bytes one record takes on disk (all variables and the step number)."""
        if self._variables is None:
            raise RuntimeError(
                "the recorded variables are known once `fit` has started"
            )
        return _STEP_DTYPE.itemsize + sum(
            int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in self._variables
        )

    # Keras hooks -------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if self._variables is None:
            self._variables = select_variables(
                self.model, self._requested, trainable_only=False
            ) if self._requested is not None else list(self.model.trainable_variables)
            self._start_files()
        self._check_planned_budget()
        step = self._current_step()
        if self._last_step is None or (
            step % self.every == 0 and step != self._last_step
        ):
            self._record(step)

    def on_train_batch_end(self, batch, logs=None):
        self._batch_counter += 1
        step = self._current_step()
        if step // self.every > self._last_step // self.every:
            self._record(step)

    def on_train_end(self, logs=None):
        self._flush()

    # Internals ---------------------------------------------------------------------

    def _current_step(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            return int(keras.ops.convert_to_numpy(optimizer.iterations))
        return self._batch_counter

    def _start_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        meta_path = self.directory / _META_FILE
        if meta_path.exists():
            if not self.overwrite:
                raise FileExistsError(
                    f"{self.directory} already holds a trajectory; pass overwrite=True "
                    "to replace it or choose another `directory`."
                )
            for entry in json.loads(meta_path.read_text())["variables"]:
                (self.directory / entry["file"]).unlink(missing_ok=True)
            (self.directory / _STEPS_FILE).unlink(missing_ok=True)
        entries, used = [], set()
        for variable in self._variables:
            file_name = _file_name(variable.path, used)
            entries.append(
                {
                    "name": variable.path,
                    "file": file_name,
                    "shape": [int(d) for d in variable.shape],
                    "dtype": np.dtype(variable.dtype).name,
                }
            )
            (self.directory / file_name).write_bytes(b"")
        (self.directory / _STEPS_FILE).write_bytes(b"")
        meta_path.write_text(json.dumps({"variables": entries}, indent=1))

    def _check_planned_budget(self) -> None:
        steps = (self.params or {}).get("steps")
        epochs = (self.params or {}).get("epochs")
        if self.max_bytes is None or not steps or not epochs:
            return
        planned_records = 1 + (int(steps) * int(epochs)) // self.every
        planned = (
            self._bytes_written
            + self._buffered_bytes()
            + planned_records * self.record_bytes
        )
        if planned > self.max_bytes:
            raise TrajectoryBudgetError(
                f"recording {planned_records} states of {self.record_bytes} bytes "
                f"({epochs} epochs x {steps} steps, every={self.every}) would write "
                f"{planned} bytes, more than max_bytes={self.max_bytes}. Record fewer "
                "variables, raise `every`, or raise `max_bytes`."
            )

    def _record(self, step: int) -> None:
        if self.max_bytes is not None:
            total = self._bytes_written + self._buffered_bytes() + self.record_bytes
            if total > self.max_bytes:
                raise TrajectoryBudgetError(
                    f"the next record (step {step}) would bring the trajectory in "
                    f"{self.directory} to {total} bytes, more than max_bytes={self.max_bytes}. "
                    "Record fewer variables, raise `every`, or raise `max_bytes`."
                )
        values = [
            np.array(keras.ops.convert_to_numpy(v), copy=True) for v in self._variables
        ]
        self._buffer.append((step, values))
        self._last_step = step
        if self._buffered_bytes() >= _BUFFER_BYTES:
            self._flush()

    def _buffered_bytes(self) -> int:
        return len(self._buffer) * self.record_bytes if self._buffer else 0

    def _flush(self) -> None:
        if not self._buffer:
            return
        entries = json.loads((self.directory / _META_FILE).read_text())["variables"]
        for index, entry in enumerate(entries):
            with open(self.directory / entry["file"], "ab") as handle:
                handle.writelines(
                    np.ascontiguousarray(values[index], dtype=entry["dtype"]).tobytes()
                    for _, values in self._buffer
                )
        with open(self.directory / _STEPS_FILE, "ab") as handle:
            handle.write(
                np.array([s for s, _ in self._buffer], dtype=_STEP_DTYPE).tobytes()
            )
        self._bytes_written += self._buffered_bytes()
        self._buffer = []


def _file_name(path: str, used: set) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "__", path).strip("_") or "variable"
    name, suffix = base + ".bin", 1
    while name in used or name in (_META_FILE, _STEPS_FILE):
        suffix += 1
        name = f"{base}_{suffix}.bin"
    used.add(name)
    return name
