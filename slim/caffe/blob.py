"""pycaffe's Blob: ``.data`` and ``.diff`` as writable numpy arrays shared with the computation.

A Blob does not own memory: it names a tensor of a net (a blob buffer of the layer runner, or a layer's parameter)
and looks it up at every access, so it stays valid when a net is reshaped or shares its weights with another.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch

from slim.caffe._mode import MIRRORS
from slim.errors import NetError

__all__ = ["Blob"]


class Blob:
    """One of a net's blobs, as pycaffe shows it.

    Attributes:
        data: the values, a float32 numpy array of ``shape`` (on the CPU a view of the tensor itself).
        diff: the gradient, same shape.
        shape, count, num, channels, height, width: the shape; the last four are Caffe's legacy 4-D accessors.
    """

    def __init__(self, name: str, data: Callable[[], torch.Tensor], diff: Callable[[], torch.Tensor],
                 reshape: Optional[Callable[[Tuple[int, ...]], None]] = None) -> None:
        self._name = name
        self._data = data
        self._diff = diff
        self._reshape = reshape

    @property
    def data(self) -> np.ndarray:
        return MIRRORS.view(self, "data", self._data)

    @property
    def diff(self) -> np.ndarray:
        return MIRRORS.view(self, "diff", self._diff)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self._data().shape)

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def _legacy(self, index: int) -> int:
        # Caffe's Blob::LegacyShape: an axis the blob does not have counts as 1.
        shape = self.shape
        if len(shape) > 4:
            raise NetError(f"blob {self._name!r} has {len(shape)} axes {shape}; num, channels, height and width exist "
                           f"only for blobs of at most 4 axes (Caffe's legacy accessors). Use .shape instead.")
        return shape[index] if index < len(shape) else 1

    @property
    def num(self) -> int:
        return self._legacy(0)

    @property
    def channels(self) -> int:
        return self._legacy(1)

    @property
    def height(self) -> int:
        return self._legacy(2)

    @property
    def width(self) -> int:
        return self._legacy(3)

    def reshape(self, *shape: int) -> None:
        """Give the blob a new shape (its values are then undefined, as in Caffe); call ``net.reshape()`` or
        ``net.forward()`` to carry an input's new shape through the net.

        Raises:
            NetError: a negative dimension, or a parameter blob (its shape is fixed by the layer).
        """
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise NetError(f"blob {self._name!r}: reshape({', '.join(map(str, dims))}) has a negative dimension.")
        if self._reshape is None:
            raise NetError(f"blob {self._name!r} is a layer parameter, whose shape the layer fixes; build a net "
                           f"with the new layer sizes instead (and copy the weights that still fit).")
        self._reshape(dims)

    def __repr__(self) -> str:
        return f"Blob({self._name!r}, shape={self.shape})"

