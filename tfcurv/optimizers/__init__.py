"""Keras-native optimizers, serializable under the package name ``"tfcurv"``."""

__all__: list[str] = []
