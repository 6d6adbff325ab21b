"""The layers and variables of a model, walked and selected one way for every consumer.

Keras has no public recursive layer listing: ``Model.layers`` stops at the first
level of a subclassed model and skips layers held by custom layers. Every tfcurv
module that needs "the layers of this model" uses :func:`all_layers` or
:func:`matching_layers`, and every entry point that takes ``variables=``
(``Hessian``, ``GaussNewton``, ``Fisher``, ``hessian_eigenpairs``,
``WeightTrajectory``, ...) resolves it with :func:`select_variables`.
"""

from __future__ import annotations

import keras

from tfcurv import _keras

__all__ = ["all_layers", "layers_with_weights", "matching_layers", "select_variables"]


def all_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer inside ``model`` (nested models and custom layers included,
    ``model`` itself excluded), each once, outermost first."""
    return _keras.flatten_layers(model)[1:]


def matching_layers(
    model: keras.layers.Layer, layer_types: tuple[type, ...]
) -> list[keras.layers.Layer]:
    """Every layer inside ``model`` (nested models and custom layers included,
    ``model`` itself too) that is an instance of one of ``layer_types``, each
    once, outermost first."""
    return [
        layer
        for layer in _keras.flatten_layers(model)
        if isinstance(layer, layer_types)
    ]


def layers_with_weights(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Layers that own trainable variables directly (not through sub-layers)."""
    owned = []
    for layer in all_layers(model):
        inner = {
            id(v)
            for sub in _keras.flatten_layers(layer)[1:]
            for v in sub.trainable_variables
        }
        if any(id(v) not in inner for v in layer.trainable_variables):
            owned.append(layer)
    return owned


def select_variables(
    model: keras.Model, variables, *, trainable_only: bool = True
) -> list:
    """``variables`` as users write it, as a list of the model's variables.

    Accepts ``None`` (all trainable variables), or one or a list of: variables,
    layers (their trainable variables), layer names (at any depth), and
    variable paths (exact, or matching the end of one path). Each variable
    counts once, in the order first named.

    Raises:
        ValueError: naming ``variables``, for an entry that is not one of the
            model's (trainable, if ``trainable_only``) variables or layers, a
            name that matches no layer and not exactly one variable, or a
            selection without variables.
    """
    pool = list(model.trainable_variables if trainable_only else model.variables)
    if variables is None:
        return pool
    items = list(variables) if isinstance(variables, (list, tuple)) else [variables]
    known = {id(v) for v in pool}
    layers = all_layers(model)
    by_name = {}
    for layer in layers:
        by_name.setdefault(layer.name, []).append(layer)
    kind = "trainable variable" if trainable_only else "variable"
    selected = []
    for item in items:
        if isinstance(item, str) and item in by_name:
            if len(by_name[item]) != 1:
                raise ValueError(
                    f"Argument `variables` names layer {item!r}, of which the model "
                    f"has {len(by_name[item])}; pass the layer itself. "
                    f"Received: variables={variables!r}"
                )
            item = by_name[item][0]
        if isinstance(item, keras.layers.Layer):
            if item is not model and not any(item is layer for layer in layers):
                raise ValueError(
                    f"Argument `variables` must name layers of the model; layer "
                    f"{item.name!r} is not one. Received: variables={variables!r}"
                )
            selected.extend(item.trainable_variables)
        elif isinstance(item, str):
            matches = [v for v in pool if v.path == item or v.path.endswith("/" + item)]
            if len(matches) != 1:
                raise ValueError(
                    f"Argument `variables` entries must name one layer or one {kind} "
                    f"of the model; {item!r} matches {len(matches)} variables. "
                    f"Variables: {[v.path for v in pool]}"
                )
            selected.append(matches[0])
        elif hasattr(item, "path") and hasattr(item, "shape"):
            if id(item) not in known:
                raise ValueError(
                    f"Argument `variables` must contain {kind}s (or layers) of the "
                    f"model; {item.path!r} is not one"
                )
            selected.append(item)
        else:
            raise ValueError(
                "Argument `variables` must be None, or variables, layers, layer names "
                f"or variable paths of the model. Received an entry {item!r}"
            )
    selected = list({id(v): v for v in selected}.values())
    if not selected:
        raise ValueError(
            f"Argument `variables` selects no {kind}. Received: variables={variables!r}"
        )
    return selected
