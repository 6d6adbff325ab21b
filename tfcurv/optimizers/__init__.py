"""Keras-native optimizers, serializable under the package name ``"tfcurv"``."""

from tfcurv.optimizers.agd import AGD

__all__: list[str] = ["AGD"]
