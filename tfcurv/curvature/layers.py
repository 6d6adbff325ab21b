"""The layers of a model, walked one way for every consumer.

Keras has no public recursive layer listing: ``Model.layers`` stops at the first
level of a subclassed model and skips layers held by custom layers. Every tfcurv
module that needs "the layers of this model" uses :func:`matching_layers`.
"""

from __future__ import annotations

import keras

from tfcurv import _keras


def matching_layers(
    model: keras.layers.Layer, layer_types: tuple[type, ...]
) -> list[keras.layers.Layer]:
    """Every layer inside ``model`` (nested models and custom layers included)
    that is an instance of one of ``layer_types``, each once, outermost first."""
    candidates = _keras.flatten_layers(model)
    found, seen = [], set()
    for layer in candidates:
        if isinstance(layer, layer_types) and id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
    return found
