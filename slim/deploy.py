"""Deriving a deploy net from a train/test net, as Caffe users do by hand.

A deploy net is the TEST-phase net without data layers, losses and accuracy, fed by one ``Input`` layer: what
``caffe time``, OpenCV's importer, calflop and inference read. The derivation:

1. keep the layers that Caffe's NetState filter keeps for phase TEST, then drop every include/exclude rule;
2. remove the data layers, noting each data top and its per-sample shape;
3. remove losses (type ending in "Loss"), Accuracy, and every layer that reads the label or anything computed
   from it (the label is every data top after the first; a data layer's tops are data then label);
4. put one Input layer named ``input`` first, with each data top that a remaining layer still reads and its shape
   (batch, C, H, W).

Example::

    from slim.deploy import make_deploy
    deploy = make_deploy(train_val_net)                                  # shapes derived from the data layers
    deploy = make_deploy(net, input_shapes={"data": (3, 227, 227)}, batch=10)
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from slim import proto as pb
from slim.data.cifar import CIFAR_SHAPE
from slim.data.digits import DIGITS_SHAPE
from slim.data.svhn import SVHN_SHAPE
from slim.data.transform import transform_output_shape
from slim.errors import NetError
from slim.graph import filter_net

__all__ = ["DATA_LAYER_TYPES", "make_deploy", "data_shape"]

#: Layer types that read data; a deploy net replaces them by its Input layer.
DATA_LAYER_TYPES = frozenset({"Data", "ImageData", "MemoryData", "HDF5Data", "WindowData", "DummyData", "SlimData",
                              "Input"})

# Raw image shape (C, H, W) of the SlimData datasets that have a fixed one; IMAGE_FOLDER has none.
_DATASET_SHAPES = {pb.SlimDataParameter.DIGITS: DIGITS_SHAPE, pb.SlimDataParameter.CIFAR10: CIFAR_SHAPE,
                   pb.SlimDataParameter.CIFAR100: CIFAR_SHAPE, pb.SlimDataParameter.SVHN: SVHN_SHAPE}


def _underivable(layer: pb.LayerParameter, why: str) -> NetError:
    top = layer.top[0] if layer.top else "data"
    return NetError(f"Cannot derive the input shape of data layer {layer.name!r} ({layer.type}): {why}. Pass the "
                    f"per-sample shape explicitly: --input-shape {top}:C,H,W on the command line, or "
                    f"input_shapes={{{top!r}: (C, H, W)}} to make_deploy.")


def _blob_shape_dims(shape: pb.BlobShape) -> Tuple[int, ...]:
    return tuple(int(d) for d in shape.dim)


def _transformed(layer: pb.LayerParameter, raw: Tuple[int, int, int]) -> Tuple[int, int, int]:
    # The transform's own shape rule (crop, slim's pad) decides what the net sees of a raw image.
    return transform_output_shape(layer.transform_param, raw, where=f"layer {layer.name!r} ({layer.type})")


def data_shape(layer: pb.LayerParameter, top_index: int = 0) -> Tuple[int, ...]:
    """The per-sample shape (no batch axis) of a data layer's top, from its parameters alone.

    SlimData knows its dataset's image shape; Data and WindowData give 3 x crop x crop (1 channel with
    ``force_gray``); ImageData gives 3 (1 with ``is_color: false``) x crop x crop, or x new_height x new_width
    without a crop; MemoryData, DummyData and Input state their shapes. transform_param.crop_size overrides the
    height and width.

    Raises:
        NetError: the shape is not written in the layer (an LMDB without crop_size, HDF5Data); the message says to
            pass the shape explicitly.
    """
    transform = layer.transform_param
    channels = 1 if transform.force_gray else 3
    if layer.type == "SlimData":
        param = layer.slim_data_param
        if param.dataset in _DATASET_SHAPES:
            return _transformed(layer, _DATASET_SHAPES[param.dataset])
        # IMAGE_FOLDER: images are resized to new_height x new_width, if asked, then cropped.
        if param.new_height and param.new_width:
            return _transformed(layer, (channels, param.new_height, param.new_width))
        if transform.crop_size:
            return (channels, transform.crop_size, transform.crop_size)
        raise _underivable(layer, "an IMAGE_FOLDER dataset has no fixed image size without "
                                  "transform_param.crop_size or slim_data_param new_height and new_width")
    if layer.type in ("Data", "WindowData"):
        if not transform.crop_size:
            raise _underivable(layer, "its images are stored at a size the prototxt does not state, and "
                                      "transform_param.crop_size is not set")
        return (channels, transform.crop_size, transform.crop_size)
    if layer.type == "ImageData":
        param = layer.image_data_param
        channels = channels if param.is_color else 1
        if param.new_height and param.new_width:
            return _transformed(layer, (channels, param.new_height, param.new_width))
        if transform.crop_size:
            return (channels, transform.crop_size, transform.crop_size)
        raise _underivable(layer, "neither transform_param.crop_size nor image_data_param new_height and new_width "
                                  "are set")
    if layer.type == "MemoryData":
        param = layer.memory_data_param
        if not (param.channels and param.height and param.width):
            raise _underivable(layer, "memory_data_param does not set channels, height and width")
        return _transformed(layer, (param.channels, param.height, param.width))
    if layer.type == "DummyData":
        param = layer.dummy_data_param
        if param.shape:  # one shape per top, or one shared by all
            return _blob_shape_dims(param.shape[min(top_index, len(param.shape) - 1)])[1:]
        if param.channels:  # the legacy num/channels/height/width form, likewise one per top or one for all
            i = min(top_index, len(param.channels) - 1)
            return (param.channels[i], param.height[i], param.width[i])
        raise _underivable(layer, f"dummy_data_param gives no shape for top {top_index}")
    if layer.type == "Input":
        shapes = layer.input_param.shape
        if shapes:  # one shape per top, or one shared by all
            return _blob_shape_dims(shapes[min(top_index, len(shapes) - 1)])[1:]
        raise _underivable(layer, f"input_param gives no shape for top {top_index}")
    raise _underivable(layer, "its data files state the shape, not the prototxt")


def make_deploy(net: pb.NetParameter, *, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
                batch: int = 1) -> pb.NetParameter:
    """The deploy form of a train/test net: TEST-phase layers, no data/loss/accuracy, one Input layer first.

    Args:
        net: a net in the current (V2) format, as ``slim.io.read_net`` returns it; it is not modified.
        input_shapes: per-sample shape (C, H, W), without the batch axis, by data top name; overrides the shape
            derived from the data layer. Every name must be an input of the deploy net.
        batch: the first axis of every input shape.

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
    return deploy
