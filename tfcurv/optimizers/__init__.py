"""Keras-native optimizers, serializable under the package name ``"tfcurv"``."""

from tfcurv.optimizers.adafisher import AdaFisher, AdaFisherW
from tfcurv.optimizers.agd import AGD
from tfcurv.optimizers.sgdph import SGDPH

__all__: list[str] = ["AGD", "AdaFisher", "AdaFisherW", "SGDPH"]
