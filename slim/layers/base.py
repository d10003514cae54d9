"""The layer contract and the registry keyed by Caffe's type string.

Every layer type lives in one class that provides, in one place:
  * construction from its LayerParameter and the bottom shapes, with Caffe's checks (``setup``);
  * pure top-shape and blob-shape inference, shared by the builder, the pruner and calflop (no torch);
  * the torch forward (``forward``), functional over the layer's blobs;
  * Caffe's blob layout and fillers (``init_blobs``) and forced learning multipliers (BatchNorm's lr_mult 0);
  * its cost for calflop (``macs``: multiply-accumulates for one forward of the whole batch).

Register with ``@register``; look up with ``layer_class(type_name)``. A Caffe ``Python`` layer is refused: slim never
executes code named in a file.
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

from slim.errors import NetError

__all__ = ["Shape", "Layer", "register", "layer_class", "registered_types", "count", "canonical_axis"]

Shape = Tuple[int, ...]

_REGISTRY: Dict[str, type] = {}


def register(cls):
    """Class decorator: register a Layer subclass under its ``type`` string (Caffe's, case-sensitive)."""
    if cls.type in _REGISTRY:
        raise RuntimeError(f"layer type {cls.type!r} registered twice")
    _REGISTRY[cls.type] = cls
    return cls


def registered_types() -> List[str]:
    """The supported layer type strings, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def layer_class(type_name: str, layer_name: str = "?", source: str = "<net>") -> type:
    """The Layer class for a Caffe type string, or a NetError that names the layer and lists the supported types."""
    _load_all()
    if type_name == "Python":
        raise NetError(f"{source}: layer {layer_name!r} is a Caffe Python layer. slim refuses to execute code named "
                       f"in a net file; replace it with built-in layers (supported: {', '.join(registered_types())}).")
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise NetError(f"{source}: layer {layer_name!r} has unknown type {type_name!r}. Supported types: "
                       f"{', '.join(registered_types())}.") from None


def _load_all():
    # Importing the family modules runs their @register decorators (once; later imports are cached).
    from slim.layers import (activation, conv, data, inner_product, loss, norm, pooling,  # noqa: F401
                             structure)


def count(shape: Sequence[int], start: int = 0, end: Optional[int] = None) -> int:
    """Product of ``shape[start:end]`` (Caffe's Blob::count)."""
    return math.prod(shape[start:end])


def canonical_axis(axis: int, ndim: int, what: str) -> int:
    """Caffe's CanonicalAxisIndex: a negative axis counts from the end; out of range is an error."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what} axis {axis} is out of range for a {ndim}-D blob")
    return axis + ndim if axis < 0 else axis


class Layer:
    """One layer of a net: its parameter, bottom shapes and everything derived from them.

    Subclasses set ``type`` and implement ``setup`` (validate, then set ``top_shapes`` and ``blob_shapes``) and
    ``forward``. ``num_bottoms``/``num_tops`` are (min, max) with None for unbounded.

    Attributes:
        param: the layer's LayerParameter (after upgrade and phase assignment).
        name: the layer name.
        phase: pb.TRAIN or pb.TEST, the phase this layer runs in.
        bottom_shapes: shapes of the bottoms, batch first.
        top_shapes: shapes of the tops.
        blob_shapes: shapes of the layer's Caffe blobs, in Caffe's order.
    """

    type: ClassVar[str] = ""
    num_bottoms: ClassVar[Tuple[int, Optional[int]]] = (1, 1)
    num_tops: ClassVar[Tuple[int, Optional[int]]] = (1, 1)
    is_loss: ClassVar[bool] = False          # derived from Caffe's LossLayer: loss_weight 1 on top 0 by default
    is_data: ClassVar[bool] = False          # produces the net's data; removed when deriving a deploy net
    cost_kind: ClassVar[str] = "other"       # calflop bucket: "conv", "fc" or "other"
    in_place_ok: ClassVar[bool] = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int, source: str = "<net>"):
        self.param = param
        self.name = param.name
        self.phase = phase
        self.source = source
        self.bottom_shapes: List[Shape] = [tuple(int(d) for d in s) for s in bottom_shapes]
        self.top_shapes: List[Shape] = []
        self.blob_shapes: List[Shape] = []
        self._check_counts()
        try:
            self.setup()
        except ValueError as e:  # shape rules raise ValueError with the specifics; add the layer context
            raise self.error(str(e)) from None

    # ----- construction -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Validate the parameter against the bottom shapes and set ``top_shapes`` and ``blob_shapes``."""
        raise NotImplementedError

    def error(self, message: str) -> NetError:
        """A NetError that names the file and this layer."""
        return NetError(f"{self.source}: layer {self.name!r} ({self.type}): {message}")

    def _check_counts(self):
        nb, nt = len(self.param.bottom), len(self.param.top)
        for what, n, (lo, hi) in (("bottoms", nb, self.num_bottoms), ("tops", nt, self.num_tops)):
            if n < lo or (hi is not None and n > hi):
                want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
                raise self.error(f"expects {want} {what}, found {n}.")

    # ----- blobs --------------------------------------------------------------------------------------------
    def forced_lr_mult(self, index: int) -> Optional[float]:
        """A learning-rate multiplier Caffe forces on blob ``index`` (BatchNorm's statistics: 0), else None."""
        return None

    def init_blobs(self, generator) -> list:
        """Fresh blobs as float32 tensors, filled as Caffe's fillers would (seeded by ``generator``)."""
        return []

    # ----- run time -----------------------------------------------------------------------------------------
    def forward(self, blobs: list, bottoms: list) -> list:
        """Compute the tops from the bottoms (tensors) and the layer's blobs (tensors, Caffe order)."""
        raise NotImplementedError

    # ----- cost ---------------------------------------------------------------------------------------------
    def macs(self) -> Optional[int]:
        """Multiply-accumulates of one forward over the whole batch; None when the type has no cost rule."""
        return None

    def param_count(self, learnable_only: bool = True) -> int:
        """Elements in the layer's blobs; with ``learnable_only`` those with a forced lr_mult of 0 are left out."""
        return sum(count(s) for i, s in enumerate(self.blob_shapes)
                   if not (learnable_only and self.forced_lr_mult(i) == 0))

    def __repr__(self):
        tops = ", ".join("x".join(map(str, s)) for s in self.top_shapes)
        return f"{self.type}({self.name!r} -> {tops})"
