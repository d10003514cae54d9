"""Caffe's upgrades of old nets and solvers (util/upgrade_proto.cpp), applied in place and in Caffe's order.

A net, read from a prototxt or from a .caffemodel, goes through upgrade_net before anything else sees it:

1. V0 -> V1: the nested ``layers { layer { type: "conv" kernelsize: 5 } }`` form; separate "padding" layers are
   folded into the ``pad`` of the convolution or pooling they feed.
2. Data transformation: ``scale``/``mean_file``/``crop_size``/``mirror`` in a V1 data layer's ``*_data_param``
   move to ``transform_param``.
3. V1 -> V2: ``layers { type: CONVOLUTION blobs_lr: 1 }`` becomes ``layer { type: "Convolution" param { lr_mult:
   1 } }``; stored blobs (a V1 .caffemodel) move along unchanged, legacy 4-D dims included.
4. Input header: ``input`` + ``input_dim`` / ``input_shape`` becomes one ``Input`` layer named "input", first.
5. BatchNorm: a BatchNorm with exactly three ``param {}`` (the old required form) gets lr_mult 0, decay_mult 0.

A solver's deprecated ``solver_type`` enum becomes the ``type`` string, and a solver read from a file gets
Caffe's ``snapshot_prefix`` default.
"""

import logging
import os
import warnings
from pathlib import Path
from typing import List

from slim import proto as pb
from slim.errors import ParseError, SolverError

__all__ = ["upgrade_net", "upgrade_solver", "upgrade_snapshot_prefix", "UpgradeWarning", "V1_LAYER_TYPES",
           "V0_LAYER_TYPES"]

_log = logging.getLogger(__name__)


class UpgradeWarning(UserWarning):
    """Part of an old net had no modern equivalent and was dropped (Caffe logs these and continues)."""


_V1 = pb.V1LayerParameter

# V1 LayerType enum -> V2 type string (Caffe's UpgradeV1LayerType). NONE maps to "", which no layer registers.
V1_LAYER_TYPES = {
    _V1.NONE: "", _V1.ABSVAL: "AbsVal", _V1.ACCURACY: "Accuracy", _V1.ARGMAX: "ArgMax", _V1.BNLL: "BNLL",
    _V1.CONCAT: "Concat", _V1.CONTRASTIVE_LOSS: "ContrastiveLoss", _V1.CONVOLUTION: "Convolution",
    _V1.DATA: "Data", _V1.DECONVOLUTION: "Deconvolution", _V1.DROPOUT: "Dropout", _V1.DUMMY_DATA: "DummyData",
    _V1.EUCLIDEAN_LOSS: "EuclideanLoss", _V1.ELTWISE: "Eltwise", _V1.EXP: "Exp", _V1.FLATTEN: "Flatten",
    _V1.HDF5_DATA: "HDF5Data", _V1.HDF5_OUTPUT: "HDF5Output", _V1.HINGE_LOSS: "HingeLoss", _V1.IM2COL: "Im2col",
    _V1.IMAGE_DATA: "ImageData", _V1.INFOGAIN_LOSS: "InfogainLoss", _V1.INNER_PRODUCT: "InnerProduct",
    _V1.LRN: "LRN", _V1.MEMORY_DATA: "MemoryData", _V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss",
    _V1.MVN: "MVN", _V1.POOLING: "Pooling", _V1.POWER: "Power", _V1.RELU: "ReLU", _V1.SIGMOID: "Sigmoid",
    _V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", _V1.SILENCE: "Silence", _V1.SOFTMAX: "Softmax",
    _V1.SOFTMAX_LOSS: "SoftmaxWithLoss", _V1.SPLIT: "Split", _V1.SLICE: "Slice", _V1.TANH: "TanH",
    _V1.WINDOW_DATA: "WindowData", _V1.THRESHOLD: "Threshold",
}

# V0 type string -> V1 LayerType enum (Caffe's UpgradeV0LayerType; any other string is fatal).
V0_LAYER_TYPES = {
    "accuracy": _V1.ACCURACY, "bnll": _V1.BNLL, "concat": _V1.CONCAT, "conv": _V1.CONVOLUTION, "data": _V1.DATA,
    "dropout": _V1.DROPOUT, "euclidean_loss": _V1.EUCLIDEAN_LOSS, "flatten": _V1.FLATTEN,
    "hdf5_data": _V1.HDF5_DATA, "hdf5_output": _V1.HDF5_OUTPUT, "im2col": _V1.IM2COL, "images": _V1.IMAGE_DATA,
    "infogain_loss": _V1.INFOGAIN_LOSS, "innerproduct": _V1.INNER_PRODUCT, "lrn": _V1.LRN,
    "multinomial_logistic_loss": _V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": _V1.POOLING, "relu": _V1.RELU,
    "sigmoid": _V1.SIGMOID, "softmax": _V1.SOFTMAX, "softmax_loss": _V1.SOFTMAX_LOSS, "split": _V1.SPLIT,
    "tanh": _V1.TANH, "window_data": _V1.WINDOW_DATA,
}

# Where each V0 setting lands in the V1 layer: V0 field -> {V0 type: (V1 sub-message, field)}; "*" is any type.
# A repeated target (Convolution's pad, kernel_size, stride) gets the value appended. A V0 field set on a type
# not listed has no V1 meaning: Caffe logs "Unknown parameter ... for layer type ..." and drops it.
_CONV, _POOL, _IP = "convolution_param", "pooling_param", "inner_product_param"
_DATA, _IMAGES, _WINDOW, _HDF5 = "data_param", "image_data_param", "window_data_param", "hdf5_data_param"
_V0_FIELDS = {
    "num_output": {"conv": (_CONV, "num_output"), "innerproduct": (_IP, "num_output")},
    "biasterm": {"conv": (_CONV, "bias_term"), "innerproduct": (_IP, "bias_term")},
    "weight_filler": {"conv": (_CONV, "weight_filler"), "innerproduct": (_IP, "weight_filler")},
    "bias_filler": {"conv": (_CONV, "bias_filler"), "innerproduct": (_IP, "bias_filler")},
    "pad": {"conv": (_CONV, "pad"), "pool": (_POOL, "pad")},
    "kernelsize": {"conv": (_CONV, "kernel_size"), "pool": (_POOL, "kernel_size")},
    "group": {"conv": (_CONV, "group")},
    "stride": {"conv": (_CONV, "stride"), "pool": (_POOL, "stride")},
    "pool": {"pool": (_POOL, "pool")},  # V0 and V1 PoolMethod share their numbers: MAX 0, AVE 1, STOCHASTIC 2
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": (_DATA, "source"), "hdf5_data": (_HDF5, "source"), "images": (_IMAGES, "source"),
               "window_data": (_WINDOW, "source"), "infogain_loss": ("infogain_loss_param", "source")},
    "scale": {"*": ("transform_param", "scale")},
    "meanfile": {"*": ("transform_param", "mean_file")},
    "batchsize": {"data": (_DATA, "batch_size"), "hdf5_data": (_HDF5, "batch_size"),
                  "images": (_IMAGES, "batch_size"), "window_data": (_WINDOW, "batch_size")},
    "cropsize": {"*": ("transform_param", "crop_size")},
    "mirror": {"*": ("transform_param", "mirror")},
    "rand_skip": {"data": (_DATA, "rand_skip"), "images": (_IMAGES, "rand_skip")},
    "shuffle_images": {"images": (_IMAGES, "shuffle")},
    "new_height": {"images": (_IMAGES, "new_height")},
    "new_width": {"images": (_IMAGES, "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": (_WINDOW, "fg_threshold")},
    "det_bg_threshold": {"window_data": (_WINDOW, "bg_threshold")},
    "det_fg_fraction": {"window_data": (_WINDOW, "fg_fraction")},
    "det_context_pad": {"window_data": (_WINDOW, "context_pad")},
    "det_crop_mode": {"window_data": (_WINDOW, "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},  # None: the whole message is copied
}
# Copied to the V1 layer itself, not to a sub-message.
_V0_DIRECT = ("name", "type", "blobs", "blobs_lr", "weight_decay")

# V1 data layer types whose *_data_param may still hold the transformation fields (Caffe's
# UpgradeNetDataTransformation).
_DATA_TRANSFORM_PARAMS = {_V1.DATA: _DATA, _V1.IMAGE_DATA: _IMAGES, _V1.WINDOW_DATA: _WINDOW}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

_SOLVER_TYPES = {pb.SolverParameter.SGD: "SGD", pb.SolverParameter.NESTEROV: "Nesterov",
                 pb.SolverParameter.ADAGRAD: "AdaGrad", pb.SolverParameter.RMSPROP: "RMSProp",
                 pb.SolverParameter.ADADELTA: "AdaDelta", pb.SolverParameter.ADAM: "Adam"}


def _is_repeated(field) -> bool:
    """Whether a FieldDescriptor is repeated, on every supported protobuf: `label` was removed in 7.x and
    `is_repeated` is missing from older runtimes."""
    flag = getattr(field, "is_repeated", None)
    return flag if flag is not None else field.label == field.LABEL_REPEATED


def _layer_name(layer, index: int) -> str:
    return f'"{layer.name}"' if layer.name else f"#{index + 1}"


# ----------------------------------------------------------------------------------------------------------------
# 1. V0 -> V1


def _fold_padding_layers(net: "pb.NetParameter", source: str) -> List["pb.V1LayerParameter"]:
    """The V0 layers with each "padding" layer removed and its pad moved into the conv/pool it feeds."""
    last_producer = {name: -1 for name in net.input}  # blob -> index of the layer that last wrote it; -1: input
    kept = []
    for i, layer in enumerate(net.layers):
        v0 = layer.layer
        if v0.type != "padding":
            kept.append(pb.V1LayerParameter())
            kept[-1].CopyFrom(layer)
        for j, blob in enumerate(layer.bottom):
            if blob not in last_producer:
                raise ParseError(f'{source}: V0 layer {_layer_name(v0, i)} reads blob "{blob}", which no earlier '
                                 f'layer or input produces. Fix its bottom or add the producing layer first.')
            producer = last_producer[blob]
            if producer < 0 or net.layers[producer].layer.type != "padding":
                continue
            pad = net.layers[producer]
            # Caffe defines a padding layer only in front of a single-input conv or pool, with one bottom and
            # one top itself; anything else was undefined behaviour there and is an error here.
            if v0.type not in ("conv", "pool") or len(layer.bottom) != 1 or len(pad.bottom) != 1 \
                    or len(pad.top) != 1:
                raise ParseError(f'{source}: V0 padding layer {_layer_name(pad.layer, producer)} feeds layer '
                                 f'{_layer_name(v0, i)} of type "{v0.type}"; a padding layer (one bottom, one top) '
                                 f'can only feed a conv or pool layer with a single bottom. Give that layer a '
                                 f'pad instead.')
            kept[-1].layer.pad = pad.layer.pad
            kept[-1].bottom[j] = pad.bottom[0]
        for blob in layer.top:
            last_producer[blob] = i
    return kept


def _v0_to_v1_layer(layer: "pb.V1LayerParameter", index: int, source: str, problems: List[str]) \
        -> "pb.V1LayerParameter":
    """One V0 layer (`layers { layer { ... } bottom top }`) as a V1 layer (Caffe's UpgradeV0LayerParameter)."""
    v0 = layer.layer
    out = pb.V1LayerParameter()
    out.bottom.extend(layer.bottom)
    out.top.extend(layer.top)
    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        if v0.type not in V0_LAYER_TYPES:
            raise ParseError(f'{source}: V0 layer {_layer_name(v0, index)} has type "{v0.type}", which Caffe\'s V0 '
                             f'format does not define. Known V0 types: {", ".join(sorted(V0_LAYER_TYPES))}.')
        out.type = V0_LAYER_TYPES[v0.type]
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for field, value in v0.ListFields():
        if field.name in _V0_DIRECT or _is_repeated(field):
            continue
        target = _V0_FIELDS.get(field.name, {})
        target = target.get(v0.type, target.get("*"))
        if target is None:
            problems.append(f'V0 layer {_layer_name(v0, index)}: {field.name} has no meaning for type "{v0.type}" '
                            f'and was dropped')
            continue
        message, name = target
        sub = getattr(out, message)
        if name is None:
            sub.CopyFrom(value)
        elif field.message_type is not None:
            getattr(sub, name).CopyFrom(value)
        elif _is_repeated(sub.DESCRIPTOR.fields_by_name[name]):
            getattr(sub, name).append(value)
        else:
            setattr(sub, name, value)
    return out


def _upgrade_v0(net: "pb.NetParameter", source: str, problems: List[str]) -> None:
    # Unlike Caffe, which rebuilds the net from name/input/input_dim/force_backward alone, the other top-level
    # fields are kept: a V0 net has none, and keeping a stray `layer` lets the V1 -> V2 step report the mix.
    layers = [_v0_to_v1_layer(layer, i, source, problems) for i, layer in enumerate(_fold_padding_layers(net, source))]
    del net.layers[:]
    net.layers.extend(layers)


# ----------------------------------------------------------------------------------------------------------------
# 2. Data transformation


def _upgrade_data_transformation(net: "pb.NetParameter") -> bool:
    changed = False
    for layer in net.layers:
        name = _DATA_TRANSFORM_PARAMS.get(layer.type)
        if name is None or not layer.HasField(name):
            continue
        param = getattr(layer, name)
        for field in _TRANSFORM_FIELDS:
            if param.HasField(field):
                setattr(layer.transform_param, field, getattr(param, field))
                param.ClearField(field)
                changed = True
    return changed


# ----------------------------------------------------------------------------------------------------------------
# 3. V1 -> V2


def _param_spec(layer: "pb.LayerParameter", i: int) -> "pb.ParamSpec":
    while len(layer.param) <= i:
        layer.param.add()
    return layer.param[i]


def _v1_to_v2_layer(v1: "pb.V1LayerParameter", index: int, problems: List[str]) -> "pb.LayerParameter":
    """One V1 layer as a V2 LayerParameter (Caffe's UpgradeV1LayerParameter)."""
    layer = pb.LayerParameter()
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        layer.type = V1_LAYER_TYPES[v1.type]
    layer.blobs.extend(v1.blobs)  # kept exactly, legacy num/channels/height/width included
    # The per-blob lists become one ParamSpec per blob, created as far as the longest list reaches.
    for i, name in enumerate(v1.param):
        _param_spec(layer, i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        _param_spec(layer, i).share_mode = mode  # V1 and ParamSpec DimCheckMode share their numbers
    for i, lr in enumerate(v1.blobs_lr):
        _param_spec(layer, i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        _param_spec(layer, i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    # Every *_param (and transform_param) of V1 has a namesake in LayerParameter and is copied verbatim.
    for field, value in v1.ListFields():
        if field.message_type is not None and not _is_repeated(field) and field.name != "layer":
            getattr(layer, field.name).CopyFrom(value)
    if v1.HasField("layer"):
        problems.append(f"V1 layer {_layer_name(v1, index)} still holds a V0 `layer {{}}`, which was ignored")
    return layer


def _upgrade_v1(net: "pb.NetParameter", source: str, problems: List[str]) -> None:
    if len(net.layer):
        raise ParseError(f"{source}: the net has both V2 `layer {{}}` entries ({len(net.layer)}) and V1 "
                         f"`layers {{}}` entries ({len(net.layers)}); Caffe refuses to upgrade such a net. Write "
                         f"every layer in one form, preferably V2: layer {{ type: \"Convolution\" param {{ lr_mult: "
                         f"1 }} ... }} instead of layers {{ type: CONVOLUTION blobs_lr: 1 ... }}.")
    layers = [_v1_to_v2_layer(v1, i, problems) for i, v1 in enumerate(net.layers)]
    del net.layers[:]
    net.layer.extend(layers)


# ----------------------------------------------------------------------------------------------------------------
# 4. Input header


def _upgrade_input(net: "pb.NetParameter", source: str) -> None:
    inputs, shapes, dims = list(net.input), list(net.input_shape), list(net.input_dim)
    if shapes and dims:
        raise ParseError(f"{source}: the net header gives both input_shape and input_dim; Caffe accepts one of "
                         f"them. Keep input_shape {{ dim: ... }} (one per input) and delete input_dim.")
    if shapes and len(shapes) != len(inputs):
        raise ParseError(f"{source}: the net header names {len(inputs)} input(s) but gives {len(shapes)} "
                         f"input_shape(s); give one input_shape per input.")
    if dims and len(dims) != 4 * len(inputs):
        raise ParseError(f"{source}: the net header names {len(inputs)} input(s) but gives {len(dims)} input_dim "
                         f"values; give exactly 4 (num, channels, height, width) per input.")
    if shapes or dims:
        layer = pb.LayerParameter(name="input", type="Input")
        layer.top.extend(inputs)
        for i in range(len(inputs)):
            shape = layer.input_param.shape.add()
            if shapes:
                shape.CopyFrom(shapes[i])
            else:
                shape.dim.extend(dims[4 * i:4 * i + 4])
        net.layer.insert(0, layer)  # first, so the inputs exist before any layer reads them
    # `input:` alone is a legacy .caffemodel's header: nothing to build, it is just dropped.
    for name in ("input", "input_shape", "input_dim"):
        net.ClearField(name)


# ----------------------------------------------------------------------------------------------------------------
# 5. BatchNorm


def _upgrade_batch_norm(net: "pb.NetParameter") -> bool:
    # The old BatchNorm needed three `param { lr_mult: 0 }` to keep its statistics out of the solver; the
    # upgrade pins all three to lr_mult 0 and decay_mult 0 and leaves the rest of each ParamSpec alone.
    changed = False
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                for field in ("lr_mult", "decay_mult"):
                    if not spec.HasField(field) or getattr(spec, field) != 0:
                        setattr(spec, field, 0.0)
                        changed = True
    return changed


# ----------------------------------------------------------------------------------------------------------------
# Public


def upgrade_net(net: "pb.NetParameter", source: str) -> bool:
    """Upgrades an old net in place, exactly in Caffe's order (UpgradeNetAsNeeded); see the module docstring.

    Works on nets from prototxt and from binary .caffemodel files (V0/V1 layers keep their blobs). Settings
    that have no modern equivalent are dropped with one UpgradeWarning, as Caffe logs them and continues.

    Args:
        net: the NetParameter, modified in place.
        source: the file it came from, for messages.

    Returns:
        True if anything changed.

    Raises:
        ParseError: the net mixes `layer` and `layers`, a V0 layer has an unknown type or misplaced padding
            layer, or the input header is inconsistent.
    """
    changed = False
    problems: List[str] = []
    if any(layer.HasField("layer") for layer in net.layers):
        _log.info("Upgrading %s from the deprecated V0 layer format.", source)
        _upgrade_v0(net, source, problems)
        changed = True
    if _upgrade_data_transformation(net):
        _log.info("Moved data transformation settings of %s into transform_param.", source)
        changed = True
    if len(net.layers):
        _log.info("Upgrading %s from the deprecated V1 layer format (layers {}).", source)
        _upgrade_v1(net, source, problems)
        changed = True
    if len(net.input):
        _upgrade_input(net, source)
        changed = True
    if _upgrade_batch_norm(net):
        _log.info("Set lr_mult and decay_mult to 0 on the old-style BatchNorm params of %s.", source)
        changed = True
    if problems:
        warnings.warn(f"{source}: upgrading the old net format dropped settings with no modern equivalent: "
                      f"{'; '.join(problems)}. Check the upgraded net.", UpgradeWarning, stacklevel=2)
    return changed


def upgrade_solver(solver: "pb.SolverParameter", source: str) -> bool:
    """Replaces the deprecated ``solver_type`` enum by the ``type`` string, in place (Caffe's UpgradeSolverType).

    Args:
        solver: the SolverParameter, modified in place.
        source: the file it came from, for messages.

    Returns:
        True if anything changed.

    Raises:
        SolverError: both solver_type and type are set.
    """
    if not solver.HasField("solver_type"):
        return False
    old = pb.SolverParameter.SolverType.Name(solver.solver_type)
    new = _SOLVER_TYPES[solver.solver_type]
    if solver.HasField("type"):
        raise SolverError(f'{source}: the solver sets both the deprecated solver_type ({old}) and type '
                          f'("{solver.type}"); Caffe refuses a solver with both. Delete solver_type and keep '
                          f'type: "{solver.type}" (solver_type {old} is type "{new}").')
    solver.type = new
    solver.ClearField("solver_type")
    return True


def upgrade_snapshot_prefix(solver: "pb.SolverParameter", solver_path) -> bool:
    """Caffe's snapshot_prefix rule for a solver read from a file (UpgradeSnapshotPrefixProperty).

    An unset prefix becomes the solver path without its extension; a prefix naming an existing directory (as
    seen from the working directory) becomes ``<dir>/<solver file stem>``.

    Returns:
        True if the prefix changed.
    """
    path = os.fspath(solver_path)
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = os.path.splitext(path)[0]
        _log.info("snapshot_prefix was not specified and is set to %s", solver.snapshot_prefix)
        return True
    if os.path.isdir(solver.snapshot_prefix):
        solver.snapshot_prefix = os.path.join(solver.snapshot_prefix, Path(path).stem)
        _log.info("snapshot_prefix is a directory and is set to %s", solver.snapshot_prefix)
        return True
    return False
