"""pycaffe's NetSpec: nets written as Python calls, turned into a NetParameter (slim's schema, Caffe's fields).

    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=64, backend=P.Data.LMDB, source="train_lmdb", ntop=2,
                             transform_param=dict(scale=1. / 255))
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.conv1, n.label)
    open("train.prototxt", "w").write(str(n.to_proto()))

``L.<Type>(*bottoms, **fields)`` makes a layer of that type. A field goes into the layer's own parameter message
(``convolution_param`` for Convolution, found through the message's name) when that message has it, else onto the
LayerParameter (``name``, ``loss_weight``, ``param``, ``include``, ...); a field ending in ``param`` is always set on
the LayerParameter. Lists fill repeated fields, dicts fill messages. ``ntop`` sets the number of tops (0 returns the
layer itself), ``in_place=True`` writes the top over the first bottom. Names: a top takes the NetSpec attribute it
was assigned to (else ``<Type><k>``); a layer takes its first top's name (or ``name=``). ``P.<Type>.<ENUM>`` gives
an enum value, e.g. ``P.Pooling.MAX``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Dict, List, Optional

from slim import proto as caffe_pb2
from slim.errors import NetError

__all__ = ["NetSpec", "Top", "Function", "layers", "params", "to_proto", "param_name_dict", "assign_proto"]


def param_name_dict() -> Dict[str, str]:
    """Layer type -> the prefix of its parameter field, from the schema (``"Convolution" -> "convolution"``): every
    ``<x>_param`` field of LayerParameter whose message is ``<Type>Parameter``."""
    out = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                out[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    return out


def assign_proto(message, name: str, value) -> None:
    """Set field ``name`` of ``message``: a list fills a repeated field (dicts in it become messages), a dict fills a
    message field, anything else is assigned.

    Raises:
        NetError: the message has no such field, or the value does not fit it.
    """
    if not hasattr(message, name) or name not in message.DESCRIPTOR.fields_by_name:
        raise NetError(f"{message.DESCRIPTOR.name} has no field {name!r}.")
    field = message.DESCRIPTOR.fields_by_name[name]
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    try:
        if repeated:
            values = value if isinstance(value, (list, tuple)) else [value]
            target = getattr(message, name)
            for item in values:
                if isinstance(item, dict):
                    entry = target.add()
                    for k, v in item.items():
                        assign_proto(entry, k, v)
                elif field.message_type is not None:
                    target.add().CopyFrom(item)
                else:
                    target.append(item)
        elif isinstance(value, dict):
            for k, v in value.items():
                assign_proto(getattr(message, name), k, v)
        elif field.message_type is not None:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    except (TypeError, ValueError) as e:
        raise NetError(f"{message.DESCRIPTOR.name}.{name} cannot hold {value!r}: {e}") from None


class Top:
    """One top blob of a layer function; NetSpec attributes and layer bottoms are Tops."""

    def __init__(self, fn: "Function", n: int) -> None:
        self.fn = fn
        self.n = n

    def to_proto(self):
        """A NetParameter holding this top's layer and every layer it depends on."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames) -> None:
        self.fn._to_proto(layers, names, autonames)


class Function:
    """A layer: its type, its bottoms (Tops) and its fields, and its tops."""

    def __init__(self, type_name: str, inputs, params: dict) -> None:
        self.type_name = type_name
        for i, top in enumerate(inputs):
            if not isinstance(top, Top):
                raise NetError(f"L.{type_name}: bottom {i} is {type(top).__name__}, not a top of another layer; pass "
                               f"NetSpec blobs (e.g. n.data) as positional arguments and fields as keywords.")
        self.inputs = tuple(inputs)
        self.params = dict(params)
        self.ntop = int(self.params.pop("ntop", 1))
        self.in_place = bool(self.params.pop("in_place", False))
        if self.in_place and not self.inputs:
            raise NetError(f"L.{type_name}(in_place=True) needs a bottom to write over.")
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names, autonames) -> str:
        if self not in names and self.ntop > 0:
            names[self] = self._get_top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    @staticmethod
    def _get_top_name(top: Top, names, autonames) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _to_proto(self, layers, names, autonames) -> None:
        if self in layers:
            return
        bottom_names = []
        for top in self.inputs:
            top._to_proto(layers, names, autonames)
            bottom_names.append(layers[top.fn].top[top.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom[:self.ntop])
        else:
            layer.top.extend(self._get_top_name(top, names, autonames) for top in self.tops)
        layer.name = self._get_name(names, autonames)
        prefix = _PARAM_NAMES.get(self.type_name)
        for key, value in self.params.items():
            if key.endswith("param"):
                assign_proto(layer, key, value)
                continue
            own = getattr(layer, prefix + "_param") if prefix is not None else None
            if own is not None and key in own.DESCRIPTOR.fields_by_name:
                assign_proto(own, key, value)
            elif key in layer.DESCRIPTOR.fields_by_name:
                assign_proto(layer, key, value)
            else:
                where = f"{prefix}_param or " if prefix is not None else ""
                raise NetError(f"L.{self.type_name}: {key!r} is a field of neither {where}LayerParameter "
                               f"(layer {layer.name!r}). Check the spelling, or pass the message explicitly, e.g. "
                               f"convolution_param=dict({key}=...).")
        layers[self] = layer


class NetSpec:
    """Named tops of a net under construction: ``n.name = L.Type(...)`` names the top (or, for a layer made with
    ``ntop=0``, the layer); ``to_proto()`` builds the NetParameter of every layer reachable from them, each after the
    layers it reads."""

    def __init__(self) -> None:
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str):
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"NetSpec has no top named {name!r}") from None

    def __setitem__(self, key: str, value) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str):
        return self.__getattr__(item)

    def __delitem__(self, name: str) -> None:
        del self.tops[name]

    def keys(self) -> List[str]:
        return list(self.tops.keys())

    def vals(self) -> list:
        return list(self.tops.values())

    def to_proto(self):
        """The NetParameter (``str()`` of it is the prototxt)."""
        names = {v: k for k, v in self.tops.items()}
        autonames: Counter = Counter()
        layers: "OrderedDict[Function, caffe_pb2.LayerParameter]" = OrderedDict()
        for top in self.tops.values():
            if not isinstance(top, (Top, Function)):     # a Function: a layer made with ntop=0 (Silence)
                raise NetError(f"NetSpec: {names.get(top, top)!r} is a {type(top).__name__}, not a layer or its "
                               f"top.")
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


def to_proto(*tops: Top):
    """A NetParameter holding the layers needed to compute ``tops``."""
    layers: "OrderedDict[Function, caffe_pb2.LayerParameter]" = OrderedDict()
    autonames: Counter = Counter()
    for top in tops:
        top._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class Layers:
    """``L.<Type>(*bottoms, **fields)``: a layer function of that type (see the module docstring)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops
        return layer_fn


class Parameters:
    """``P.<Type>.<ENUM>``: the enum values of ``<Type>Parameter``, e.g. ``P.Pooling.MAX``."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(caffe_pb2, name + "Parameter")
        except AttributeError:
            raise AttributeError(f"caffe.params has no {name!r}: there is no message {name}Parameter in the "
                                 f"schema.") from None


_PARAM_NAMES: Dict[str, Optional[str]] = param_name_dict()
layers = Layers()
params = Parameters()
