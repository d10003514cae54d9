"""Deriving a deploy net from a train/test net, as Caffe users do by hand.

A deploy net is the TEST-phase net without data layers, losses and accuracy, fed by one ``Input`` layer: what
``caffe time``, OpenCV's importer, calflop and inference read. The derivation:

1. keep the layers that Caffe's NetState filter keeps for phase TEST, then drop every include/exclude rule;
2. remove the data layers, noting each data top and its per-sample shape;
3. remove losses (type ending in "Loss"), Accuracy, and every layer that reads the label or anything computed
   from it (the label is every data top after the first; a data layer's tops are data then label);
4. put one Input layer named ``input`` first, with each data top that a remaining layer still reads and its shape
   (batch, C, H, W);
5. by default the net ends at the logits (what pruning, calflop and timing compare); with ``softmax=True`` a Softmax
   layer ``prob`` follows each classifier that fed a SoftmaxWithLoss, as BVLC's deploy files end
   (``<top>_prob`` when there are several).

Example::

    from slim.deploy import make_deploy
    deploy = make_deploy(train_val_net)                                  # shapes derived from the data layers
    deploy = make_deploy(net, input_shapes={"data": (3, 227, 227)}, batch=10)
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from slim import proto as pb
from slim.errors import DataError, NetError
from slim.graph import filter_net

__all__ = ["DATA_LAYER_TYPES", "make_deploy", "data_shape"]

#: Layer types that read data; a deploy net replaces them by its Input layer.
DATA_LAYER_TYPES = frozenset({"Data", "ImageData", "MemoryData", "HDF5Data", "WindowData", "DummyData", "SlimData",
                              "Input"})

def _underivable(layer: pb.LayerParameter, why: str) -> NetError:
    top = layer.top[0] if layer.top else "data"
    return NetError(f"Cannot derive the input shape of data layer {layer.name!r} ({layer.type}): {why}. Pass the "
                    f"per-sample shape explicitly: --input-shape {top}:C,H,W on the command line, or "
                    f"input_shapes={{{top!r}: (C, H, W)}} to make_deploy.")


def data_shape(layer: pb.LayerParameter, top_index: int = 0) -> Tuple[int, ...]:
    """The per-sample shape (no batch axis) of a data layer's top: the shape the train/test net itself gives it.

    The dataset layers (SlimData, Data, ImageData, MemoryData) take it from ``slim.data.sample_shape``, which reads
    at most one header or record where the prototxt does not state it, and assumes C x crop x crop where the data
    is not on this machine; DummyData and Input take it from their layer's own shape rule. WindowData gives
    3 x crop x crop.

    Raises:
        NetError: the shape is not written in the layer and cannot be read (an absent LMDB without crop_size,
            HDF5Data); the message says to pass the shape explicitly.
    """
    from slim.data import DATA_LAYER_TYPES as SOURCE_TYPES, sample_shape

    if layer.type in SOURCE_TYPES:
        try:
            return sample_shape(layer)
        except DataError as e:
            raise _underivable(layer, f"the prototxt does not state its image size and its data cannot be read "
                                      f"here ({str(e).rstrip('.')})") from None
    if layer.type in ("DummyData", "Input"):
        from slim.layers import layer_class

        try:
            shapes = layer_class(layer.type, layer.name)(layer, [], pb.TEST, source="the net").top_shapes
        except NetError as e:
            raise _underivable(layer, str(e)) from None
        if not shapes:
            raise _underivable(layer, f"its parameters give no shape for top {top_index}")
        return tuple(shapes[min(top_index, len(shapes) - 1)][1:])
    if layer.type == "WindowData" and layer.transform_param.crop_size:
        crop = int(layer.transform_param.crop_size)
        return (3, crop, crop)                       # Caffe's WindowData crops colour windows
    raise _underivable(layer, "its data files state the shape, not the prototxt")


def make_deploy(net: pb.NetParameter, *, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
                batch: int = 1, softmax: bool = False) -> pb.NetParameter:
    """The deploy form of a train/test net: TEST-phase layers, no data/loss/accuracy, one Input layer first.

    Args:
        net: a net in the current (V2) format, as ``slim.io.read_net`` returns it; it is not modified.
        input_shapes: per-sample shape (C, H, W), without the batch axis, by data top name; overrides the shape
            derived from the data layer. Every name must be an input of the deploy net.
        batch: the first axis of every input shape.
        softmax: end each classifier with a Softmax ``prob`` layer (BVLC's deploy files); the default ends at the
            logits.

    Returns:
        A new NetParameter. BatchNorm layers keep ``use_global_stats`` unset (the TEST phase implies global
        statistics), so the same file serves slim, Caffe and OpenCV.

    Raises:
        NetError: an input shape cannot be derived, or ``input_shapes`` names a blob that is not an input.
        DataError: a data layer's transform_param does not fit its images (a crop larger than the image).
    """
    if batch < 1:
        raise NetError(f"The deploy batch size must be at least 1; got {batch}.")
    if net.input or net.input_shape or net.input_dim:
        raise NetError(f"Net {net.name!r} declares its inputs with the legacy input/input_dim header; read it with "
                       f"slim.io.read_net (which upgrades it to an Input layer) before deriving a deploy net.")
    filtered = filter_net(net, pb.NetState(phase=pb.TEST))
    deploy = pb.NetParameter()
    deploy.CopyFrom(filtered)
    deploy.ClearField("layer")
    deploy.ClearField("state")

    data_tops: List[Tuple[str, pb.LayerParameter, int]] = []  # (top, data layer, top index) in net order
    dead = set()  # the label and every blob computed from it, or from a removed loss
    kept: List[pb.LayerParameter] = []
    for layer in filtered.layer:
        if layer.type in DATA_LAYER_TYPES:
            # Data layers produce data then label; an Input layer's tops are all inputs.
            inputs = list(layer.top) if layer.type == "Input" else list(layer.top[:1])
            data_tops.extend((top, layer, i) for i, top in enumerate(inputs))
            dead.update(layer.top[len(inputs):])
            continue
        if layer.type.endswith("Loss") or layer.type == "Accuracy" or dead.intersection(layer.bottom):
            dead.update(layer.top)
            continue
        copy = pb.LayerParameter()
        copy.CopyFrom(layer)
        copy.ClearField("include")
        copy.ClearField("exclude")
        # An explicit use_global_stats: false would normalise a deployed image by its own batch (and OpenCV refuses
        # it); unset, TEST implies the stored statistics.
        if copy.type == "BatchNorm" and copy.batch_norm_param.HasField("use_global_stats") \
                and not copy.batch_norm_param.use_global_stats:
            copy.batch_norm_param.ClearField("use_global_stats")
            if not copy.batch_norm_param.ListFields():
                copy.ClearField("batch_norm_param")
        kept.append(copy)

    read = {bottom for layer in kept for bottom in layer.bottom}
    inputs = [(top, layer, index) for top, layer, index in data_tops if top in read]
    input_shapes = dict(input_shapes or {})
    unknown = sorted(set(input_shapes) - {top for top, _, _ in inputs})
    if unknown:
        raise NetError(f"input_shapes names {', '.join(map(repr, unknown))}, which the deploy net of {net.name!r} "
                       f"does not read as input; its inputs are "
                       f"{', '.join(repr(top) for top, _, _ in inputs) or 'none'}.")

    input_layer = pb.LayerParameter(name="input", type="Input")
    for top, layer, index in inputs:
        shape = input_shapes[top] if top in input_shapes else data_shape(layer, index)
        if not shape or any(int(d) < 1 for d in shape):
            raise NetError(f"The input shape of {top!r} must be positive dimensions without the batch axis, e.g. "
                           f"(3, 224, 224); got {tuple(shape)}.")
        input_layer.top.append(top)
        input_layer.input_param.shape.add().dim.extend([batch, *(int(d) for d in shape)])
    if inputs:
        if any(layer.name == input_layer.name for layer in kept):
            raise NetError(f"Net {net.name!r} has a layer named 'input' that is not a data layer; the deploy net's "
                           f"Input layer takes that name. Rename the layer.")
        deploy.layer.append(input_layer)
    deploy.layer.extend(kept)
    if softmax:
        _add_softmax(deploy, filtered, dead)
    return deploy


def _add_softmax(deploy: pb.NetParameter, filtered: pb.NetParameter, dead: set) -> None:
    """Append a Softmax after every blob a SoftmaxWithLoss read (its axis kept): ``prob``, or ``<top>_prob``."""
    losses = {}
    for layer in filtered.layer:
        if layer.type == "SoftmaxWithLoss" and layer.bottom and layer.bottom[0] not in dead:
            losses.setdefault(layer.bottom[0], layer)
    if not losses:
        raise NetError(f"Net {filtered.name!r} has no SoftmaxWithLoss to take the classifier from, so there is no "
                       f"logit blob to end with a Softmax; derive the deploy net without it.")
    taken = {layer.name for layer in deploy.layer} | {top for layer in deploy.layer for top in layer.top}
    for scores, loss in losses.items():
        name = "prob" if len(losses) == 1 else f"{scores}_prob"
        if name in taken:
            raise NetError(f"The deploy net of {filtered.name!r} already has a layer or blob named {name!r}; rename "
                           f"it to add the Softmax.")
        prob = deploy.layer.add(name=name, type="Softmax", bottom=[scores], top=[name])
        if loss.HasField("softmax_param"):
            prob.softmax_param.CopyFrom(loss.softmax_param)
