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

import dataclasses
import math
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

from slim.errors import NetError

__all__ = ["Shape", "Layer", "ChannelRole", "register", "layer_class", "registered_types", "count", "canonical_axis"]

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


_LOADED = []


def _load_all():
    # Importing the family modules runs their @register decorators. Once: even a cached import statement costs
    # tens of microseconds, paid per layer of every net built.
    if _LOADED:
        return
    from slim.layers import (activation, conv, data, inner_product, loss, norm, pooling,  # noqa: F401
                             structure)
    _LOADED.append(True)


def count(shape: Sequence[int], start: int = 0, end: Optional[int] = None) -> int:
    """Product of ``shape[start:end]`` (Caffe's Blob::count)."""
    return math.prod(shape[start:end])


def canonical_axis(axis: int, ndim: int, what: str) -> int:
    """Caffe's CanonicalAxisIndex: a negative axis counts from the end; out of range is an error."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what} axis {axis} is out of range for a {ndim}-D blob")
    return axis + ndim if axis < 0 else axis


@dataclasses.dataclass(frozen=True)
class ChannelRole:
    """How a layer treats the channels (axis 1) of its bottoms and tops: what the channel pruner (slim.prune) reads.

    Kinds:
        "produces": the tops carry new channels (Convolution, Deconvolution, InnerProduct over C x H x W); bottom
            channels index ``input_blobs`` (respecting ``group``).
        "passthrough": channel c of every top is channel c of bottom 0 (BatchNorm, Scale, activations, Pooling,
            Split, ...); any other bottom is read for its shape only.
        "ties": all bottoms and tops share channel indices (Eltwise; Concat off the channel axis).
        "concat": the top holds the bottoms' channels one after the other, at offsets (Concat on axis 1).
        "slice": each top holds a contiguous range of the bottom's channels (Slice on axis 1).
        "flatten": channel c of bottom 0 becomes top channels c*repeat ... c*repeat+repeat-1 (Flatten, or a Reshape
            merging the channel axis with the axes after it).
        "sink": reads its bottoms without constraining their channels (Silence).
        "barrier": mixes channels irreversibly (Softmax, losses, LRN across channels, a Reshape across the channel
            axis) or creates the net's data: none of its bottom or top channels may be removed.

    Attributes:
        kind: one of the kinds above.
        channel_blobs: (blob index, axis) of each of the layer's blobs indexed by its top channels; for "produces"
            an axis of size C_out / group is indexed within one group.
        input_blobs: "produces": (blob index, axis) of each blob indexed by bottom channels (C_in, C_in / group, or
            C_in x H x W columns of an InnerProduct).
        masked: blob indices zeroed to silence a channel (the pruner's "masked original"); None means all of
            ``channel_blobs``.
        factor: index of the blob holding network slimming's channel scaling factor (Scale's gamma), or None.
        group: "produces": the convolution group.
        repeat: "flatten": top channels per bottom channel.
        pointwise: a top element depends only on the bottom elements at the same position (activations, BatchNorm
            with global statistics, per-channel Scale and Bias, Eltwise), so ``forward`` may run on one value per
            channel.
        zero_preserving: a channel that is zero (with its ``masked`` blobs zeroed) comes out zero; False for
            Sigmoid (f(0) = 0.5), Exp, a Power with a shift, ...
        keeps_constants: a channel that is one constant everywhere comes out as that constant (MAX pooling, AVE
            pooling without padding; not AVE with padding, whose border averages count the zero padding).
        absorbs_constants: "produces": a constant input channel adds a constant to each output channel, which can be
            folded into a bias (a Convolution without padding, InnerProduct).
        product: "ties": the top is the product of the bottoms (Eltwise PROD, Scale by a second bottom), so a channel
            that is zero in any one bottom comes out zero whatever the others hold (HardSwish's x * gate(x) with
            gate(0) = 0.5, squeeze-and-excitation's x * sigmoid(...)).
    """

    kind: str = "barrier"
    channel_blobs: Tuple[Tuple[int, int], ...] = ()
    input_blobs: Tuple[Tuple[int, int], ...] = ()
    masked: Optional[Tuple[int, ...]] = None
    factor: Optional[int] = None
    group: int = 1
    repeat: int = 1
    pointwise: bool = False
    zero_preserving: bool = True
    keeps_constants: bool = True
    absorbs_constants: bool = False
    product: bool = False


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
        self.bottom_shapes: List[Shape] = [tuple(map(int, s)) for s in bottom_shapes]
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
    def for_mode(self, training: bool) -> "Layer":
        """This layer as it runs in torch's train (True) or eval (False) mode, for ``Net.train()``/``Net.eval()``.

        Only behaviour Caffe derives from the phase switches (BatchNorm's statistics, Dropout); the default is the
        layer itself. An override returns a shallow copy and never changes ``self``, which the graph shares.
        """
        return self

    def forward(self, blobs: list, bottoms: list) -> list:
        """Compute the tops from the bottoms (tensors) and the layer's blobs (tensors, Caffe order)."""
        raise NotImplementedError

    # ----- channels (slim.prune) ----------------------------------------------------------------------------
    def channel_role(self) -> ChannelRole:
        """How the layer treats channels, for the pruner; the default, a barrier, is always safe."""
        return ChannelRole("barrier")

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
