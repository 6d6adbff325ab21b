"""Curvature of losses of Keras models: products, diagonals, spectra.

The functions in this package are pure TensorFlow (no Keras state) so that the
train step and the analysis tools can share them.
"""
