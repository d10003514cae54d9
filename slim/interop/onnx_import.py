"""ONNX -> Caffe: a model file becomes a NetParameter and its blobs, layer by layer through slim's layer registry.

    from slim.interop import import_onnx, write_imported
    result = import_onnx("resnet18.onnx")                 # an ImportResult
    write_imported(result, "resnet18")                    # resnet18.prototxt + resnet18.caffemodel

The conversion:

1. The file is read and checked (onnx.checker). Every graph input gets a fixed shape: a symbolic first axis is the
   batch; any other symbolic axis must be given (``input_shapes``), because a Caffe net has one shape per blob.
2. Nodes that no graph output depends on are dropped. Constants are folded: initializers, Constant nodes, and every
   node whose inputs are constants or only the static shape or type of a tensor (Shape -> Gather -> Concat ->
   Reshape, the chains exporters write for ``x.view(x.size(0), -1)``), evaluated by ONNX's reference implementation.
3. Every other node goes to the converter registered for its operator (slim.interop.onnx_ops), which writes Caffe
   layers; their top shapes come from slim's own layer classes, so a layer that slim could not build is an error
   here, naming the node. An operator without a converter is one InteropError naming the node and the operator.
4. The graph outputs keep their names, the graph inputs theirs; the net is built once more as a whole to check it.

The batch: while converting, a symbolic batch axis is traced as 1009, a size no other axis has, so that a Reshape
target can tell "the batch" (written as Caffe's 0, copy) from a literal size; the net's Input layer then gets
``batch``. Nothing in the file is executed: operators are mapped, constant subgraphs evaluated by the ONNX reference
operators, and only ONNX's standard domain is read.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from slim import proto as pb
from slim.errors import InteropError, NetError, SlimError
from slim.interop._deps import require

__all__ = ["ImportResult", "import_onnx", "write_imported", "imported_net", "check_imported", "load_onnx", "Blob",
           "ImportContext", "TRACE_BATCH"]

#: The batch size traced for a symbolic batch axis: distinct from every other axis of the nets people export.
TRACE_BATCH = 1009

#: Operators never folded even when every input is constant (their value is not a function of the inputs).
_NOT_FOLDABLE = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class Blob:
    """A tensor of the net being written: its Caffe blob name and its shape (batch first, as traced)."""

    name: str
    shape: Tuple[int, ...]


@dataclasses.dataclass
class ImportResult:
    """An imported ONNX model (unpacks as ``net, blobs``).

    Attributes:
        net: the Caffe net (a deploy net: one Input layer, then the converted layers).
        blobs: layer name -> its blobs (float32 arrays, Caffe's order and layout).
        source: the ONNX file (or "<model>").
        opset: the model's ONNX opset (standard domain).
        inputs, outputs: the net's input and output blob names (the ONNX graph's).
        folded: how many ONNX nodes were folded into constants.
        model_batch: the model's fixed batch size, or None when its batch axis is dynamic.
    """

    net: "pb.NetParameter"
    blobs: Dict[str, List[np.ndarray]]
    source: str
    opset: int
    inputs: List[str]
    outputs: List[str]
    folded: int = 0
    model_batch: Optional[int] = None

    def __iter__(self):
        return iter((self.net, self.blobs))

    def __str__(self) -> str:
        counts = Counter(layer.type for layer in self.net.layer)
        kinds = ", ".join(f"{n} {t}" for t, n in counts.most_common())
        return (f"{self.source} (opset {self.opset}): {len(self.net.layer)} Caffe layers ({kinds}); inputs "
                f"{self.inputs}, outputs {self.outputs}; {self.folded} ONNX nodes folded into constants")


# ---------------------------------------------------------------------------------------------------------------
# reading


def load_onnx(path: Union[str, os.PathLike]):
    """Read and check an ONNX model file (with its external data, if any).

    Raises:
        InteropError: the file is missing, is not an ONNX model (or is truncated), or fails ONNX's checker.
    """
    onnx = require("onnx")
    from google.protobuf.message import DecodeError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InteropError(f"{path}: no such ONNX file.")
    try:
        model = onnx.load(path)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise InteropError(f"{path} is not a readable ONNX model: protobuf could not parse it ({e}). The file is "
                           f"truncated or not an ONNX file; export it again (torch.onnx.export).") from None
    if not model.HasField("graph") or not len(model.graph.node) or model.ir_version <= 0:
        raise InteropError(f"{path} is not an ONNX model: it has no graph with nodes (ir_version {model.ir_version}). "
                           f"Give a file written by an ONNX exporter such as torch.onnx.export.")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise InteropError(f"{path} is not a valid ONNX model: {first}. Export it again, or repair it with "
                           f"onnx's tools.") from None
    return model


def _opset(model) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    return 1


# ---------------------------------------------------------------------------------------------------------------
# the conversion context (what converters in slim.interop.onnx_ops use)


class ImportContext:
    """The state of one conversion: constants, the Caffe blob of every ONNX tensor, and the layers written so far.

    Converters (``slim.interop.onnx_ops``) read their inputs with ``blob``/``const``/``optional_const`` and write
    layers with ``layer`` + ``emit``; ``error`` makes the InteropError that names the node.
    """

    def __init__(self, source: str, opset: int, graph_inputs: Sequence[str], graph_outputs: Sequence[str],
                 uses: Mapping[str, int], names: Mapping[int, str]):
        self.source = source
        self.opset = opset
        self.consts: Dict[str, np.ndarray] = {}
        self.values: Dict[str, Blob] = {}
        self.layers: List["pb.LayerParameter"] = []
        self.blobs: Dict[str, List[np.ndarray]] = {}
        self.writer: Dict[str, "pb.LayerParameter"] = {}  # Caffe blob name -> the layer that wrote its latest value
        self.graph_inputs = set(graph_inputs)
        self.graph_outputs = set(graph_outputs)
        self.uses = dict(uses)
        self._node_names = dict(names)
        self._layer_names: set = {"input"}
        self._blob_names: set = set(graph_inputs) | set(graph_outputs)

    # ----- reading a node --------------------------------------------------------------------------------------
    def describe(self, node) -> str:
        """``'name' (Op)`` for messages."""
        return f"node {node.name or '(unnamed)'!r} ({node.op_type})"

    def error(self, node, message: str) -> InteropError:
        """An InteropError naming the file and the node."""
        return InteropError(f"{self.source}: {self.describe(node)}: {message}")

    def attrs(self, node) -> dict:
        """The node's attributes as Python values (strings decoded)."""
        from onnx import helper

        out = {}
        for a in node.attribute:
            v = helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else v
        return out

    def has_input(self, node, i: int) -> bool:
        return i < len(node.input) and node.input[i] != ""

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def blob(self, node, i: int) -> Blob:
        """Input ``i`` of ``node`` as a computed tensor of the net."""
        if not self.has_input(node, i):
            raise self.error(node, f"input {i} is missing.")
        name = node.input[i]
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            raise self.error(node, f"input {i} ({name!r}) is a constant where slim expects a tensor computed from the "
                                   f"net's inputs; slim cannot express this use of {node.op_type}.")
        raise self.error(node, f"input {i} ({name!r}) is produced by no node before it.")

    def const(self, node, i: int, what: str) -> np.ndarray:
        """Input ``i`` of ``node``, which must be a constant (an initializer or folded)."""
        if not self.has_input(node, i):
            raise self.error(node, f"its {what} (input {i}) is missing.")
        name = node.input[i]
        if name not in self.consts:
            raise self.error(node, f"its {what} ({name!r}, input {i}) is computed at run time; slim needs it to be a "
                                   f"constant (Caffe layers hold their weights and parameters as blobs and fields).")
        return self.consts[name]

    def optional_const(self, node, i: int, what: str) -> Optional[np.ndarray]:
        """Input ``i`` as a constant, or None when the input is absent."""
        return self.const(node, i, what) if self.has_input(node, i) else None

    def overwritable(self, node, i: int = 0) -> bool:
        """Whether a layer for ``node`` may write over its input ``i`` in place (Caffe's bottom == top): nothing
        else reads that tensor, and neither it nor the node's output is a graph input or output."""
        name = node.input[i]
        return (self.uses.get(name, 0) == 1 and name not in self.graph_inputs and name not in self.graph_outputs
                and node.output[0] not in self.graph_outputs)

    # ----- writing layers --------------------------------------------------------------------------------------
    def layer(self, node, type_name: str, suffix: str = "") -> "pb.LayerParameter":
        """A new LayerParameter of Caffe type ``type_name``, named after the node (plus ``suffix``), unique."""
        base = self._node_names.get(id(node)) or node.op_type.lower()
        return pb.LayerParameter(name=self._unique(base + suffix, self._layer_names), type=type_name)

    def emit(self, node, lp: "pb.LayerParameter", bottoms: Sequence[Blob], blobs: Sequence[np.ndarray] = (),
             outputs: Optional[Sequence[Optional[str]]] = None, in_place: bool = False) -> List[Blob]:
        """Add a layer: set its bottoms and tops, infer its top shapes with slim's layer class, keep its blobs.

        Args:
            node: the ONNX node it converts (for names and messages).
            lp: the layer, from ``layer()``, with its parameters filled in.
            bottoms: its bottoms.
            blobs: its Caffe blobs (converted to float32).
            outputs: the ONNX tensor each top computes (None: a tensor internal to the conversion of this node);
                default: the node's first output.
            in_place: write top 0 over bottom 0 (when ``overwritable`` said so); a graph output still gets its name.

        Returns:
            The tops, registered as the values of ``outputs``.
        """
        from slim.layers import layer_class

        outputs = [node.output[0]] if outputs is None else list(outputs)
        lp.bottom.extend(b.name for b in bottoms)
        tops = []
        for k, out in enumerate(outputs):
            if out is not None and out in self.graph_outputs:
                tops.append(out)
            elif in_place and k == 0 and bottoms:
                tops.append(bottoms[0].name)
            else:
                tops.append(self._unique(lp.name if len(outputs) == 1 else f"{lp.name}_{k}", self._blob_names))
        lp.top.extend(tops)
        try:
            layer = layer_class(lp.type, lp.name, self.source)(lp, [b.shape for b in bottoms], pb.TEST,
                                                               source=self.source)
        except NetError as e:
            raise self.error(node, f"slim cannot build the Caffe {lp.type} layer it maps to: {e}") from None
        arrays = [np.require(a, np.float32, "C") for a in blobs]  # (keeps a 0-axis blob 0-axis)
        assert [a.shape for a in arrays] == [tuple(s) for s in layer.blob_shapes], (lp.name, layer.blob_shapes)
        self.layers.append(lp)
        if arrays:
            self.blobs[lp.name] = arrays
        result = []
        for top, shape, out in zip(tops, layer.top_shapes, outputs):
            blob = Blob(top, tuple(shape))
            self.writer[top] = lp
            if out is not None:
                self.values[out] = blob
            result.append(blob)
        return result

    def alias(self, name: str, blob: Blob) -> None:
        """ONNX tensor ``name`` is ``blob`` (Identity, an inference-time Dropout, a bias folded into its producer)."""
        self.values[name] = blob

    def _unique(self, base: str, taken: set) -> str:
        name, k = base, 1
        while name in taken:
            name = f"{base}_{k}"
            k += 1
        taken.add(name)
        return name


# ---------------------------------------------------------------------------------------------------------------
# naming


def _scope_and_leaf(node) -> Tuple[str, str]:
    """(module path, leaf name) of a node from torch's exporters: the dynamo exporter's name scopes, or the legacy
    exporter's "/layer1/conv1/Conv" node names; ("", name) otherwise."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(prop.value) if isinstance(s, str) and s]
            except (ValueError, SyntaxError):
                break
            if scopes:
                return (scopes[-2] if len(scopes) > 1 else ""), scopes[-1]
    name = node.name
    if name.startswith("/"):
        parts = [p for p in name.split("/") if p]
        if parts:
            # "/layers/layers.4/downsample/downsample.0/Conv": a Sequential's child repeats its parent's name.
            path: List[str] = []
            for part in parts[:-1]:
                if path and part.startswith(path[-1] + "."):
                    path[-1] = part
                else:
                    path.append(part)
            return ".".join(path), parts[-1]
    return "", name or node.op_type.lower()


def _node_names(nodes: Sequence) -> Dict[int, str]:
    """A readable base name per node: the torch module that wrote it when that module wrote only this node (e.g.
    "layer1.conv1"), else module + "." + the node's own name ("layer1.relu_1")."""
    from slim.interop.onnx_ops import CONVERTERS

    scoped = {id(n): _scope_and_leaf(n) for n in nodes}
    per_module = Counter(scoped[id(n)][0] for n in nodes if n.op_type in CONVERTERS)
    names = {}
    for n in nodes:
        module, leaf = scoped[id(n)]
        leaf = re.sub(r"^node_", "", leaf)
        if module and per_module[module] == 1:
            names[id(n)] = module
        else:
            names[id(n)] = f"{module}.{leaf.lower()}" if module else leaf
    return names


# ---------------------------------------------------------------------------------------------------------------
# folding


_CONSTANT_FIELDS = {"value": None, "value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                    "value_ints": np.int64}


def _constant_array(value, field: str) -> np.ndarray:
    """The array of a Constant node's ``value`` (a TensorProto) or ``value_float(s)``/``value_int(s)`` attribute."""
    if field == "value":
        from onnx import numpy_helper

        return numpy_helper.to_array(value)
    return np.array(value, dtype=_CONSTANT_FIELDS[field])


def _fold(ctx: ImportContext, node) -> bool:
    """Evaluate ``node`` into constants when its outputs follow from constants and static shapes; True if done."""
    op = node.op_type
    present = [name for name in node.input if name]
    if op in ("Shape", "Size") and present and present[0] in ctx.values:
        shape = np.array(ctx.values[present[0]].shape, dtype=np.int64)
        if op == "Size":
            ctx.consts[node.output[0]] = np.array(np.prod(shape), dtype=np.int64)
            return True
        attrs = ctx.attrs(node)
        start, end = attrs.get("start", 0), attrs.get("end", None)
        ctx.consts[node.output[0]] = shape[start:end]
        return True
    if op == "CastLike" and len(present) == 2 and present[0] in ctx.consts and present[1] in ctx.values:
        ctx.consts[node.output[0]] = ctx.consts[present[0]].astype(np.float32)  # net tensors are float32
        return True
    if op in _NOT_FOLDABLE or not all(name in ctx.consts for name in present):
        return False
    if op == "Constant" and len(node.attribute) == 1 and node.attribute[0].name in _CONSTANT_FIELDS:
        # The common forms directly (exporters write hundreds of them); the rest through the reference operator.
        value = ctx.attrs(node)[node.attribute[0].name]
        ctx.consts[node.output[0]] = _constant_array(value, node.attribute[0].name)
        return True
    if op == "Constant" or present or op in ("ConstantOfShape", "Range"):
        from onnx.reference import ReferenceEvaluator

        try:
            evaluator = ReferenceEvaluator(node, opsets={"": ctx.opset})
            results = evaluator.run(None, {name: ctx.consts[name] for name in present})
        except Exception as e:  # the reference implementation's own message says what it could not compute
            raise ctx.error(node, f"folding this node into a constant failed: {e}") from None
        for name, value in zip(node.output, results):
            if name:
                ctx.consts[name] = np.asarray(value)
        return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# the driver


def _live_nodes(graph) -> list:
    """The nodes some graph output depends on, in the graph's (topological) order."""
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output if out):
            live.append(node)
            needed.update(name for name in node.input if name)
    return live[::-1]


def _input_shape(source: str, value, override: Optional[Sequence[int]], batch_override: Optional[int]) \
        -> Tuple[Tuple[int, ...], int, bool]:
    """(traced shape, net batch, whether the batch axis is symbolic) of a graph input."""
    from onnx import TensorProto

    t = value.type.tensor_type
    name = value.name
    if not value.type.HasField("tensor_type"):
        raise InteropError(f"{source}: graph input {name!r} is not a tensor; slim nets take float tensors.")
    if t.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
        type_name = TensorProto.DataType.Name(t.elem_type)
        raise InteropError(f"{source}: graph input {name!r} is {type_name}; slim nets take float tensors "
                           f"(images, features), not {type_name}.")
    if not t.HasField("shape"):
        raise InteropError(f"{source}: graph input {name!r} has no shape; give it with --input-shape {name}:C,H,W "
                           f"(input_shapes={{{name!r}: (C, H, W)}}).")
    dims = list(t.shape.dim)
    if not dims:
        raise InteropError(f"{source}: graph input {name!r} is a scalar; slim nets take batched tensors.")
    symbolic_batch = not dims[0].HasField("dim_value") or dims[0].dim_value <= 0
    batch = batch_override or (1 if symbolic_batch else int(dims[0].dim_value))
    if override is not None:
        rest = tuple(int(d) for d in override)
        if len(rest) != len(dims) - 1 or any(d <= 0 for d in rest):
            raise InteropError(f"{source}: the shape given for input {name!r}, {rest}, must have {len(dims) - 1} "
                               f"positive sizes (every axis but the batch).")
    else:
        rest = []
        for axis, d in enumerate(dims[1:], 1):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                label = d.dim_param or "unknown"
                raise InteropError(
                    f"{source}: axis {axis} of graph input {name!r} is dynamic ({label!r}); a Caffe net has one shape "
                    f"per blob, so slim cannot fix it by itself. Give the per-sample shape: --input-shape "
                    f"{name}:{','.join('C' if i == 1 else 'N' for i in range(1, len(dims)))} "
                    f"(input_shapes={{{name!r}: (...)}}).")
            rest.append(int(d.dim_value))
        rest = tuple(rest)
    traced_batch = TRACE_BATCH if symbolic_batch else int(dims[0].dim_value)
    return (traced_batch,) + rest, batch, symbolic_batch


def import_onnx(model, *, input_shapes: Optional[Mapping[str, Sequence[int]]] = None, batch: Optional[int] = None,
                name: Optional[str] = None) -> ImportResult:
    """Convert an ONNX model into a Caffe net and its blobs.

    Args:
        model: an ONNX file path, or a loaded onnx.ModelProto.
        input_shapes: per-sample shape (no batch axis) by graph input name, for inputs with dynamic axes.
        batch: the batch size of the net's Input layer (default: the model's, or 1 when it is dynamic).
        name: the net's name (default: the ONNX graph's name).

    Returns:
        ImportResult: ``net, blobs = result``.

    Raises:
        InteropError: not a model; an operator, attribute or shape slim cannot express (naming the node); a dynamic
            axis that is not the batch and has no shape given; onnx is not installed.
    """
    from slim.interop.onnx_ops import CONVERTERS

    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        model = load_onnx(model)
    else:
        source = "<model>"
    if batch is not None and batch < 1:
        raise InteropError(f"The batch size must be at least 1; got {batch}.")
    graph = model.graph
    opset = _opset(model)
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    unknown = sorted(set(input_shapes or {}) - {v.name for v in inputs})
    if unknown:
        raise InteropError(f"{source}: input_shapes names {', '.join(map(repr, unknown))}, which the model does not "
                           f"take; its inputs are {', '.join(repr(v.name) for v in inputs)}.")
    outputs = [o.name for o in graph.output]
    live = _live_nodes(graph)
    uses = Counter(name for node in live for name in node.input if name)
    ctx = ImportContext(source, opset, [v.name for v in inputs], outputs, uses, _node_names(live))

    from onnx import numpy_helper

    for tensor in graph.initializer:
        ctx.consts[tensor.name] = numpy_helper.to_array(tensor)
    input_layer = pb.LayerParameter(name="input", type="Input")
    model_batch = None
    for value in inputs:
        traced, net_batch, symbolic = _input_shape(source, value, (input_shapes or {}).get(value.name), batch)
        model_batch = None if symbolic else traced[0]
        ctx.values[value.name] = Blob(value.name, traced)
        input_layer.top.append(value.name)
        input_layer.input_param.shape.add().dim.extend([net_batch, *traced[1:]])
    if not inputs:
        raise InteropError(f"{source}: the model has no inputs (every value is a constant); there is nothing for a "
                           f"Caffe net to compute.")

    folded = 0
    for node in live:
        if node.domain not in _DEFAULT_DOMAINS:
            raise ctx.error(node, f"operator domain {node.domain!r} is not ONNX's standard domain; slim converts only "
                                  f"standard operators. Export the model without custom or contrib operators.")
        if _fold(ctx, node):
            folded += 1
            continue
        convert = CONVERTERS.get(node.op_type)
        if convert is None:
            raise ctx.error(node, f"slim cannot express the ONNX operator {node.op_type} as Caffe layers. Operators it "
                                  f"converts: {', '.join(sorted(CONVERTERS))}. Replace it in the model before "
                                  f"exporting (e.g. with an equivalent of those), or keep that part outside the net.")
        convert(ctx, node)

    # torch's exporters name every graph "main_graph" or "torch_jit": the file's name says more.
    default = graph.name if graph.name not in ("", "main_graph", "torch_jit", "torch-jit-export") else None
    net = pb.NetParameter(name=name or default or Path(source).stem or "imported")
    net.layer.append(input_layer)
    net.layer.extend(ctx.layers)
    _name_outputs(ctx, net, outputs)
    _unread_outputs(ctx, net, outputs)
    _check(ctx, net, source)
    return ImportResult(net, dict(ctx.blobs), source, opset, list(input_layer.top), outputs, folded, model_batch)


def _name_outputs(ctx: ImportContext, net: "pb.NetParameter", outputs: Sequence[str]) -> None:
    """Give every graph output its ONNX name: rename its Caffe blob, or copy it by a Split layer when that blob is
    a graph input or already named for another output."""
    renamed: Dict[str, str] = {}  # Caffe blob name -> the output name it now has
    for out in outputs:
        if out in ctx.consts and out not in ctx.values:
            raise InteropError(f"{ctx.source}: graph output {out!r} is a constant; a Caffe net's outputs are computed "
                               f"from its inputs. Remove it from the model's outputs.")
        blob = ctx.values[out].name
        current = renamed.get(blob, blob)
        if current == out:
            continue
        if blob in ctx.graph_inputs or blob in renamed:
            split = net.layer.add(name=ctx._unique(f"{out}_copy", ctx._layer_names), type="Split")
            split.bottom.append(current)
            split.top.append(out)
            continue
        for lp in net.layer:
            for field in (lp.bottom, lp.top):
                for i, b in enumerate(field):
                    if b == blob:
                        field[i] = out
        renamed[blob] = out


def _unread_outputs(ctx: ImportContext, net: "pb.NetParameter", outputs: Sequence[str]) -> None:
    """A Caffe net's outputs are the blobs no layer reads. A graph output that later layers also read is written
    under an internal name, then a Split gives it back under its own name (unread) and, as a copy, to its readers."""
    for out in outputs:
        layers = list(net.layer)
        last = max(i for i, lp in enumerate(layers) if out in lp.top)
        if not any(out in lp.bottom for lp in layers[last + 1:]):
            continue
        internal = ctx._unique(f"{out}/value", ctx._blob_names)
        copy = ctx._unique(f"{out}/copy", ctx._blob_names)
        for i, lp in enumerate(layers):
            for field in ((lp.bottom, lp.top) if i <= last else (lp.bottom,)):
                for j, b in enumerate(field):
                    if b == out:
                        field[j] = internal if i <= last else copy
        split = pb.LayerParameter(name=ctx._unique(f"{out}/split", ctx._layer_names), type="Split",
                                  bottom=[internal], top=[out, copy])
        net.layer.insert(last + 1, split)


def _check(ctx: ImportContext, net: "pb.NetParameter", source: str) -> None:
    """Build the whole net once with the final batch: shapes and blob shapes must agree with the conversion."""
    from slim.graph import build_graph

    try:
        graph = build_graph(net, "TEST", source=source)
    except SlimError as e:
        raise InteropError(f"{source}: the converted net does not build in slim: {e}") from None
    for node in graph.layers:
        arrays = ctx.blobs.get(node.name, [])
        assert [a.shape for a in arrays] == [tuple(s) for s in node.blob_shapes], (node.name, node.blob_shapes)


def imported_net(result: ImportResult):
    """The imported net as a slim.Net (TEST phase) holding the imported blobs."""
    import torch

    from slim.net import Net

    net = Net(result.net, phase="TEST")
    params = net.params
    with torch.no_grad():
        for name, arrays in result.blobs.items():
            for t, a in zip(params[name], arrays):
                t.copy_(torch.from_numpy(np.array(a, dtype=np.float32)).reshape(t.shape))
    return net


def check_imported(result: ImportResult, model_path, tolerance: float = 1e-4):
    """Run the imported net and ONNX Runtime on the same random inputs; returns the Comparison.

    The batch is the model's own when its batch axis is fixed, else 2 (another size than the Input layer's 1).

    Raises:
        InteropError: the largest difference exceeds ``tolerance`` relative to the largest output value.
    """
    from slim.interop.runtime import compare_with_onnxruntime

    comparison = compare_with_onnxruntime(imported_net(result), model_path, batch=result.model_batch or 2)
    if not comparison.max_rel <= tolerance:
        raise InteropError(f"{result.source}: the converted net differs from ONNX Runtime by {comparison.max_abs:.3g} "
                           f"({comparison.max_rel:.3g} relative, more than {tolerance:g}); nothing was written. This "
                           f"is a slim bug or an operator detail slim does not honour: please report it with the "
                           f"model.")
    return comparison


def write_imported(result: ImportResult, output: Union[str, os.PathLike]) -> Tuple[str, str]:
    """Write OUT.prototxt and OUT.caffemodel (the suffix of ``output``, if any, is dropped); returns both paths.

    The two are written as a pair (slim.io.atomic.atomic_files): both whole in a temporary folder beside them, then
    renamed into place, the prototxt last. A failure leaves neither a partial file nor a new file beside an old one.

    Raises:
        OutputError: the folder does not exist, or is full, read-only or not writable (nothing is written).
    """
    from slim.io import write_caffemodel, write_net
    from slim.io.atomic import atomic_files

    base = os.fspath(output)
    for suffix in (".prototxt", ".caffemodel"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    proto, weights = base + ".prototxt", base + ".caffemodel"
    with atomic_files(proto) as folder:
        write_caffemodel(folder / os.path.basename(weights), result.net, result.blobs)
        write_net(result.net, folder / os.path.basename(proto))
    return proto, weights
