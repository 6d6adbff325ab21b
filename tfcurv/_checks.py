"""Argument checks in Keras' message style, for every tfcurv package (the bottom floor).

Each check raises ``ValueError`` with Keras' wording, ``Argument `name` must be
... Received: name=...``, so a bad value fails where it is passed (not as NaNs
after many steps), and names the argument.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def check_range(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``float(value)`` if it is a finite real number within the range.

    Raises:
        ValueError: naming ``name``, the received value and the accepted range.
    """
    interval = (
        ("[" if low_inclusive else "(")
        + ("-inf" if low is None else repr(low))
        + ", "
        + ("inf" if high is None else repr(high))
        + ("]" if high_inclusive else ")")
    )
    message = f"Argument `{name}` must be a real number in {interval}. Received: {name}={value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(message)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(message)
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(message)
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(message)
    return value


def check_integer(name: str, value, low: int = 1) -> int:
    """Return ``int(value)`` if it is an integer (not a bool) ``>= low``.

    Raises:
        ValueError: naming ``name``, the received value and the accepted range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"Argument `{name}` must be an integer >= {low}. Received: {name}={value!r}")
    return int(value)


def check_seed(value) -> int:
    """Return ``int(value)`` if it is an integer in ``[0, 2**63)`` (a seed of
    TensorFlow's stateless random ops), else raise ``ValueError`` naming ``seed``."""
    value = check_integer("seed", value, low=0)
    if value >= 2**63:
        raise ValueError(
            f"Argument `seed` must be an integer in [0, 2**63). Received: seed={value!r}"
        )
    return value


def check_bool(name: str, value) -> bool:
    """Return ``value`` as a Python bool if it is ``True`` or ``False`` (a NumPy
    ``bool_`` too, as Keras' own optimizers accept), else raise ``ValueError``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Argument `{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def check_choice(name: str, value, choices: tuple) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"Argument `{name}` must be one of {', '.join(map(repr, choices))}. "
            f"Received: {name}={value!r}"
        )
    return value


def check_verbose(value):
    """``verbose`` as ``model.fit`` takes it: ``"auto"``, 0, 1 or 2."""
    if value == "auto" or (
        isinstance(value, numbers.Integral) and not isinstance(value, bool)
        and value in (0, 1, 2)
    ):  # fmt: skip
        return value
    raise ValueError(
        f"Argument `verbose` must be 'auto', 0, 1 or 2. Received: verbose={value!r}"
    )
