"""The layer types, one module per family, registered by Caffe's type string (see slim.layers.base)."""

from slim.layers.base import Layer, layer_class, register, registered_types

__all__ = ["Layer", "layer_class", "register", "registered_types"]
