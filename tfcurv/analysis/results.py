"""Plain result containers that save to and load from ``.npz``.

Every measurement of :mod:`tfcurv.analysis` returns a dataclass whose fields are
numpy arrays (or plain numbers and strings). :class:`SavableResult` gives them
``save(path)`` / ``load(path)`` so results can be kept next to the plots, compared
between runs, or loaded without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Self

import numpy as np


class SavableResult:
    """Mixin for dataclasses whose fields are arrays, numbers or strings."""

    def save(self, path: str | os.PathLike) -> None:
        """Write every field to ``path`` (a ``.npz`` file, uncompressed)."""
        fields = {
            f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)
        }
        np.savez(path, **fields)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Self:
        """Read a result written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as stored:
            values = {}
            for field in dataclasses.fields(cls):
                value = stored[field.name]
                values[field.name] = value.item() if value.ndim == 0 else value
        return cls(**values)
